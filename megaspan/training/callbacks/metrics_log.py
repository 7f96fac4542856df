"""Console/``train.log``/TensorBoard line every ``logging.log_interval`` steps."""

from __future__ import annotations

from megaspan.training.hooks import Hook, StepResult
from megaspan.training.metrics import StepStats


class LogHook(Hook):
    """Mean loss of the steps since the last line; the losses are read from the device only here."""

    def __init__(self, interval: int, total_steps: int) -> None:
        self.interval = interval
        self.total_steps = total_steps
        self.window: list[StepResult] = []
        self.step_times: list[float] = []

    def on_step_end(self, trainer, result: StepResult) -> None:
        self.window.append(result)
        self.step_times.append(result.step_time_s)
        if result.step % self.interval == 0 or result.step == self.total_steps:
            self.flush(trainer)

    def on_fit_end(self, trainer) -> None:
        self.flush(trainer)  # a stop between log steps still prints its last losses

    def flush(self, trainer) -> None:
        if not self.window:
            return
        window, self.window = self.window, []
        # The first read waits for the device; the window's older steps are long done by then.
        losses = [r.loss for r in window]
        last = window[-1]
        tokens_per_step = last.tokens
        # Step time only: validation and checkpoint time would understate throughput.
        elapsed = sum(self.step_times[-len(losses) :])
        # The first step of a process pays one-off costs; leave it out of the ETA.
        recent = (self.step_times[1:] or self.step_times)[-20:]
        trainer.log.train_step(
            StepStats(
                step=last.step,
                loss=sum(losses) / len(losses),
                lr=last.lr,
                grad_norm=last.grad_norm,
                tokens_per_s=tokens_per_step * len(losses) / max(elapsed, 1e-9),
                loss_scale=trainer.loss_scale(),
            ),
            seconds_per_step=sum(recent) / len(recent),
        )
