"""The learning rate each update really uses, against the schedule's formula.

The trainer steps Megatron's scheduler *before* the optimizer, so update k uses lr(k); in
Megatron's own order (optimizer, then scheduler) update 1 uses lr(0) = 0 under warmup and every
later update lags one step. Read here where it matters: the ``lr`` of each torch optimizer's
param groups at the moment its ``step()`` runs, and the size of the first Adam update (with
m = g and v = g^2 after bias correction, |delta| = lr * |g| / (|g| + eps), i.e. lr(1) for every
weight with a non-negligible gradient).
"""

from __future__ import annotations

import math

import torch

from megaspan.training.build import build_trainer
from megaspan.training.hooks import Hook
from tests.distributed import layout_workers as lw

LR, MIN_LR, WARMUP, STEPS = 3.0e-3, 3.0e-4, 2, 6


def expected_lr(step: int) -> float:
    """Linear warmup from 0, then cosine to MIN_LR at STEPS (Megatron's formula, written out)."""
    if step <= WARMUP:
        return LR * step / WARMUP
    ratio = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained]


class FirstUpdate(Hook):
    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_fit_start(self, trainer) -> None:
        self.before = [p.detach().clone() for p in trainer.objs.model[0].parameters()]

    def on_step_end(self, trainer, result) -> None:
        if result.step == 1:
            self.after = [p.detach().clone() for p in trainer.objs.model[0].parameters()]


def test_each_update_uses_the_scheduled_lr_and_the_first_is_not_wasted(single_process_group, tmp_path):
    cfg = lw.layout_config(
        "pre",
        False,
        "tp1",
        str(tmp_path),
        steps=STEPS,
        extra=(
            f"schedule.warmup_steps={WARMUP}",
            f"schedule.decay_steps={STEPS}",
            f"optimizer.lr={LR}",
            f"optimizer.min_lr={MIN_LR}",
            "optimizer.weight_decay=0",  # the first update is then Adam's normalised step alone
        ),
    )
    first = FirstUpdate()
    trainer = build_trainer(
        cfg,
        hooks=[first],
        datasets=(
            lw.synthetic_dataset(STEPS * lw.GLOBAL_BATCH, seed=1),
            lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, seed=2),
        ),
        vocab_size=lw.VOCAB,
    )
    used: list[float] = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: used.append(float(o.param_groups[0]["lr"])))
        for opt in torch_optimizers(trainer.objs.optimizer)
    ]
    try:
        trainer.fit()
    finally:
        for handle in handles:
            handle.remove()
        trainer.close()
    per_step = used[:: len(handles)]
    assert len(per_step) == STEPS
    for step, lr in enumerate(per_step, start=1):
        assert math.isclose(lr, expected_lr(step), rel_tol=1e-9), (step, lr, expected_lr(step))
    # The first update moved the weights by lr(1) (= LR / WARMUP), not by 0.
    largest = max((a - b).abs().max().item() for a, b in zip(first.after, first.before))
    assert math.isclose(largest, expected_lr(1), rel_tol=1e-3), (largest, expected_lr(1))
