"""Training on a GPU through megaspan's own trainer (``build_trainer`` + ``fit``, DDP, optimizer,
schedule): what a first H100 campaign runs, in minutes.

* every placement on the local backend in bf16 (``gpu``: any CUDA machine, no TE needed);
* every placement on Transformer Engine in bf16, FP8 tensorwise and FP8 delayed (``te``);
* ``model.arch=hybrid`` and MoE with grouped GEMM (DeepNorm's per-expert init included) on TE;
* FP8 delayed: save, resume from it, and the next steps' losses equal the uninterrupted run's
  (TE >= 2.17 refuses the pickled amax history without megaspan's opt-in).

``tools/gpu_check.sh`` runs this file and turns its results into PASS / FAIL / SKIP lines.
"""

from __future__ import annotations

import math

import pytest
import torch

from megaspan.norms import available
from tests.distributed import layout_workers as lw

pytestmark = pytest.mark.gpu

PLACEMENTS = list(available())
PRECISIONS = {
    "bf16": ("precision.dtype=bf16",),
    "fp8-tensorwise": ("precision.dtype=bf16", "precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"),
    "fp8-delayed": ("precision.dtype=bf16", "precision.fp8=hybrid", "precision.fp8_recipe=delayed"),
}
STEPS = 4


def fit(
    run_dir, placement: str, impl: str, precision: str, *, moe=False, extra=(), steps=STEPS, resume="none"
):
    """Per-step losses of a tiny model trained ``steps`` steps on this GPU (config validated
    against this machine first, as ``megaspan train`` does)."""
    from megaspan.config import validate
    from megaspan.models import detect_capabilities
    from megaspan.training.build import build_trainer

    cfg = lw.layout_config(
        placement,
        moe,
        "tp1",
        str(run_dir),
        steps=steps,
        resume=resume,
        load_optimizer=True,
        extra=(f"model.transformer_impl={impl}", *PRECISIONS[precision], *extra),
    )
    validate(cfg, 1, detect_capabilities())
    recorder = lw.LossRecorder()
    datasets = (
        lw.synthetic_dataset(lw.STEPS * lw.GLOBAL_BATCH, seed=1),
        lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, seed=2),
    )
    trainer = build_trainer(cfg, hooks=[recorder], datasets=datasets, vocab_size=lw.VOCAB)
    try:
        assert next(trainer.objs.model[0].parameters()).is_cuda
        trainer.fit()
    finally:
        trainer.close()
    return recorder.losses


def assert_trained(losses: list[float], steps: int = STEPS) -> None:
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    # A fresh model predicts close to uniform: a first loss far from ln(V) means broken numerics.
    assert abs(losses[0] - math.log(lw.VOCAB)) < 1.5, losses


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_local_backend_trains_on_cuda(single_process_group, tmp_path, placement):
    assert_trained(fit(tmp_path, placement, "local", "bf16"))


def test_local_backend_moe_trains_on_cuda(single_process_group, tmp_path):
    assert_trained(fit(tmp_path, "spannorm", "local", "bf16", moe=True))


@pytest.mark.te
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_te_trains(single_process_group, tmp_path, placement, precision):
    assert_trained(fit(tmp_path, placement, "transformer_engine", precision))


@pytest.mark.te
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("placement", ["spannorm", "deepnorm"])
def test_te_moe_grouped_gemm_trains(single_process_group, tmp_path, placement, precision):
    assert_trained(
        fit(
            tmp_path,
            placement,
            "transformer_engine",
            precision,
            moe=True,
            extra=("model.moe.grouped_gemm=true",),
        )
    )


@pytest.mark.te
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("placement", ["spannorm", "pre"])
def test_te_hybrid_trains(single_process_group, tmp_path, placement, precision):
    assert_trained(fit(tmp_path, placement, "transformer_engine", precision, extra=("model.arch=hybrid",)))


@pytest.mark.te
def test_fp8_delayed_save_and_resume(single_process_group, tmp_path):
    """Resume from step 2 of an FP8-delayed run: steps 3-4 give the uninterrupted run's losses
    (the amax history and scales travel in TE's pickled extra state)."""
    exact = ("training.deterministic=true",)
    full = fit(
        tmp_path / "full",
        "spannorm",
        "transformer_engine",
        "fp8-delayed",
        extra=(*exact, "checkpoint.save_interval=2"),
    )
    step2 = sorted((tmp_path / "full").glob("step_*"))[0]
    assert step2.name.endswith("0002"), step2
    resumed = fit(
        tmp_path / "resumed", "spannorm", "transformer_engine", "fp8-delayed", extra=exact, resume=str(step2)
    )
    assert len(resumed) == 2
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[2:]), rtol=1e-5, atol=0)
