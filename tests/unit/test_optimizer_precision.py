"""The optimizer matches the training dtype: bf16 weights are updated through fp32 master copies
(Megatron's Float16OptimizerWithFloat16Params), fp32 weights directly. A wrong ``bf16``/``fp16``
flag in the optimizer config (found by tools/mutate.sh on training/setup.py) trains on silently:
bf16 Adam updates lose the small steps, or fp32 runs pay for needless master copies."""

from __future__ import annotations

import pytest
import torch

from megaspan.training.build import build_trainer
from tests.distributed import layout_workers as lw


def _optimizer_and_model_params(tmp_path, dtype: str):
    cfg = lw.layout_config("pre", False, "tp1", str(tmp_path), steps=1, extra=(f"precision.dtype={dtype}",))
    trainer = build_trainer(
        cfg,
        hooks=[],
        datasets=(
            lw.synthetic_dataset(lw.GLOBAL_BATCH, seed=1),
            lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, seed=2),
        ),
        vocab_size=lw.VOCAB,
    )
    try:
        optimizers = getattr(trainer.objs.optimizer, "chained_optimizers", [trainer.objs.optimizer])
        updated = [p for o in optimizers for g in o.optimizer.param_groups for p in g["params"]]
        model = list(trainer.objs.model[0].parameters())
        return optimizers, updated, model
    finally:
        trainer.close()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_optimizer_updates_fp32_weights(single_process_group, tmp_path, dtype):
    optimizers, updated, model = _optimizer_and_model_params(tmp_path, dtype)
    assert {p.dtype for p in updated} == {torch.float32}
    assert {p.dtype for p in model} == {torch.bfloat16 if dtype == "bf16" else torch.float32}
    model_ids = {id(p) for p in model}
    if dtype == "bf16":
        # fp32 master copies, and no loss scaler (that is fp16's)
        assert not model_ids & {id(p) for p in updated}
        assert all(o.grad_scaler is None for o in optimizers)
    else:
        # the model's own parameters, no copies
        assert {id(p) for p in updated} == model_ids
