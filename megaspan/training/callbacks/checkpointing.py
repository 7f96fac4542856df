"""Checkpoint every ``checkpoint.save_interval`` steps, at the end, and before a requested stop.

Pruning (``checkpoint.keep_last``) is part of each save's commit (:func:`save_checkpoint`).

With ``checkpoint.async_save`` the interval saves are written in the background
(:meth:`Trainer.save`): each step boundary commits one that every rank has written, the next
save waits for the one before, and the end of training (including a stop signal: SIGTERM,
SIGUSR1, a first Ctrl-C) waits for the one in flight, commits it, then saves synchronously.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from megaspan.training.hooks import Hook, StepResult


class CheckpointHook(Hook):
    def __init__(self, interval: int | None, save_at_end: bool) -> None:
        self.interval = interval
        self.save_at_end = save_at_end
        self.last_saved: int | None = None

    def on_fit_start(self, trainer) -> None:
        self.last_saved = trainer.progress.step

    def on_step_end(self, trainer, result: StepResult) -> None:
        trainer.finish_save(wait=False)
        # Not after a stop request (a diverged model is not saved) or a rollback (progress went back).
        rolled_back = trainer.progress.step != result.step
        if self.interval and result.step % self.interval == 0 and trainer.stop is None and not rolled_back:
            self.save(trainer, background=True)

    def save(self, trainer, background: bool = False) -> None:
        trainer.save(background=background)
        self.last_saved = trainer.progress.step

    def on_fit_end(self, trainer) -> None:
        trainer.finish_save()
        if self.last_saved == trainer.progress.step:
            return
        wanted = trainer.stop.checkpoint if trainer.stop is not None else self.save_at_end
        if wanted:
            self.save(trainer)

    def on_error(self, trainer, exc: BaseException) -> None:
        """A background save in flight when training fails holds a complete, finite snapshot of
        its step: a synchronous save would have committed it already, so commit it now. Only a
        single process does: with peers, one may be dead and the commit's collectives would hang
        (the ``tmp-step_N`` is then removed at the next start). Not after an abort (a second
        Ctrl-C): that asks to stop at once."""
        pending = getattr(trainer, "saving", None)
        if pending is None:
            return
        alone = not dist.is_initialized() or dist.get_world_size() == 1
        if alone and not isinstance(exc, KeyboardInterrupt):
            try:
                trainer.finish_save()
                return
            except Exception as commit_error:  # the training error is the one to report
                why = f"its commit failed ({commit_error})"
        else:
            why = "the run failed with other ranks" if not alone else "training was aborted"
            trainer.saving = None
        print(
            f"megaspan: warning: the background save of step {pending.step} was not committed: {why}; "
            f"its partial {pending.tmp.name} is removed at the next start",
            file=sys.stderr,
            flush=True,
        )
