"""Signals against a real two-rank ``launch/torchrun.sh`` run (gloo on CPU, tiny recipe).

What ``scancel``, Slurm's time limit or ``kill -TERM -PGID`` does: SIGTERM to every process of
the launcher's group. Before the fix the checkpoint writer's Manager child died from that signal
in the middle of the save (ConnectionResetError, exit 1, a tmp-step_N left, progress lost) and
torchrun printed its SignalException traceback. Now: exit 0, a new complete ``latest`` newer than
the last periodic save, no ``tmp-*``, no traceback, and the run resumes from it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megaspan.training.checkpoint import find_latest_valid, is_valid
from tests.helpers.cli import train_cmd

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
STEP = re.compile(r"^step (\d+)/")
pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(NPROC="2", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return env


def _foreground_sigint() -> None:
    """In the child, before exec: SIGINT at its default, as a terminal's foreground job has it.

    A test session started with ``&`` from a script (a CI wrapper, ``nohup ... &``) inherits SIGINT
    ignored, and so would every launcher it starts: the Ctrl-C cases then measured that setup
    (the ranks trained on to the 300 s timeout) instead of a terminal's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "bash",
            str(TORCHRUN_SH),
            "--config",
            "tiny",
            f"training.run_dir={run}",
            "logging.log_interval=1",
            "training.eval_interval=100000",
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,  # = setsid: the launcher leads its own process group
        preexec_fn=_foreground_sigint,
    )


def _read_until(proc: subprocess.Popen, pattern: str, lines: list[str], limit_s: float = 400) -> None:
    deadline = time.monotonic() + limit_s
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return
        if time.monotonic() > deadline:
            break
    pytest.fail(f"never saw {pattern!r} (exit {proc.poll()}):\n{''.join(lines[-40:])}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop_group(proc: subprocess.Popen, sig: int, lines: list[str]) -> int:
    os.killpg(proc.pid, sig)
    try:
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines.append(rest)
    return proc.returncode


def test_sigterm_checkpoints_and_resumes_and_ctrl_c_of_the_resumed_run_exits_130(tmp_path: Path) -> None:
    """SIGTERM to the launcher's group (scancel, a time limit, ``kill -TERM -PGID``) checkpoints
    and exits 0; the next run resumes from that checkpoint; Ctrl-C (SIGINT to the group, what a
    terminal sends) of that resumed run checkpoints again and exits 130. One launcher start
    fewer than a separate Ctrl-C run: the resumed run is the one interrupted."""
    run, lines = tmp_path / "run", []
    proc = _start(run, "training.steps=3000", "checkpoint.save_interval=4")
    try:
        _read_until(proc, r"saved checkpoint .*step_0000004", lines)
        _read_until(proc, r"^step 5/", lines)
        ranks_and_helpers = _descendants(proc.pid)
        rc = _stop_group(proc, signal.SIGTERM, lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert rc == 0, out[-4000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-4000:]
    ckpts = run / "checkpoints"
    latest = find_latest_valid(ckpts)
    step = int(latest.name.split("_")[1])
    assert step > 4 and is_valid(latest, verify=True)
    assert (ckpts / "latest").read_text().strip() == latest.name
    assert not list(ckpts.glob("tmp-*"))
    assert f"step {step} signal SIGTERM" in (run / "preempted").read_text()
    time.sleep(2)
    assert not [p for p in ranks_and_helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    # Resume (checkpoint.resume=auto), train on past the SIGTERM checkpoint, then Ctrl-C; the
    # periodic save is out of reach, so a checkpoint past step + 2 comes from the signal.
    lines = []
    resumed = _start(run, "training.steps=3000", "checkpoint.save_interval=1000")
    try:
        _read_until(resumed, rf"resumed from checkpoint at step {step}\b", lines)
        _read_until(resumed, rf"^step {step + 2}/", lines)
        rc = _stop_group(resumed, signal.SIGINT, lines)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    out = "".join(lines)
    assert rc == 130, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    latest = find_latest_valid(ckpts)
    assert latest is not None and int(latest.name.split("_")[1]) >= step + 2
    # The marker is this stop's (launch/torchrun.sh forwards Ctrl-C to the ranks as SIGTERM).
    assert f"step {int(latest.name.split('_')[1])} signal" in (run / "preempted").read_text()


def test_kill_9_of_a_rank_leaves_no_helper_processes(tmp_path: Path) -> None:
    run, lines = tmp_path / "run", []
    proc = _start(run, "training.steps=3000", "checkpoint.save_interval=2")
    try:
        _read_until(proc, r"saved checkpoint .*step_0000002", lines)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        megaspan_ranks = [
            p for p in ranks if "training.run_dir" in " ".join(p.cmdline()) and p.ppid() != proc.pid
        ]
        assert len(megaspan_ranks) == 2, [p.cmdline() for p in ranks]
        # Every process a rank started (the old writer's Manager and its resource tracker).
        helpers = [c for r in megaspan_ranks for c in r.children(recursive=True)]
        assert helpers == [], [p.cmdline() for p in helpers]
        megaspan_ranks[0].kill()
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _cli(run: Path, *overrides: str) -> list[str]:
    return train_cmd(run, "logging.log_interval=1", "training.eval_interval=100000", *overrides)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background-from-script"])
def test_sigint_to_megaspan_train_checkpoints_and_exits_130(tmp_path: Path, background: bool) -> None:
    """No launcher: Ctrl-C on ``megaspan train``; and a run started with ``&`` from a script (SIGINT
    inherited as ignored), which used to ignore ``kill -INT`` and train on."""
    run = tmp_path / "run"
    env = {k: v for k, v in _env().items() if k != "NPROC"}
    cmd = _cli(run, "training.steps=3000", "checkpoint.save_interval=1000")
    if background:
        script = " ".join(f"'{c}'" for c in cmd) + " & echo PID=$!; wait $!"
        # The script's own `&` then ignores SIGINT for its child, whatever the session had.
        proc = subprocess.Popen(
            ["bash", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=_foreground_sigint,
        )
    else:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=_foreground_sigint,
        )
    lines: list[str] = []
    try:
        target = proc.pid
        if background:
            _read_until(proc, r"^PID=\d+", lines)
            target = int(lines[-1].strip().split("=")[1])
        _read_until(proc, r"^step 3/", lines)
        os.kill(target, signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    latest = find_latest_valid(run / "checkpoints")
    assert latest is not None and int(latest.name.split("_")[1]) >= 3
    assert "signal SIGINT" in (run / "preempted").read_text()
