"""The trainer's extension point: a :class:`Hook` sees the loop at five moments.

``Trainer.fit`` is only the step loop; everything periodic (logging, evaluation, checkpoints,
preemption, diagnostics, the divergence guard, the run summary) is a hook that owns its own
interval and state. A new periodic concern is one ``Hook`` subclass in one file, passed to
``build_trainer(cfg, hooks=[...])``; nothing in the loop changes.

Order: hooks run in list order; the built-in ones first (guard, logging, evaluation,
downstream evaluation, checkpointing, preemption, summary), then the caller's. Every method is collective-safe only if
it does the same collectives on every rank: a hook that evaluates or saves must run on all ranks
(it does: hooks are constructed on every rank; rank-0-only output is the logger's business).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from megaspan.training.trainer import Trainer


class Reduced:
    """This step's one all-reduced tensor ``[loss sum, token count, ranks signalled]``, read to the
    host at most once and only when someone asks (a log step, a guard, the preemption check)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor
        self._values: list[float] | None = None

    def values(self) -> list[float]:
        if self._values is None:
            self._values = self._tensor.tolist()  # the one host sync of the step, if any
        return self._values

    @property
    def tensor(self) -> torch.Tensor:
        return self._tensor

    @property
    def synced(self) -> bool:
        """Already read to the host (by a log step, a guard or the preemption check)."""
        return self._values is not None


@dataclass
class StepResult:
    """What hooks receive after optimizer step ``step`` (1-based).

    ``loss`` (token-weighted mean over micro-batches and data-parallel replicas) and ``signalled``
    are read from the device lazily: a step whose hooks never look at them costs no host sync.
    """

    step: int
    grad_norm: float | None
    lr: float
    num_zeros: float | None
    skipped: bool  # no parameter update happened (non-finite grads, or a guard skipped it)
    step_time_s: float
    tokens: int  # tokens of this global batch
    consumed_samples: int  # after this step
    reduced: Reduced = field(repr=False)

    @property
    def loss(self) -> float:
        loss_sum, tokens, _ = self.reduced.values()
        return loss_sum / max(tokens, 1.0)

    @property
    def signalled(self) -> bool:
        """Some rank has received a preemption signal (the same answer on every rank)."""
        return self.reduced.values()[2] > 0


@dataclass(frozen=True)
class StopRequest:
    reason: str
    exit_code: int
    status: str  # summary status: completed | diverged | preempted | failed
    checkpoint: bool  # save the current state before exiting (if not saved at this step)


class Hook:
    """Base class: override what you need; every method is a no-op by default."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, after the model is built and a checkpoint (if any) restored, before step 1."""

    def before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """After forward/backward of step ``step`` (gradients reduced, not yet clipped), before the
        parameter update. ``trainer.pending`` holds this step's reported loss (lazy)."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """After the update of ``result.step``; ``trainer.progress`` already counts it."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step, or after a stop request (``trainer.stop`` says which)."""

    def on_error(self, trainer: Trainer, exc: BaseException) -> None:
        """An exception escaped the loop (it is re-raised after every hook has seen it)."""


def call(hooks: list[Hook], method: str, *args: Any) -> None:
    for hook in hooks:
        getattr(hook, method)(*args)
