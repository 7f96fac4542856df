"""Stop requests: SIGTERM/SIGUSR1/SIGINT ask for a checkpoint-and-exit at the next step boundary.

The handler only records the signal. Saving inside a handler would run in the middle of a
forward/backward or a collective, and ranks receive signals at different moments, so every rank
instead checks :meth:`PreemptionFlag.agreed` at the same step boundary, which all-reduces the
flag (MAX): if any rank was signalled, all ranks stop after the same step.

Because the handler only sets a flag, a signal that arrives *during* a checkpoint save does not
interrupt it: Python runs the handler between bytecodes of the main thread, it returns, and
interrupted system calls are retried (PEP 475). The save finishes, then the loop stops.

| signal | effect |
| --- | --- |
| SIGTERM, SIGUSR1 | checkpoint at the step boundary, exit 0 (``exit_code``) |
| SIGINT (Ctrl-C) | first: like SIGTERM but exit 130; second: abort at once (KeyboardInterrupt, exit 130) |
| SIGHUP, SIGQUIT, SIGKILL | not handled: the process dies; resume from the last periodic save |

SIGINT inherited as *ignored* (a job started with ``&`` from a non-interactive script, which is
how bash starts background jobs): the handler is installed anyway. A SIGINT that reaches the
process is then either a user's Ctrl-C or an explicit ``kill -INT``, and the response is a
checkpoint and a clean stop, which loses nothing; keeping it ignored would make ``kill -INT``
silently do nothing and train on. ``training.exit_on_signal=false`` leaves every disposition as
inherited.

After the run (:meth:`PreemptionFlag.finish`, the ``megaspan`` process about to exit), SIGTERM and
SIGUSR1 are ignored: the exit code is decided and the checkpoint written, and a scheduler's
SIGTERM during teardown made a completed run exit -15.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

from megaspan.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGUSR1: 0, signal.SIGINT: 130}
"""Exit code after a clean signal checkpoint: 0 for the scheduler's signals (Slurm requeues on
0), 128 + 2 for Ctrl-C, as a shell expects from an interrupted command."""


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._agreed_code: int | None = None
        self._previous: dict[int, object] = {}
        self.saved_step: int | None = None
        """Set once the stop checkpoint is written: a second Ctrl-C then loses nothing."""

    def install(self) -> None:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def finish(self) -> None:
        """The run is over and the process exits next: SIGTERM/SIGUSR1 no longer change anything
        (ignored, so teardown ends with the run's own exit code); Ctrl-C still aborts (exit 130)."""
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            # The second Ctrl-C: the user does not want to wait (main() turns this into exit 130).
            if self.saved_step is not None:
                what = (
                    f"the checkpoint of step {self.saved_step} is saved; exiting without waiting for teardown"
                )
            else:
                what = "aborting without a checkpoint (the last saved one is intact)"
            print(f"megaspan: interrupted again: {what}", file=sys.stderr, flush=True)
            raise Interrupted
        if self.signum is None:  # the first signal decides the exit code
            self.signum = signum

    @property
    def exit_code(self) -> int:
        """The process exit code after the signal checkpoint: 0 for SIGTERM/SIGUSR1, 130 for
        SIGINT; after :meth:`agreed`, the highest over all ranks (a rank stopped by a peer's
        signal exits like the peer)."""
        if self._agreed_code is not None:
            return self._agreed_code
        return EXIT_CODES.get(self.signum, 0) if self.signum is not None else 0

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank has been signalled (collective)."""
        code = self.exit_code
        flag = torch.tensor([0 if self.signum is None else 1, code], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bool(flag[0].item()):
            self._agreed_code = int(flag[1].item())
            return True
        return False
