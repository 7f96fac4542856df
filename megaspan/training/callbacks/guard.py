"""Divergence guard (``training.guard.*``): non-finite loss or gradient norm, and loss spikes.

Detection happens in ``before_optimizer_step``, where this step's all-reduced loss is known and
its update not yet applied, so a bad update is always dropped (every rank decides alike from the
all-reduced loss). Then the policy:

* ``stop``: the run ends with summary status ``diverged`` and exit code :data:`EXIT_DIVERGED` (3);
  the checkpoints already written are kept and nothing after the event is saved;
* ``skip``: the update is dropped and training goes on with the next batch. Non-finite
  gradients with a finite loss are Megatron-Core's to catch (``optimizer.step()`` returns
  ``update_successful=False``: fp16's loss scaler always; bf16/fp32 for an infinite norm through
  ``grad_norm_skip_threshold``, which the guard sets, with a NaN norm reported as infinite so
  that the threshold catches it too: ``training.setup``); a non-finite norm on an update that
  was applied anyway stops the run;
* ``rollback``: reload the last good checkpoint (``load_checkpoint``), continue the data *after*
  the batch that caused the event (the window since that checkpoint is skipped), multiply the LR
  by ``rollback_lr_factor``; after ``max_retries`` rollbacks the run stops as diverged.

Every event is logged (console, TensorBoard ``guard/event`` = 1 at its step) and kept in
``trainer.events`` (the run summary's ``guard_events``).

The guard reads the loss every step: one host sync per step (shared with the preemption check).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from megaspan.errors import ConfigError
from megaspan.training.checkpoint import find_latest_valid
from megaspan.training.hooks import Hook, StepResult

EXIT_DIVERGED = 3
"""Exit code of a run stopped by the divergence guard."""


class SpikeDetector:
    """Loss above ``factor`` x the median of the last ``window`` (finite, accepted) losses, once
    ``warmup_steps`` have passed and the window holds at least a few values."""

    def __init__(self, factor: float, window: int, warmup_steps: int) -> None:
        self.factor = factor
        self.warmup_steps = warmup_steps
        self.history: deque[float] = deque(maxlen=window)

    def is_spike(self, step: int, loss: float) -> float | None:
        """The median the loss is compared with, if it is a spike; else None."""
        if step <= self.warmup_steps or len(self.history) < min(5, self.history.maxlen or 5):
            return None
        median = statistics.median(self.history)
        return median if loss > self.factor * median else None

    def accept(self, loss: float) -> None:
        self.history.append(loss)


def check_guard_config(guard) -> None:
    if guard.spike_factor <= 1.0:
        raise ConfigError(
            f"training.guard.spike_factor={guard.spike_factor} must be > 1 (a multiple of the median loss)"
        )
    if guard.window < 1 or guard.warmup_steps < 0 or guard.max_retries < 0:
        raise ConfigError("training.guard.window must be >= 1, warmup_steps and max_retries >= 0")
    if not 0.0 < guard.rollback_lr_factor <= 1.0:
        raise ConfigError(f"training.guard.rollback_lr_factor={guard.rollback_lr_factor} must be in (0, 1]")


class GuardHook(Hook):
    def __init__(self, guard, ckpt_dir) -> None:
        check_guard_config(guard)
        self.policy = guard.policy
        self.max_retries = guard.max_retries
        self.lr_factor = guard.rollback_lr_factor
        self.ckpt_dir = ckpt_dir
        self.detector = SpikeDetector(guard.spike_factor, guard.window, guard.warmup_steps)
        self.retries = 0
        self.skips_in_a_row = 0
        self._event: tuple[str, str] | None = None  # (kind, reason) of the current step
        self._base_lr: tuple[float, float] | None = None
        self._base_groups: list[tuple[float | None, float | None]] = []

    def on_fit_start(self, trainer) -> None:
        sched = trainer.objs.scheduler
        self._base_lr = (sched.max_lr, sched.min_lr)
        # Megatron's scheduler takes max_lr/min_lr from each optimizer param group when the group
        # has them (as Megatron's own groups do), before its own attributes: scaling only the
        # scheduler's attributes changes nothing.
        groups = trainer.objs.optimizer.param_groups
        self._base_groups = [(g.get("max_lr"), g.get("min_lr")) for g in groups]

    def before_optimizer_step(self, trainer, step: int) -> None:
        loss = trainer.pending.loss
        self._event = None
        if not math.isfinite(loss):
            self._event = ("nonfinite_loss", f"loss {loss}")
        elif (median := self.detector.is_spike(step, loss)) is not None:
            self._event = ("loss_spike", f"loss {loss:.4f} > {self.detector.factor} x median {median:.4f}")
        if self._event is not None:
            trainer.skip_update(self._event[1])  # never apply the update of a bad step

    def on_step_end(self, trainer, result: StepResult) -> None:
        event = self._event
        if event is None and result.grad_norm is not None and not math.isfinite(result.grad_norm):
            if result.skipped:  # Megatron caught it (fp16 scaler, infinite norm): nothing applied
                event = ("nonfinite_grad", f"grad_norm {result.grad_norm} (update skipped by the optimizer)")
            else:
                event = ("nonfinite_grad", f"grad_norm {result.grad_norm} after the update")
                self._record(trainer, result.step, event, "stop")
                trainer.request_stop(
                    f"{event[0]} at step {result.step}", EXIT_DIVERGED, status="diverged", checkpoint=False
                )
                return
        if event is None:
            self.detector.accept(result.loss)
            self.skips_in_a_row = 0
            return
        getattr(self, f"_{self.policy}")(trainer, result, event)

    def _stop(self, trainer, result: StepResult, event) -> None:
        self._record(trainer, result.step, event, "stop")
        trainer.request_stop(
            f"{event[0]} at step {result.step}", EXIT_DIVERGED, status="diverged", checkpoint=False
        )

    def _skip(self, trainer, result: StepResult, event) -> None:
        self.skips_in_a_row += 1
        if self.skips_in_a_row > max(1, self.max_retries):
            self._stop(
                trainer, result, (event[0], f"{event[1]}; {self.skips_in_a_row} skipped updates in a row")
            )
            return
        self._record(trainer, result.step, event, "skip")

    def _rollback(self, trainer, result: StepResult, event) -> None:
        # A background save in flight holds a finite model of an earlier step: commit it first,
        # it is the newest one to go back to.
        trainer.finish_save()
        good = find_latest_valid(self.ckpt_dir)
        if good is None or self.retries >= self.max_retries:
            why = "no checkpoint to roll back to" if good is None else f"{self.retries} rollbacks already"
            self._stop(trainer, result, (event[0], f"{event[1]}; {why}"))
            return
        self.retries += 1
        self._record(trainer, result.step, event, f"rollback to {good.name}")
        # Continue with the data after the batch that caused the event: the window between the
        # checkpoint and this step is skipped (the step counter, and the LR schedule, go back).
        trainer.load(good, consumed_samples=result.consumed_samples)
        scale = self.lr_factor**self.retries
        if scale != 1.0:
            sched = trainer.objs.scheduler
            sched.max_lr, sched.min_lr = self._base_lr[0] * scale, self._base_lr[1] * scale
            # after load(): the optimizer's param groups are the checkpoint's, new dicts
            for group, (max_lr, min_lr) in zip(trainer.objs.optimizer.param_groups, self._base_groups):
                if max_lr is not None:
                    group["max_lr"] = max_lr * scale
                if min_lr is not None:
                    group["min_lr"] = min_lr * scale
            trainer.log.info(f"guard: learning rate scaled by {scale:g} (max_lr {sched.max_lr:.4e})")
        self.detector.history.clear()

    def _record(self, trainer, step: int, event, action: str) -> None:
        kind, reason = event
        trainer.events.append({"step": step, "kind": kind, "reason": reason, "action": action})
        trainer.log.info(f"guard: step {step}: {kind} ({reason}): {action}")
        trainer.log.scalars({"guard/event": 1.0}, step)
