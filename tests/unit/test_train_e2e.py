"""End-to-end ``megaspan train`` runs in subprocesses (the real CLI, exit codes and signals).

Every run uses the ``tiny`` recipe. The first run trains the tiny tokenizer and preprocesses
the stdlib corpus into the megaspan cache (``$MEGASPAN_CACHE_DIR`` or ``~/.cache/megaspan``);
later runs, and later sessions, hit that cache.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaspan.training.checkpoint import checkpoint_name, find_latest_valid, is_valid
from tests.helpers.cli import RUN_TIMEOUT_S, clean_env, scalars, step_losses, train, train_cmd

# Every test here starts `megaspan` subprocesses that import torch and Megatron.
pytestmark = pytest.mark.integration

# Fault injection lives here, not in megaspan: the CLI in a process whose checkpoint commit dies
# (os._exit, like a kill -9) at step $CRASH_AT, after every shard of that step was written.
_CRASHING_CLI = """
import os, sys
import megaspan.training.checkpoint.save as ckpt
commit = ckpt._commit
def crash(ckpt_dir, tmp, final, meta, *args, **kwargs):
    if meta["step"] == int(os.environ["CRASH_AT"]):
        sys.stdout.flush()
        os._exit(17)
    return commit(ckpt_dir, tmp, final, meta, *args, **kwargs)
ckpt._commit = crash
from megaspan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_crashing_at(step: int, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _CRASHING_CLI, *train_cmd(run_dir, *overrides)[3:]]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=clean_env(CRASH_AT=str(step)), timeout=RUN_TIMEOUT_S
    )


def _check(result: subprocess.CompletedProcess, returncode: int = 0) -> None:
    assert result.returncode == returncode, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def test_short_run_lowers_loss_and_writes_tensorboard(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(run, "training.steps=30", "logging.log_interval=1")
    _check(result)
    losses = step_losses(result.stdout)
    assert sorted(losses) == list(range(1, 31))
    first, last = float(losses[1]), sum(float(losses[s]) for s in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)
    assert re.search(r"^valid loss \d+\.\d+ \| ppl \d+\.\d+", result.stdout, re.M)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/loss", "valid/ppl"):
        assert scalars(run, tag), tag
    assert scalars(run, "train/loss")[30] == pytest.approx(float(losses[30]), abs=1e-6)
    assert scalars(run, "valid/loss")[30] < scalars(run, "valid/loss")[0]
    assert (run / "config.yaml").is_file() and (run / "train.log").read_text().count("step 30/30") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 30)
    assert summary["final_val_loss"] == pytest.approx(scalars(run, "valid/loss")[30], abs=1e-6)
    assert summary["config"]["model"]["vocab_size"] > 0 and summary["versions"]["megatron-core"]
    assert find_latest_valid(run / "checkpoints") == run / "checkpoints" / checkpoint_name(30)


def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    # Dropout on, so the RNG state must be restored too; decay_steps pins the LR schedule so a
    # 10-step first leg has the same schedule as the 20-step run.
    common = (
        "model.hidden_dropout=0.1",
        "schedule.decay_steps=20",
        "logging.log_interval=1",
        "training.eval_interval=100",
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    _check(train(straight, "training.steps=20", *common))
    _check(train(split, "training.steps=10", *common))
    # A new interpreter resumes: nothing the first leg left in this process's memory can help.
    resumed = train(split, "training.steps=20", *common, fresh_process=True)
    _check(resumed)
    assert "resumed from checkpoint at step 10" in resumed.stdout
    assert sorted(step_losses(resumed.stdout)) == list(range(11, 21))
    assert scalars(split, "train/loss") == scalars(straight, "train/loss")  # float32, exact
    assert len(scalars(straight, "train/loss")) == 20


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    crashed = train_crashing_at(8, run, "training.steps=8", "checkpoint.save_interval=4")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert (ckpts / "tmp-step_8").is_dir() and not (ckpts / checkpoint_name(8)).exists()
    assert is_valid(ckpts / checkpoint_name(4))
    assert (ckpts / "latest").read_text().strip() == checkpoint_name(4)
    resumed = train(run, "training.steps=10", "checkpoint.save_interval=4")
    _check(resumed)
    assert "resumed from checkpoint at step 4" in resumed.stdout
    assert find_latest_valid(ckpts) == ckpts / checkpoint_name(10)
    assert not (ckpts / "tmp-step_8").exists()  # the abandoned save is cleaned up


def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(run, "training.steps=100000", "logging.log_interval=1", "training.eval_interval=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
    )
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                break
        else:
            pytest.fail(f"training never reached step 3 (exit {proc.wait()})")
        signalled_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-2000:]
    assert time.monotonic() - signalled_at < 90  # one step + one checkpoint, on a loaded 2-core box
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    marker = (run / "preempted").read_text()
    step = int(re.match(r"step (\d+) signal SIGTERM", marker)[1])
    assert step >= 3
    assert find_latest_valid(run / "checkpoints") == run / "checkpoints" / checkpoint_name(step)
    resumed = train(run, f"training.steps={step + 2}", "schedule.warmup_steps=1")
    _check(resumed)
    assert f"resumed from checkpoint at step {step}" in resumed.stdout
    assert f"step {step + 2}/{step + 2}" in resumed.stdout


@pytest.mark.distributed
def test_two_process_data_parallel_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "megaspan",
            "train",
            "--config",
            "tiny",
            f"training.run_dir={run}",
            "training.steps=6",
            "checkpoint.save_interval=3",
            "parallel.use_distributed_optimizer=true",
            "logging.log_interval=1",
        ],
        capture_output=True,
        text=True,
        env=clean_env(OMP_NUM_THREADS="1"),
        timeout=RUN_TIMEOUT_S,
    )
    _check(result)
    assert "world 2 (dp 2)" in result.stdout
    assert sorted(step_losses(result.stdout)) == list(range(1, 7))  # rank 0 logs, once per step
    assert is_valid(run / "checkpoints" / checkpoint_name(6))
