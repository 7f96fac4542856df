"""kill -9 of a launcher leaves no training process behind (issue 20, item 5).

Before: ``kill -9`` of ``launch/torchrun.sh`` or of ``megaspan sweep`` left the ranks (and
torchrun) training headless, with nobody to forward a signal. Now each launcher lists its pid in
``MEGASPAN_WATCH_PIDS`` and the ranks stop, with a checkpoint, once it is gone. Every test starts
its launcher in a new session (setsid) and SIGKILLs only the launcher, then kills whatever is left
of the session itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megaspan.launchers import WATCH_ENV, ancestors, child_env
from tests.helpers.cli import clean_env, long_torchrun

pytestmark = [pytest.mark.integration]

STOP_LIMIT_S = 120
"""A rank stops at its next step boundary and saves first (seconds on a loaded 2-core machine)."""


def _survivors(procs: list[psutil.Process], limit_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + limit_s
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for(proc: subprocess.Popen, path: Path, text: str, limit_s: float = 400) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        content = path.read_text() if path.is_file() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"never saw {text!r} in {path} (exit {proc.poll()}):\n{content[-3000:]}")


def test_ancestry_and_watch_list() -> None:
    assert os.getppid() in ancestors()
    env = child_env({WATCH_ENV: "12"}, 34, 12)
    assert env[WATCH_ENV] == "12 34"
    assert child_env({})[WATCH_ENV] == str(os.getpid())


def test_a_watching_process_dies_with_its_killed_launcher(tmp_path: Path) -> None:
    """The mechanism alone, in a second: `bash` (the launcher) starts a Python child that watches
    it; kill -9 of bash makes the child SIGTERM itself."""
    child = (
        "import time; from megaspan.launchers import stop_with_launchers\n"
        "assert stop_with_launchers(interval_s=0.1) is not None\n"
        "print('watching', flush=True); time.sleep(60)"
    )
    script = f'MEGASPAN_WATCH_PIDS=$$ {sys.executable} -c "{child}" & echo $!; wait'
    launcher = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, text=True, env=clean_env(), start_new_session=True
    )
    try:
        pid = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "watching"
        watcher = psutil.Process(pid)
        launcher.kill()
        launcher.wait()
        assert not _survivors([watcher], 10), "the child outlived its killed launcher"
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)


def test_kill_9_of_torchrun_sh_stops_the_ranks_with_a_checkpoint(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "out.log"
    command, env = long_torchrun(run, save_interval=1000)
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    procs: list[psutil.Process] = []
    try:
        _wait_for(launcher, log, "step 2/")
        procs = psutil.Process(launcher.pid).children(recursive=True)
        assert len(procs) >= 3, [p.cmdline() for p in procs]  # torchrun + 2 ranks
        launcher.kill()  # SIGKILL: no trap runs, nothing is forwarded
        launcher.wait()
        alive = _survivors(procs, STOP_LIMIT_S)
        assert not alive, f"left running after kill -9 of torchrun.sh: {[p.cmdline()[:4] for p in alive]}"
        assert "the launcher (pid" in log.read_text()
        assert list((run / "checkpoints").glob("step_*")), "the ranks stopped without their checkpoint"
    finally:
        _kill_all(procs)
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_kill_9_of_megaspan_sweep_stops_its_cells(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: orphan\nconfig: tiny\nfixed:\n  training.steps: 3000\n  logging.log_interval: 1\n"
        "  training.eval_interval: 100000\n  checkpoint.save_interval: 1000\naxes:\n  seed: [1]\n"
    )
    runs = tmp_path / "runs"
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "megaspan", "sweep", str(sweep), "--runs", str(runs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=clean_env(OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    procs: list[psutil.Process] = []
    try:
        cell_log = next(iter([runs / "s1" / "sweep-cell.log"]))
        deadline = time.monotonic() + 60
        while not runs.is_dir() or not any(runs.glob("*/sweep-cell.log")):
            assert time.monotonic() < deadline and sweeper.poll() is None, "the sweep started no cell"
            time.sleep(0.5)
        cell_log = next(runs.glob("*/sweep-cell.log"))
        _wait_for(sweeper, cell_log, "step 2/")
        procs = psutil.Process(sweeper.pid).children(recursive=True)
        assert procs, "no cell process"
        sweeper.kill()
        sweeper.wait()
        alive = _survivors(procs, STOP_LIMIT_S)
        assert not alive, f"left running after kill -9 of megaspan sweep: {[p.cmdline()[:4] for p in alive]}"
        assert list(cell_log.parent.joinpath("checkpoints").glob("step_*"))
    finally:
        _kill_all(procs)
        try:
            os.killpg(sweeper.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
