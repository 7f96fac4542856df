"""Validation loss at step 0, every ``training.eval_interval`` steps and at the end; the named
``data.valid_sets`` each at the same steps."""

from __future__ import annotations

from megaspan.training.hooks import Hook, StepResult


class EvalHook(Hook):
    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.last_eval: int | None = None

    def run(self, trainer) -> None:
        step = trainer.progress.step
        loss = trainer.evaluate()
        trainer.val_losses.append((step, loss))
        trainer.log.validation(step, loss)
        for name, dataset in trainer.valid_sets.items():
            named = trainer.evaluate(dataset)
            trainer.named_val_losses.setdefault(name, []).append((step, named))
            trainer.log.validation(step, named, name=name)
        self.last_eval = step

    def on_fit_start(self, trainer) -> None:
        self.last_eval = trainer.progress.step
        if trainer.progress.step == 0:
            self.run(trainer)

    def on_step_end(self, trainer, result: StepResult) -> None:
        if result.step % self.interval == 0:
            self.run(trainer)

    def on_fit_end(self, trainer) -> None:
        # A preempted or stopped run ends fast; its final evaluation happens after the resume.
        if trainer.finished and self.last_eval != trainer.progress.step:
            self.run(trainer)
