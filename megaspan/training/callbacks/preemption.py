"""Stop at the step boundary after a stop signal (SIGTERM/SIGUSR1/SIGINT) on any rank.

The signal handler (:class:`megaspan.training.signals.PreemptionFlag`) only sets a flag; the
trainer folds it into the step's one all-reduce, so every rank stops after the same step. The
flag is read every step: that read is the step's host sync, which Megatron's optimizer has already
paid (its gradient norm is a Python float), so it costs no extra stall.
"""

from __future__ import annotations

import signal

import torch.distributed as dist

from megaspan.training.hooks import Hook, StepResult

PREEMPTED_MARKER = "preempted"


class PreemptionHook(Hook):
    def __init__(self, flag, run_dir) -> None:
        self.flag = flag
        self.run_dir = run_dir

    def on_step_end(self, trainer, result: StepResult) -> None:
        if trainer.stop is None and result.signalled:
            # Once per run, on every rank alike: agree on the exit code (the highest; Ctrl-C on one
            # rank makes every rank exit 130).
            self.flag.agreed(trainer.device)
            trainer.request_stop(
                f"signal {self._name()}", self.flag.exit_code, status="preempted", checkpoint=True
            )

    def on_fit_end(self, trainer) -> None:
        stop = trainer.stop
        if stop is None and dist.get_rank() == 0:
            # A completed run is no longer preempted (the marker of an earlier stop would make the
            # sweep runner report it as preempted and run it again).
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        if stop is None or stop.status != "preempted":
            return
        step = trainer.progress.step
        if stop.checkpoint:
            self.flag.saved_step = step  # the checkpoint hook ran before this one
        trainer.log.info(
            f"stopping on {self._name()} at step {step}: checkpoint saved, exiting {stop.exit_code}"
        )
        if dist.get_rank() == 0:
            (self.run_dir / PREEMPTED_MARKER).write_text(f"step {step} signal {self._name()}\n")

    def _name(self) -> str:
        return signal.Signals(self.flag.signum).name if self.flag.signum else "peer"
