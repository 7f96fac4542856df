"""``model.arch=hybrid`` on TP2+SP, PP2 (stage boundaries between blocks) and EP2 trains like
one process, and the one-process hybrid run equals the one-process GPT run.

One process trains SpanNorm (dense and MoE) for 5 steps as GPT and as hybrid from the same seed
(identical weights: see tests/unit/test_hybrid.py) and saves the hybrid starting point; then the
package's pool of 2 ranks runs every layout from that checkpoint (weights-only load, resharded by
dist_checkpointing from the hybrid model's per-layer keys) through megaspan's Trainer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.distributed import layout_workers as lw

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

HYBRID = ("model.arch=hybrid",)
LAYOUTS = (("tp2-sp", False), ("tp2-sp", True), ("pp2", False), ("pp2", True), ("ep2", True))
REL = 1e-5
# Pools come from the package's dist_pool (tests/distributed/conftest.py). Measured: both jobs
# together 77 s at a load average of ~30-60 on 2 cores (pool starts included, which have their
# own START_TIMEOUT_S); ~5x margin each, instead of 600 s + 900 s.
REFERENCE_TIMEOUT_S = 300
LAYOUTS_TIMEOUT_S = 400


def _run(moe: bool, layout: str, init: str | None, out_dir: str, extra: tuple[str, ...]) -> dict:
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    # Megatron's process-wide MoE aux-loss tracker is sized by the first model's num_layers
    # (L for GPT, 2L for hybrid); this worker trains both in one process.
    destroy_moe_metrics_tracker()
    cfg = lw.layout_config("spannorm", moe, layout, out_dir, resume=init or "none", extra=extra)
    recorder = lw.LossRecorder()
    trainer = lw._trainer(cfg, recorder)
    if init is None:
        trainer.save()  # step 0: the starting point of every layout
    try:
        trainer.fit()
    finally:
        trainer.close()
    layers = [type(m).__name__ for chunk in trainer.objs.chunks for m in chunk.decoder.layers]
    return dict(losses=recorder.losses, valid=trainer.val_losses[-1][1], layers=layers)


def reference_cases(rank: int, world_size: int, base: str) -> dict:
    lw._allow_child_processes()
    out = {}
    for moe in (False, True):
        name = "moe" if moe else "dense"
        out[f"gpt-{name}"] = _run(moe, "tp1", None, f"{base}/gpt-{name}", ())
        out[f"hybrid-{name}"] = _run(moe, "tp1", None, f"{base}/hybrid-{name}", HYBRID)
    return out


def layout_cases(rank: int, world_size: int, base: str) -> dict:
    lw._allow_child_processes()
    out = {}
    for layout, moe in LAYOUTS:
        name = "moe" if moe else "dense"
        start = time.perf_counter()
        out[f"{layout}-{name}"] = _run(
            moe, layout, f"{base}/hybrid-{name}/step_0000000", f"{base}/{layout}-{name}", HYBRID
        )
        out[f"{layout}-{name}"]["seconds"] = time.perf_counter() - start
    return out


def test_hybrid_layouts_match_one_process(tmp_path: Path, dist_pool):
    ref = dist_pool(1).run(reference_cases, str(tmp_path), timeout=REFERENCE_TIMEOUT_S)[0]
    for name in ("dense", "moe"):
        assert ref[f"hybrid-{name}"]["layers"][:2] == ["HybridHalfLayer", "HybridHalfLayer"]
        # Same seed, same init order, bitwise-equal steps: the architectures are one model.
        assert ref[f"hybrid-{name}"]["losses"] == ref[f"gpt-{name}"]["losses"]
        assert ref[f"hybrid-{name}"]["losses"][-1] < ref[f"hybrid-{name}"]["losses"][0] - 0.1
    runs = dist_pool(2).run(layout_cases, str(tmp_path), timeout=LAYOUTS_TIMEOUT_S)
    for layout, moe in LAYOUTS:
        name = "moe" if moe else "dense"
        got = [r[f"{layout}-{name}"] for r in runs]
        assert all(g["losses"] == got[0]["losses"] for g in got)
        assert got[0]["losses"] == pytest.approx(ref[f"hybrid-{name}"]["losses"], rel=REL), (layout, name)
        assert got[0]["valid"] == pytest.approx(ref[f"hybrid-{name}"]["valid"], rel=REL), (layout, name)
    # PP2 splits 4 blocks 2+2: each stage holds whole blocks (4 hybrid layers).
    assert [len(r["pp2-dense"]["layers"]) for r in runs] == [4, 4]
