"""The real ``megaspan`` CLI, in a subprocess or in this process: ``train`` and ``plan`` runs and
what tests read back.

Shared by the e2e, run-dir, hybrid and plan tests (test modules import from here, never from one
another).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

STEP_LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss (\d+\.\d{6}) \| lr \S+ \| grad_norm \S+ \| tokens/s \S+ \| mem \S+ \| eta \S+"
)
RUN_TIMEOUT_S = 600  # shared 2-core machines run several jobs at once
PLAN_TIMEOUT_S = 300


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a launcher's rank variables (the child is one process)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(extra)
    return env


def train_argv(run_dir: Path, *overrides: str) -> list[str]:
    """The arguments of ``megaspan`` for a tiny run in ``run_dir``."""
    return ["train", "--config", "tiny", f"training.run_dir={run_dir}", *overrides]


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megaspan", *train_argv(run_dir, *overrides)]


def long_torchrun(run_dir: Path, save_interval: int) -> tuple[list[str], dict[str, str]]:
    """(command, env) of a 2-rank ``launch/torchrun.sh`` tiny run long enough to be interrupted
    (3000 steps, a log line per step), saving every ``save_interval`` steps."""
    command = [
        "bash",
        str(Path(__file__).resolve().parents[2] / "launch" / "torchrun.sh"),
        "--config",
        "tiny",
        f"training.run_dir={run_dir}",
        "training.steps=3000",
        "logging.log_interval=1",
        "training.eval_interval=100000",
        f"checkpoint.save_interval={save_interval}",
    ]
    env = clean_env(
        NPROC="2", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    return command, env


def train(
    run_dir: Path, *overrides: str, fresh_process: bool = False, **env: str
) -> subprocess.CompletedProcess:
    """``megaspan train --config tiny training.run_dir=RUN_DIR OVERRIDES...``, run by
    :func:`in_process` unless ``fresh_process`` (a test about what a new interpreter does: a
    resume that must not lean on anything the first run left in memory, exit-time behaviour) or
    ``env`` (read at import time by some libraries) asks for a subprocess."""
    if not fresh_process and not env:
        return in_process(train_argv(run_dir, *overrides))
    return subprocess.run(
        train_cmd(run_dir, *overrides),
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=RUN_TIMEOUT_S,
    )


def in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``megaspan ARGV`` through :func:`megaspan.cli.main` in this process, as the sweep worker
    runs a cell in production (:func:`megaspan.sweep.worker.run_captured`): the same parsing,
    validation, exit codes, run directory and teardown, without the ~8 s of CPU a new interpreter
    spends importing torch and Megatron-Core (most of this suite's time went there). ``stdout`` /
    ``stderr`` hold everything written to ``sys.stdout``/``sys.stderr`` and to file descriptors 1
    and 2 (C-level output too); an exception that escapes ``main`` is printed as the interpreter
    would and gives returncode 1. ``test_sweep_stages`` checks that such runs equal fresh
    processes."""
    import tempfile

    from megaspan.cli import main
    from megaspan.sweep.worker import run_captured

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = run_captured(main, argv, out.fileno(), err.fileno())
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return subprocess.CompletedProcess(["megaspan", *argv], code, stdout, stderr)


def step_losses(stdout: str) -> dict[int, str]:
    """{step: loss as printed} from the console lines."""
    return {int(m[1]): m[3] for m in map(STEP_LINE.match, stdout.splitlines()) if m}


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar of a run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def run_plan(
    world: int, overrides: list[str], *extra: str, fresh_process: bool = False
) -> subprocess.CompletedProcess:
    """``megaspan plan --world-size WORLD EXTRA... OVERRIDES...``, in this process unless
    ``fresh_process``. The plan joins *fake* process groups of the planned world size, which
    cannot coexist with a live group: this process's world-size-1 group (the ``mcore`` tests')
    is torn down first, as an in-process training run's teardown does; the next test that
    needs it starts it again (``single_process_group`` is idempotent)."""
    return run_plan_args("--world-size", str(world), *extra, *overrides, fresh_process=fresh_process)


def run_plan_args(*args: str, fresh_process: bool = False) -> subprocess.CompletedProcess:
    """``megaspan plan ARGS...`` (see :func:`run_plan`)."""
    argv = ["plan", *args]
    if not fresh_process:
        from megaspan.runtime import destroy

        destroy()
        return in_process(argv)
    cmd = [sys.executable, "-m", "megaspan", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=PLAN_TIMEOUT_S)


def plan_json(world: int, overrides: list[str]) -> dict:
    result = run_plan(world, overrides, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)
