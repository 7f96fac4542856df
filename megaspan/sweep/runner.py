"""Run a sweep's cells on this machine: each cell is one ``megaspan train`` subprocess.

A subprocess per cell means a crashed or diverged cell cannot take the sweep down with it, and
every cell starts from a clean process (Megatron keeps global parallel state). The runner is
resumable: cells whose summary says completed/diverged are skipped, every other cell is started
with ``checkpoint.resume=auto`` so a preempted or interrupted cell continues from its checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megaspan.launchers import child_env
from megaspan.sweep.spec import SweepError, cell_args, freeze
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
    if nproc > 1:
        # --standalone: a private rendezvous per cell, so concurrent cells never share a port.
        launcher = [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "megaspan",
        ]
    else:
        launcher = [python, "-m", "megaspan"]
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
) -> tuple[int, list[CellResult]]:
    """Run every unfinished cell (``jobs`` at a time); returns (exit code, results in cell order).

    Exit code 0 when every cell completed or diverged, 1 when some failed or were preempted (rerun
    the same command to resume them), 130 when interrupted. A cell that failed under the runner
    (its exit code recorded) is skipped unless ``retry_failed``: a cell that fails at every start
    must not be started again by every run of the sweep.
    """
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    if nproc < 1:
        raise SweepError(f"--nproc must be >= 1, got {nproc}")
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir(sweep)
    runs_dir.mkdir(parents=True, exist_ok=True)
    freeze(sweep, runs_dir / FROZEN)
    cells = sweep["cells"]
    total = len(cells)
    results: dict[int, CellResult] = {}
    todo: list[int] = []
    done = 0
    for cell in cells:
        run_dir = runs_dir / cell["name"]
        if run_status(run_dir) in FINISHED or (not retry_failed and run_status(run_dir) == "failed"):
            done += 1
            results[cell["index"]] = _result(
                cell["index"], cell["name"], run_dir, wall_s=None, rc=None, skipped=True
            )
            echo(progress_line(done, total, results[cell["index"]], None))
        else:
            todo.append(cell["index"])

    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    walls: list[float] = []
    start_queue = list(todo)
    interrupted = False
    try:
        while start_queue or running:
            while start_queue and len(running) < jobs:
                index = start_queue.pop(0)
                run_dir = runs_dir / cells[index]["name"]
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / EXIT_FILE).unlink(missing_ok=True)
                log = open(run_dir / CELL_LOG, "a")  # noqa: SIM115 - closed when the cell ends
                cmd = train_command(sweep, index, run_dir, extra=extra, nproc=nproc, python=python)
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                # child_env: the cell stops (with a checkpoint) when this runner is killed -9.
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env()
                )
                running[index] = (proc, time.monotonic(), log)
            time.sleep(0.2)
            for index in [i for i, (p, _, _) in running.items() if p.poll() is not None]:
                proc, started, log = running.pop(index)
                log.close()
                wall = time.monotonic() - started
                walls.append(wall)
                run_dir = runs_dir / cells[index]["name"]
                results[index] = _result(
                    index, cells[index]["name"], run_dir, wall_s=wall, rc=proc.returncode, skipped=False
                )
                done += 1
                remaining = len(start_queue) + len(running)
                eta = sum(walls) / len(walls) * remaining / jobs if remaining else 0.0
                echo(progress_line(done, total, results[index], eta))
    except KeyboardInterrupt:
        interrupted = True
        # Ctrl-C reached the running cells too (same foreground process group): each saves a
        # checkpoint and exits. Do not signal them again -- the trainer treats a second SIGINT as
        # "abort now" -- just wait; a second Ctrl-C here aborts them and the sweep.
        echo("interrupted: waiting for the running cells to save their checkpoints")
        for proc, _, log in running.values():
            proc.wait()
            log.close()
        echo(
            f"interrupted: {len(running) + len(start_queue)} cells unfinished; run the same command "
            "again to resume them"
        )

    ordered = [results[i] for i in sorted(results)]
    counts: dict[str, int] = {}
    for r in ordered:
        counts[r.status] = counts.get(r.status, 0) + 1
    echo(
        f"sweep {sweep['name']}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f" of {total} cells in {runs_dir}"
    )
    if interrupted:
        return 130, ordered
    ok = all(r.status in FINISHED for r in ordered) and len(ordered) == total
    return (0 if ok else 1), ordered


def sweep_status(sweep: dict, runs_dir: Path) -> list[tuple[dict, str]]:
    """(cell, status) for every cell of the sweep, without running anything."""
    return [(cell, status_label(Path(runs_dir) / cell["name"])) for cell in sweep["cells"]]
