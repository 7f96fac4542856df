"""The divergence guard's policies on a real tiny model, with faults injected from the test side
(a wrapped loss function poisoned for chosen steps), and the run summary they leave."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megaspan.training import batches
from megaspan.training import trainer as trainer_module
from megaspan.training.build import build_trainer
from megaspan.training.callbacks.guard import EXIT_DIVERGED
from megaspan.training.checkpoint import checkpoint_name
from megaspan.training.hooks import Hook
from tests.distributed import layout_workers as lw

STEPS = 8


class RecordingDataset(list):
    """The training samples, remembering which indices were read (in order; the tests switch
    the read-ahead off, so read = trained on)."""

    def __init__(self, samples) -> None:
        super().__init__(samples)
        self.read: list[int] = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


class Poison(Hook):
    """Multiplies the loss (and so its gradients) by ``factors[n]`` while the model trains on
    global batch ``n`` (1-based; batch n = step n until a rollback skips data): a fault that
    lives in the data, as a real bad batch would.

    It arms the wrapped loss function for the *next* step's forward from ``on_step_end``.
    """

    def __init__(self, factors: dict[int, float]) -> None:
        self.factors = factors
        self.factor = 1.0
        self.params: dict[int, torch.Tensor] = {}
        self.results = {}
        self.lrs: list[tuple[int, float]] = []

    def arm(self, trainer) -> None:
        next_batch = trainer.progress.consumed_samples // lw.GLOBAL_BATCH + 1
        self.factor = self.factors.get(next_batch, 1.0)

    def on_fit_start(self, trainer) -> None:
        self.arm(trainer)

    def on_step_end(self, trainer, result) -> None:
        self.results[result.step] = result
        self.lrs.append((result.step, result.lr))  # every step, a redone one too
        self.params[result.step] = next(trainer.objs.chunks[0].parameters()).detach().clone()
        self.arm(trainer)


NAN_GRAD = "nan-grad"
"""A ``Poison`` factor: the loss stays finite, its gradients are NaN (an overflow in backward)."""
NAN_LOSS = "nan-loss"
"""A ``Poison`` factor: the reported loss is NaN, the gradients stay finite. Only the guard can
drop this update: Megatron's optimizer sees a finite gradient norm and would apply it."""


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(batches, "PREFETCH", 0)
    hook = Poison({})
    real = trainer_module.loss_func

    def poisoned(mask, output, *args, **kwargs):
        loss, tokens, report = real(mask, output, *args, **kwargs)
        f = hook.factor
        if f == NAN_GRAD:
            return _NanGrad.apply(loss), tokens, report
        if f == NAN_LOSS:
            return loss, tokens, {"lm loss": report["lm loss"] * torch.tensor([math.nan, 1.0])}
        return loss * f, tokens, {"lm loss": report["lm loss"] * torch.tensor([f, 1.0])}

    monkeypatch.setattr(trainer_module, "loss_func", poisoned)
    return hook


def _run(tmp_path, hook, *extra: str, steps: int = STEPS, samples: int = 16 * STEPS):
    train = RecordingDataset(lw.synthetic_dataset(samples, seed=1))
    cfg = lw.layout_config(
        "pre", False, "tp1", str(tmp_path / "run"), steps=steps, save_at_end=True, extra=extra
    )
    trainer = build_trainer(
        cfg,
        hooks=[hook],
        datasets=(train, lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, 2)),
        vocab_size=lw.VOCAB,
    )
    try:
        code = trainer.fit()
    finally:
        trainer.close()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return trainer, code, summary, train


