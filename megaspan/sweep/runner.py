"""Run a sweep's cells on this machine: each cell is one ``megaspan train``, in its own
subprocess or (``in_process``) in one of ``jobs`` long-lived worker processes.

A subprocess per cell means a crashed or diverged cell cannot take the sweep down with it, and
every cell starts from a clean process (Megatron keeps global parallel state). The runner is
resumable: cells whose summary says completed/diverged are skipped, every other cell is started
with ``checkpoint.resume=auto`` so a preempted or interrupted cell continues from its checkpoint.
Workers (:mod:`megaspan.sweep.worker`) trade the first isolation for the ~12 s of start-up a small
CPU cell would otherwise pay: a cell that kills its worker fails alone, and a new worker takes the
remaining cells.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megaspan.launchers import child_env, megaspan_command
from megaspan.sweep.spec import SweepError, cell_args, freeze
from megaspan.sweep.stages import stage2_cells
from megaspan.sweep.status import EXIT_FILE, FINISHED, final_loss, read_summary, run_status, status_label

CELL_LOG = "sweep-cell.log"
"""stdout+stderr of the cell's ``megaspan train`` (train.log holds the trainer's own log)."""
FROZEN = "sweep.json"
"""The resolved cells, written next to the cell dirs: the report reads axis values from it."""


@dataclass
class CellResult:
    index: int
    name: str
    status: str
    loss: float | None
    loss_kind: str
    wall_s: float | None
    returncode: int | None
    skipped: bool


def default_runs_dir(sweep: dict) -> Path:
    return Path("runs") / sweep["name"]


def train_command(
    sweep: dict,
    index: int,
    run_dir: Path,
    *,
    extra: Sequence[str] = (),
    nproc: int = 1,
    python: str = sys.executable,
) -> list[str]:
    """The ``megaspan train`` command of one cell (resume=auto first, so the sweep can override it)."""
    args = cell_args(sweep, index)
    config = args[:2] if args[:1] == ["--config"] else []
    overrides = args[len(config) :]
    launcher = megaspan_command(python, nproc)
    return [
        *launcher,
        "train",
        *config,
        "checkpoint.resume=auto",
        *overrides,
        *extra,
        f"training.run_dir={run_dir}",
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(done: int, total: int, result: CellResult, eta_s: float | None) -> str:
    loss = "loss -" if result.loss is None else f"{result.loss_kind} loss {result.loss:.4f}"
    status = f"skipped ({result.status})" if result.skipped else result.status
    if not result.skipped and result.status not in FINISHED | {"preempted"} and result.returncode:
        status += f" (exit {result.returncode})"
    time_s = "" if result.skipped else f" | {_duration(result.wall_s)}"
    return (
        f"[{done}/{total}] {result.name} | {status} | {loss}{time_s}"
        f" | sweep ETA {_duration(eta_s) if eta_s is not None else '-'}"
    )


def _result(
    index: int, name: str, run_dir: Path, *, wall_s: float | None, rc: int | None, skipped: bool
) -> CellResult:
    summary = read_summary(run_dir)
    status = run_status(run_dir, summary)
    if summary is None and rc is not None:
        # No summary (a trainer without summary.json, or a crash before writing it): the exit
        # code is all we know.
        status = (
            "completed"
            if rc == 0 and not (run_dir / "preempted").exists()
            else ("preempted" if rc == 0 else "failed")
        )
    if not skipped and rc and status not in FINISHED | {"preempted"}:
        (run_dir / EXIT_FILE).write_text(f"{rc}\n")
        status = "failed"
    loss, kind = final_loss(summary)
    if skipped and status == "failed":
        status = status_label(run_dir, summary)
    return CellResult(index, name, status, loss, kind, wall_s, rc, skipped)


class _Subprocesses:
    """One ``megaspan train`` process per cell (``--isolate``, multi-process cells, Slurm-like)."""

    def __init__(self, jobs: int, env: dict[str, str]) -> None:
        self.jobs, self.env = jobs, env
        self.running: dict[int, tuple[subprocess.Popen, float, object]] = {}

    def free(self) -> bool:
        return len(self.running) < self.jobs

    def busy(self) -> bool:
        return bool(self.running)

    def start(self, index: int, cmd: list[str], log_path: Path) -> None:
        log = open(log_path, "a")  # noqa: SIM115 - closed when the cell ends
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )
        self.running[index] = (proc, time.monotonic(), log)

    def finished(self, timeout: float) -> list[tuple[int, int | None, float]]:
        time.sleep(timeout)
        out = []
        for index in [i for i, (p, _, _) in self.running.items() if p.poll() is not None]:
            proc, started, log = self.running.pop(index)
            log.close()
            out.append((index, proc.returncode, time.monotonic() - started))
        return out

    def interrupt(self) -> None:
        # Ctrl-C reached the running cells too (same foreground process group): each saves a
        # checkpoint and exits. Do not signal them again -- the trainer treats a second SIGINT as
        # "abort now" -- just wait; a second Ctrl-C here aborts them and the sweep.
        for proc, _, log in self.running.values():
            proc.wait()
            log.close()


class _Workers:
    """``jobs`` long-lived ``python -m megaspan.sweep.worker`` processes, one cell at a time each:
    the ~12 s of imports per cell are paid once per worker (see :mod:`megaspan.sweep.worker`)."""

    def __init__(self, jobs: int, env: dict[str, str], python: str, log_dir: Path, entry: str | None) -> None:
        self.jobs, self.env, self.python, self.log_dir, self.entry = jobs, env, python, log_dir, entry
        self.idle: list[subprocess.Popen] = []
        self.running: dict[int, tuple[subprocess.Popen, float]] = {}
        self.replies: queue.Queue = queue.Queue()
        self.count = 0

    def _spawn(self) -> subprocess.Popen:
        self.count += 1
        err = open(self.log_dir / f"worker-{self.count}.log", "a")  # noqa: SIM115 - owned by the process
        cmd = [self.python, "-m", "megaspan.sweep.worker"] + ([self.entry] if self.entry else [])
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=self.env, text=True, bufsize=1
        )
        err.close()

        def read() -> None:
            for line in proc.stdout:
                try:
                    self.replies.put((proc, json.loads(line)))
                except ValueError:
                    continue
            self.replies.put((proc, None))  # EOF: the worker ended

        threading.Thread(target=read, daemon=True).start()
        return proc

    def free(self) -> bool:
        return len(self.running) < self.jobs

    def busy(self) -> bool:
        return bool(self.running)

    def start(self, index: int, cmd: list[str], log_path: Path) -> None:
        proc = self.idle.pop() if self.idle else self._spawn()
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}  (in worker pid {proc.pid})\n")
        argv = cmd[cmd.index("megaspan") + 1 :]
        proc.stdin.write(json.dumps({"index": index, "argv": argv, "log": str(log_path)}) + "\n")
        proc.stdin.flush()
        self.running[index] = (proc, time.monotonic())

    def finished(self, timeout: float) -> list[tuple[int, int | None, float]]:
        out = []
        try:
            proc, reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            return out
        if reply is not None:
            index = int(reply["index"])
            _, started = self.running.pop(index)
            self.idle.append(proc)
            out.append((index, reply.get("rc"), time.monotonic() - started))
        else:  # the worker died (a crash in a cell): that cell failed; later cells get a new worker
            for index in [i for i, (p, _) in self.running.items() if p is proc]:
                _, started = self.running.pop(index)
                out.append((index, proc.wait(), time.monotonic() - started))
            if proc in self.idle:
                self.idle.remove(proc)
        return out

    def interrupt(self) -> None:
        # The workers got the Ctrl-C too: a cell in flight saves its checkpoint and its worker
        # exits. EOF first, then wait: a worker whose cell had just finished is back reading its
        # stdin and would otherwise wait for a next cell forever (a second Ctrl-C aborts).
        self.close()

    def close(self) -> None:
        procs = self.idle + [p for p, _ in self.running.values()]
        for proc in procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in procs:
            proc.wait()
        self.idle.clear()
        self.running.clear()


def cell_env(jobs: int) -> dict[str, str]:
    """The cells' environment: one share of the CPU cores each (``OMP_NUM_THREADS``), unless the
    user set it: ``jobs`` cells of torch's default (all cores each) oversubscribe the machine."""
    # child_env: the cells stop (with a checkpoint) when this runner is killed -9.
    env = child_env()
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_local(
    sweep: dict,
    runs_dir: Path | None = None,
    *,
    jobs: int = 1,
    extra: Sequence[str] = (),
    nproc: int = 1,
    python: str = sys.executable,
    echo: Callable[[str], None] = print,
    retry_failed: bool = False,
    in_process: bool = False,
    worker_entry: str | None = None,
) -> tuple[int, list[CellResult]]:
    """Run every unfinished cell (``jobs`` at a time); returns (exit code, results in cell order).

    ``in_process``: run the cells in ``jobs`` long-lived worker processes instead of one process
    per cell (single-process cells only). A sweep with ``best_lr_seeds`` adds its stage-2 cells
    (:mod:`megaspan.sweep.stages`) as soon as a group's LR grid has finished, and records them in
    ``sweep.json``.

    Exit code 0 when every cell completed or diverged, 1 when some failed or were preempted (rerun
    the same command to resume them), 130 when interrupted. A cell that failed under the runner
    (its exit code recorded) is skipped unless ``retry_failed``: a cell that fails at every start
    must not be started again by every run of the sweep.
    """
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    if nproc < 1:
        raise SweepError(f"--nproc must be >= 1, got {nproc}")
    if in_process and nproc > 1:
        raise SweepError("in-process workers run single-process cells; use --isolate with --nproc > 1")
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir(sweep)
    runs_dir.mkdir(parents=True, exist_ok=True)
    sweep = dict(sweep, cells=[c for c in sweep["cells"] if not c.get("stage2")])
    freeze(sweep, runs_dir / FROZEN)
    cells = sweep["cells"]
    n_stage2 = _expected_stage2(sweep)
    results: dict[int, CellResult] = {}
    start_queue: list[int] = []
    done = 0

    def total() -> int:
        return len(cells) + n_stage2 - sum(1 for c in cells if c.get("stage2"))

    def admit(new_cells: list[dict], first: bool = False) -> None:
        nonlocal done
        ahead = 0
        for cell in new_cells:
            run_dir = runs_dir / cell["name"]
            status = run_status(run_dir)
            if status in FINISHED or (not retry_failed and status == "failed"):
                done += 1
                results[cell["index"]] = _result(
                    cell["index"], cell["name"], run_dir, wall_s=None, rc=None, skipped=True
                )
                echo(progress_line(done, total(), results[cell["index"]], None))
            elif first:
                # Stage-2 seeds go ahead of the remaining grid: a sweep stopped early then holds
                # whole groups (grid + seeds) rather than a grid with no seeds anywhere.
                start_queue.insert(ahead, cell["index"])
                ahead += 1
            else:
                start_queue.append(cell["index"])

    def add_stage2() -> None:
        new = stage2_cells(sweep, runs_dir)
        if new:
            cells.extend(new)
            freeze(sweep, runs_dir / FROZEN)
            admit(new, first=True)

    admit(list(cells))
    add_stage2()

    env = cell_env(jobs)
    pool = _Workers(jobs, env, python, runs_dir, worker_entry) if in_process else _Subprocesses(jobs, env)
    walls: list[float] = []
    interrupted = False
    # SIGINT inherited as ignored (a sweep started with `&` from a script, or by a CI runner that
    # does): Ctrl-C / `kill -INT` still stops the sweep, as it stops `megaspan train` (see
    # megaspan.training.signals). The cells' processes get the default disposition back at exec.
    inherited = signal.getsignal(signal.SIGINT)
    if inherited is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while start_queue or pool.busy():
            while start_queue and pool.free():
                index = start_queue.pop(0)
                run_dir = runs_dir / cells[index]["name"]
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / EXIT_FILE).unlink(missing_ok=True)
                cmd = train_command(sweep, index, run_dir, extra=extra, nproc=nproc, python=python)
                pool.start(index, cmd, run_dir / CELL_LOG)
            for index, rc, wall in pool.finished(0.2):
                walls.append(wall)
                run_dir = runs_dir / cells[index]["name"]
                results[index] = _result(
                    index, cells[index]["name"], run_dir, wall_s=wall, rc=rc, skipped=False
                )
                done += 1
                add_stage2()
                remaining = total() - done
                eta = sum(walls) / len(walls) * remaining / jobs if remaining else 0.0
                echo(progress_line(done, total(), results[index], eta))
                if rc == 130:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        echo("interrupted: waiting for the running cells to save their checkpoints")
        pool.interrupt()
        echo(f"interrupted: {total() - done} cells unfinished; run the same command again to resume them")
    finally:
        if isinstance(pool, _Workers):
            pool.close()
        if inherited is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    ordered = [results[i] for i in sorted(results)]
    counts: dict[str, int] = {}
    for r in ordered:
        counts[r.status] = counts.get(r.status, 0) + 1
    echo(
        f"sweep {sweep['name']}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f" of {total()} cells in {runs_dir}"
    )
    if interrupted:
        return 130, ordered
    ok = all(r.status in FINISHED for r in ordered) and len(ordered) == total()
    return (0 if ok else 1), ordered


def _expected_stage2(sweep: dict) -> int:
    """Stage-2 cells the sweep will add (an upper bound when a grid seed is also a stage-2 seed)."""
    seeds = sweep.get("best_lr_seeds") or []
    if not seeds:
        return 0
    from megaspan.sweep.stages import group_key

    return len({group_key(c) for c in sweep["cells"] if not c.get("stage2")}) * len(seeds)


def sweep_status(sweep: dict, runs_dir: Path) -> list[tuple[dict, str]]:
    """(cell, status) for every cell of the sweep, without running anything."""
    return [(cell, status_label(Path(runs_dir) / cell["name"])) for cell in sweep["cells"]]
