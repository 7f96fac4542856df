"""Diagnostics and the stability switches on a GPU, through megaspan's trainer (``gpu``: any CUDA
machine; the local backend in bf16, no TE needed).

* the update-ratio snapshot is a pinned host copy in the weights' own dtype (bf16): nothing of it
  on the GPU (issue 17.12; on CPU only the dtype and the host-read count can be shown);
* the mechanism metrics and ``training.z_loss`` / ``model.qk_layernorm`` run on CUDA and give
  finite numbers (the local backend's attention softmax is the fused kernel's when installed).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megaspan.training.diagnostics import DiagnosticsHook
from megaspan.training.hooks import Hook
from tests.distributed import layout_workers as lw

pytestmark = pytest.mark.gpu
STEPS = 4


class SnapshotProbe(Hook):
    """Runs after the diagnostics hook's before_optimizer_step: what the snapshot holds."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, torch.dtype, torch.dtype]] = []

    def before_optimizer_step(self, trainer, step: int) -> None:
        diag = next(h for h in trainer.hooks if isinstance(h, DiagnosticsHook)).diagnostics
        weights = {id(e[3]): e[3] for e in diag._before_entries}
        for key, snap in diag._before.items():
            self.seen.append((snap.device.type, snap.is_pinned(), snap.dtype, weights[key].dtype))


def _fit(run_dir, extra=()):
    from megaspan.config import validate
    from megaspan.models import detect_capabilities
    from megaspan.training.build import build_trainer

    cfg = lw.layout_config(
        "post",
        False,
        "tp1",
        str(run_dir),
        steps=STEPS,
        load_optimizer=True,  # validate() refuses weights-only without a resume path
        extra=(
            "model.transformer_impl=local",
            "precision.dtype=bf16",
            "logging.diagnostics_interval=2",
            *extra,
        ),
    )
    validate(cfg, 1, detect_capabilities())
    probe = SnapshotProbe()
    datasets = (
        lw.synthetic_dataset(STEPS * lw.GLOBAL_BATCH, seed=1),
        lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, seed=2),
    )
    trainer = build_trainer(cfg, hooks=[probe], datasets=datasets, vocab_size=lw.VOCAB)
    try:
        assert next(trainer.objs.model[0].parameters()).is_cuda
        assert trainer.fit() == 0
    finally:
        trainer.close()
    return probe, json.loads((run_dir / "summary.json").read_text())["diagnostics"]


def test_snapshot_is_pinned_host_memory_in_the_weights_dtype(single_process_group, tmp_path):
    probe, summary = _fit(tmp_path)
    assert probe.seen
    assert {(dev, pinned) for dev, pinned, _, _ in probe.seen} == {("cpu", True)}
    assert all(snap == weight == torch.bfloat16 for _, _, snap, weight in probe.seen)
    assert sorted(summary["relative_update"], key=int) == ["1", "2", "4"]
    assert all(
        v is not None and math.isfinite(v) for v in summary["attn_max_logit"] + summary["attn_entropy"]
    )
    assert math.isfinite(summary["lm_head_log_z"])


def test_stability_switches_train_on_cuda(single_process_group, tmp_path):
    _, summary = _fit(tmp_path, extra=("model.qk_layernorm=true", "training.z_loss=1e-2"))
    assert math.isfinite(summary["lm_head_log_z"]) and summary["max_attn_logit"] is not None