# math.nan poisons loss and gradients (Megatron's grad-norm threshold would drop that update
# too); NAN_LOSS keeps the gradients finite, so the update is dropped only if the guard drops it.
@pytest.mark.parametrize("fault", [math.nan, NAN_LOSS], ids=["nan-loss-and-grads", "nan-loss-finite-grads"])
def test_stop_on_nan_loss(single_process_group, tmp_path, poison, fault):
    poison.factors = {3: fault}
    trainer, code, summary, _ = _run(tmp_path, poison, "training.guard.policy=stop")
    assert code == EXIT_DIVERGED and trainer.progress.step == 3
    assert summary["status"] == "diverged" and summary["steps"] == 3
    [event] = summary["guard_events"]
    assert (event["step"], event["kind"], event["action"]) == (3, "nonfinite_loss", "stop")
    assert not (tmp_path / "run" / checkpoint_name(3)).exists()  # nothing saved after the event
    assert torch.equal(poison.params[3], poison.params[2])  # the bad update was not applied


@pytest.mark.parametrize("fault", [math.nan, NAN_LOSS], ids=["nan-loss-and-grads", "nan-loss-finite-grads"])
def test_skip_drops_the_nan_update_and_trains_on(single_process_group, tmp_path, poison, fault):
    poison.factors = {3: fault}
    trainer, code, summary, _ = _run(tmp_path, poison, "training.guard.policy=skip")
    assert code == 0 and summary["status"] == "completed" and summary["steps"] == STEPS
    assert poison.results[3].skipped and not poison.results[4].skipped
    assert torch.equal(poison.params[3], poison.params[2])
    assert torch.isfinite(poison.params[STEPS]).all() and math.isfinite(poison.results[STEPS].loss)
    assert [(e["step"], e["kind"], e["action"]) for e in summary["guard_events"]] == [
        (3, "nonfinite_loss", "skip")
    ]
    assert summary["final_train_loss"] is not None and math.isfinite(summary["final_train_loss"])


def test_skip_drops_an_update_whose_gradients_are_nan_with_a_finite_loss(
    single_process_group, tmp_path, poison
):
    # NaN compares false with Megatron's grad_norm_skip_threshold: without megaspan's help the
    # optimizer applied the NaN update and the run could only stop.
    poison.factors = {3: NAN_GRAD}
    trainer, code, summary, _ = _run(tmp_path, poison, "training.guard.policy=skip")
    assert code == 0 and summary["status"] == "completed" and summary["steps"] == STEPS
    assert math.isfinite(poison.results[3].loss) and poison.results[3].skipped
    assert torch.equal(poison.params[3], poison.params[2])
    assert torch.isfinite(poison.params[STEPS]).all()
    assert [(e["step"], e["kind"], e["action"]) for e in summary["guard_events"]] == [
        (3, "nonfinite_grad", "skip")
    ]


def test_skip_on_a_loss_spike(single_process_group, tmp_path, poison):
    poison.factors = {6: 10.0}
    guard = (
        "training.guard.policy=skip",
        "training.guard.window=3",
        "training.guard.warmup_steps=2",
        "training.guard.spike_factor=2.0",
    )
    trainer, code, summary, _ = _run(tmp_path, poison, *guard)
    assert code == 0
    [event] = summary["guard_events"]
    assert (event["step"], event["kind"], event["action"]) == (6, "loss_spike", "skip")
    assert summary["loss_spikes"] == 1
    assert torch.equal(poison.params[6], poison.params[5])


def test_stop_on_a_finite_loss_spike_saves_nothing(single_process_group, tmp_path, poison):
    """A spike is finite, so the non-finite floor would not refuse a save: the guard's stop must
    itself ask for none (the model after a spike is not one to resume from). _run saves at the end."""
    poison.factors = {6: 10.0}
    trainer, code, summary, _ = _run(
        tmp_path,
        poison,
        "training.guard.policy=stop",
        "training.guard.window=3",
        "training.guard.warmup_steps=2",
        "training.guard.spike_factor=2.0",
    )
    assert code == EXIT_DIVERGED and summary["status"] == "diverged" and trainer.progress.step == 6
    [event] = summary["guard_events"]
    assert (event["step"], event["kind"], event["action"]) == (6, "loss_spike", "stop")
    assert not list((tmp_path / "run").glob("step_*"))


