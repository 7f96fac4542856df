"""Die with the launcher: a training process whose launcher was killed with SIGKILL stops too.

``kill -9`` of ``launch/torchrun.sh``, of torchrun or of ``megaspan sweep`` used to leave the
ranks training headless, with nobody left to forward a signal to them. Each launcher adds its
own pid to :data:`WATCH_ENV` in the environment of what it starts (``megaspan sweep``, the
torchrun shim of ``launch/torchrun.sh`` adds its own pid and the script's); a ``megaspan train``
process checks once a second that those pids are still its ancestors, and when one is gone it
sends itself SIGTERM: the usual stop at the next step boundary, with a checkpoint, exit 0
(``training.exit_on_signal=false``: SIGTERM's default, it dies).

Why ancestry and not ``PR_SET_PDEATHSIG``: torchrun starts the ranks from its agent, and the
death signal follows the *thread* that forked (a worker thread ending would kill the rank); it
also only covers the direct parent, not the script above torchrun. Ancestry covers every
launcher layer, survives pid reuse (a reused pid is not an ancestor) and needs no cooperation
from torchrun. A ``megaspan train`` started by hand (under ``nohup`` too) has no watched pid and
is never stopped by this.

Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping

WATCH_ENV = "MEGASPAN_WATCH_PIDS"
"""Space-separated pids of the launchers this process must not outlive."""
INTERVAL_S = 1.0


def parent_of(pid: int) -> int | None:
    """The parent pid from ``/proc/<pid>/stat`` (None if the process is gone or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def ancestors(pid: int | None = None) -> set[int]:
    """The pids above ``pid`` (default: this process) up to the init process."""
    found: set[int] = set()
    current = os.getpid() if pid is None else pid
    while True:
        parent = parent_of(current)
        if not parent or parent in found:
            return found
        found.add(parent)
        current = parent


def child_env(env: Mapping[str, str] | None = None, *pids: int) -> dict[str, str]:
    """``env`` (default: this process's) with ``pids`` (default: this process) added to the watch list."""
    out = dict(os.environ if env is None else env)
    listed = out.get(WATCH_ENV, "").split()
    listed += [str(p) for p in (pids or (os.getpid(),)) if str(p) not in listed]
    out[WATCH_ENV] = " ".join(listed)
    return out


def watched() -> list[int]:
    """The watched pids from the environment that are ancestors of this process now."""
    mine = ancestors()
    pids = []
    for word in os.environ.get(WATCH_ENV, "").split():
        if word.isdigit() and int(word) in mine:
            pids.append(int(word))
    return pids


def stop_with_launchers(
    on_lost: Callable[[int], None] | None = None, interval_s: float = INTERVAL_S
) -> threading.Thread | None:
    """Start a daemon thread that calls ``on_lost(pid)`` (default: a line on stderr, then SIGTERM
    to this process) once a watched launcher is no longer an ancestor. None if nothing is watched."""
    pids = watched()
    if not pids:
        return None

    def lost(pid: int) -> None:
        print(
            f"megaspan: the launcher (pid {pid}) is gone: stopping with a checkpoint (SIGTERM)",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    action = on_lost or lost
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            mine = ancestors()
            gone = [p for p in pids if p not in mine]
            if gone:
                action(gone[0])
                return

    thread = threading.Thread(target=loop, name="megaspan-launcher-watch", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread


def megaspan_command(python: str, nproc: int = 1) -> list[str]:
    """The command line that starts ``megaspan`` with ``nproc`` ranks on this machine (arguments
    follow): ``python -m megaspan``, or torchrun with a private rendezvous (``--standalone``,
    so that concurrent launches never share a port)."""
    if nproc <= 1:
        return [python, "-m", "megaspan"]
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megaspan",
    ]
