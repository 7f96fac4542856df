"""Preemption: SIGTERM/SIGUSR1 request a checkpoint-and-exit at the next step boundary.

The handler only records the signal. Saving inside a handler would run in the middle of a
forward/backward or a collective, and ranks receive signals at different moments, so every rank
instead checks :meth:`PreemptionFlag.agreed` at the same step boundary, which all-reduces the
flag (MAX): if any rank was signalled, all ranks stop after the same step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank has been signalled (collective)."""
        flag = torch.tensor([0 if self.signum is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