def test_rollback_reloads_the_last_good_checkpoint_and_skips_the_window(
    single_process_group, tmp_path, poison
):
    poison.factors = {5: math.nan}
    trainer, code, summary, train = _run(
        tmp_path,
        poison,
        "training.guard.policy=rollback",
        "checkpoint.save_interval=2",
        "training.guard.rollback_lr_factor=0.5",
        "schedule.decay_steps=20",  # step 5 is mid-decay: its LR depends on max_lr, min_lr and the step
    )
    assert code == 0 and summary["status"] == "completed" and trainer.progress.step == STEPS
    [event] = summary["guard_events"]
    assert (event["step"], event["kind"], event["action"]) == (
        5,
        "nonfinite_loss",
        f"rollback to {checkpoint_name(4)}",
    )
    gb = lw.GLOBAL_BATCH
    # Steps 1-5 read samples [0, 40); after the rollback to step 4 the redone step 5 reads the batch
    # *after* the bad one: [40, 48), and the bad window [32, 40) is never read again.
    first_five = train.read[: 5 * gb]
    after = train.read[5 * gb :]
    assert sorted(first_five) == list(range(0, 5 * gb))
    assert sorted(after) == list(range(5 * gb, 5 * gb + (STEPS - 4) * gb))
    assert not set(after) & set(range(4 * gb, 5 * gb))
    assert trainer.progress.consumed_samples == (STEPS + 1) * gb  # one window skipped
    assert trainer.objs.scheduler.max_lr == pytest.approx(0.5 * 3.0e-3)
    # The LR the redone step 5 really trained at is half the bad step 5's (the LR is affine in
    # max_lr and min_lr): Megatron reads them from the optimizer's param groups, and the reload
    # must put the scheduler back at step 4, not 4 steps past where it was.
    (bad, redone) = [lr for step, lr in poison.lrs if step == 5]
    assert redone == pytest.approx(0.5 * bad) and bad > 3.0e-4
    assert trainer.objs.scheduler.num_steps == STEPS


def test_rollback_retries_are_bounded(single_process_group, tmp_path, poison):
    poison.factors = {s: math.nan for s in range(5, 40)}
    trainer, code, summary, _ = _run(
        tmp_path,
        poison,
        "training.guard.policy=rollback",
        "checkpoint.save_interval=2",
        "training.guard.max_retries=2",
    )
    assert code == EXIT_DIVERGED and summary["status"] == "diverged"
    assert [e["action"] for e in summary["guard_events"]] == [f"rollback to {checkpoint_name(4)}"] * 2 + [
        "stop"
    ]


def test_repeated_rollbacks_compound_the_lr_factor(single_process_group, tmp_path, poison):
    """Two rollbacks at 0.5 train on at 0.25x the LR (not 0.5x, not 0.125x), through the end."""
    poison.factors = {5: math.nan, 8: math.nan}  # global batches: steps 5 and 7 (after one skip)
    trainer, code, summary, _ = _run(
        tmp_path,
        poison,
        "training.guard.policy=rollback",
        "checkpoint.save_interval=2",
        "training.guard.rollback_lr_factor=0.5",
        "training.guard.max_retries=3",
    )
    assert code == 0 and summary["status"] == "completed"
    assert [e["action"] for e in summary["guard_events"]] == [
        f"rollback to {checkpoint_name(4)}",
        f"rollback to {checkpoint_name(6)}",
    ]
    sched = trainer.objs.scheduler
    assert sched.max_lr == pytest.approx(0.25 * 3.0e-3) and sched.min_lr == pytest.approx(0.25 * 3.0e-4)
    # the LR of the last step: past schedule.decay_steps (5), min_lr, scaled twice
    assert poison.results[STEPS].lr == pytest.approx(0.25 * 3.0e-4)
