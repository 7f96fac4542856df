"""The real ``megaspan`` CLI in a subprocess: ``train`` and ``plan`` runs and what tests read back.

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


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megaspan",
        "train",
        "--config",
        "tiny",
        f"training.run_dir={run_dir}",
        *overrides,
    ]


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


def train(run_dir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """``megaspan train --config tiny training.run_dir=RUN_DIR OVERRIDES...``."""
    return subprocess.run(
        train_cmd(run_dir, *overrides),
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=RUN_TIMEOUT_S,
    )


def step_losses(stdout: str) -> dict[int, str]:
    """{step: loss as printed} from the console lines."""
    return {int(m[1]): m[3] for m in map(STEP_LINE.match, stdout.splitlines()) if m}


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar of a run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def run_plan(world: int, overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    """``megaspan plan --world-size WORLD EXTRA... OVERRIDES...`` (fake process groups: never in-process)."""
    cmd = [sys.executable, "-m", "megaspan", "plan", "--world-size", str(world), *extra, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=PLAN_TIMEOUT_S)


def plan_json(world: int, overrides: list[str]) -> dict:
    result = run_plan(world, overrides, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)
