"""Checkpoint every ``checkpoint.save_interval`` steps, at the end, and before a requested stop.

Pruning (``checkpoint.keep_last``) is part of each save's commit (:func:`save_checkpoint`).
"""

from __future__ import annotations

from megaspan.training.hooks import Hook, StepResult


class CheckpointHook(Hook):
    def __init__(self, interval: int | None, save_at_end: bool) -> None:
        self.interval = interval
        self.save_at_end = save_at_end
        self.last_saved: int | None = None

    def on_fit_start(self, trainer) -> None:
        self.last_saved = trainer.progress.step

    def on_step_end(self, trainer, result: StepResult) -> None:
        # Not after a stop request (a diverged model is not saved) or a rollback (progress went back).
        rolled_back = trainer.progress.step != result.step
        if self.interval and result.step % self.interval == 0 and trainer.stop is None and not rolled_back:
            self.save(trainer)

    def save(self, trainer) -> None:
        trainer.save()
        self.last_saved = trainer.progress.step

    def on_fit_end(self, trainer) -> None:
        if self.last_saved == trainer.progress.step:
            return
        wanted = trainer.stop.checkpoint if trainer.stop is not None else self.save_at_end
        if wanted:
            self.save(trainer)
