"""launch/slurm/train.sbatch on the local cluster, with tests/slurm/env_probe.py as the command.

These test the launcher itself: rank/rendezvous env, run-dir and argument plumbing, and the
USR1 forward -> marker -> requeue -> same-run-dir path. The probe follows the trainer's documented
signal contract (checkpoint, write <run_dir>/preempted, exit 0); the trainer's own behaviour is
tested in test_slurm_train.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from .conftest import REPO, wait_for

pytestmark = pytest.mark.slurm

TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
PROBE = REPO / "tests" / "slurm" / "env_probe.py"


def _probe_env(runs: Path, **extra: str) -> dict[str, str]:
    env = {"MEGASPAN_RUNS": str(runs), "MEGASPAN_CMD": f"python {PROBE}"}
    env.update(extra)
    return env


def _sbatch(slurm, tmp_path: Path, *args: str, env: dict[str, str], name: str = "probe") -> tuple[str, Path]:
    log = tmp_path / f"{name}.out"
    job = slurm.submit(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            "--ntasks=2",
            "--time=10",
            f"--output={log}",
            str(TRAIN_SBATCH),
            *args,
        ],
        env=env,
        cwd=tmp_path,
    )
    return job, log


def _records(run_dir: Path, restart: int) -> list[dict]:
    files = sorted((run_dir / "probe").glob(f"restart{restart}-rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def test_rank_env_and_gloo_allreduce(slurm, tmp_path):
    runs = tmp_path / "runs"
    job, log = _sbatch(slurm, tmp_path, "--config", "recipe.yaml", "model.num_layers=2", env=_probe_env(runs))
    (rec,) = slurm.wait(job, timeout=180, log=log)
    assert rec["JobState"] == "COMPLETED", log.read_text()
    assert rec["ExitCode"] == "0:0"

    run_dir = runs / f"probe-{job}"
    recs = _records(run_dir, 0)
    assert sorted(r["rank"] for r in recs) == [0, 1], log.read_text()
    port = str(20000 + int(job) % 20000)
    for r in recs:
        env = r["env"]
        assert r["world_size"] == 2 and r["all_reduce_sum"] == 3.0
        assert env["RANK"] == env["SLURM_PROCID"] == str(r["rank"])
        assert env["WORLD_SIZE"] == env["SLURM_NTASKS"] == "2"
        assert env["LOCAL_RANK"] == env["SLURM_LOCALID"]
        assert env["NODE_RANK"] == "0"
        assert env["MASTER_ADDR"] == socket.gethostname().split(".")[0]
        assert env["MASTER_PORT"] == port
        assert env["SLURM_JOB_ID"] == job
        assert env["PYTHONUNBUFFERED"] == "1"
        # CPU node: the H100 defaults must not be applied.
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] is None
        assert env["TRITON_CACHE_DIR"].endswith("_0")
        # User arguments first and unchanged, then what the launcher adds.
        assert r["argv"] == [
            "--config",
            "recipe.yaml",
            "model.num_layers=2",
            f"training.run_dir={run_dir}",
            "checkpoint.resume=auto",
        ]
    text = log.read_text()
    assert "0: probe rank 0/2" in text and "1: probe rank 1/2" in text  # srun --label
    assert (run_dir / "slurm" / f"job-{job}-restart-0.txt").exists()


def test_user_run_dir_and_resume_are_respected(slurm, tmp_path):
    run_dir = tmp_path / "mine"
    job, log = _sbatch(
        slurm,
        tmp_path,
        f"training.run_dir={run_dir}",
        "checkpoint.resume=none",
        env=_probe_env(tmp_path / "runs"),
    )
    (rec,) = slurm.wait(job, timeout=180, log=log)
    assert rec["JobState"] == "COMPLETED", log.read_text()
    recs = _records(run_dir, 0)
    assert len(recs) == 2
    assert recs[0]["argv"] == [f"training.run_dir={run_dir}", "checkpoint.resume=none"]
    assert not (tmp_path / "runs").exists()


def _submit_waiting_probe(slurm, tmp_path, **extra_env):
    runs = tmp_path / "runs"
    job, log = _sbatch(slurm, tmp_path, env=_probe_env(runs, PROBE_WAIT_SIGNAL="1", **extra_env))
    run_dir = runs / f"probe-{job}"
    wait_for(
        lambda: len(list((run_dir / "probe").glob("ready-rank*"))) == 2,
        120,
        f"both probe ranks of job {job} to start ({log})",
    )
    return job, log, run_dir


def test_usr1_warning_checkpoints_requeues_and_resumes_in_same_run_dir(slurm, tmp_path):
    job, log, run_dir = _submit_waiting_probe(slurm, tmp_path)
    slurm.signal_batch(job, "USR1")
    (rec,) = slurm.wait(job, timeout=240, log=log)
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED", text
    assert rec["ExitCode"] == "0:0"
    assert rec["Restarts"] == "1", text

    first, second = _records(run_dir, 0), _records(run_dir, 1)
    assert [r["signal"] for r in first] == ["SIGUSR1", "SIGUSR1"], text
    assert len(second) == 2, text
    assert {r["env"]["SLURM_JOB_ID"] for r in first + second} == {job}
    assert {r["env"]["MASTER_PORT"] for r in first + second} == {str(20000 + int(job) % 20000)}
    assert {r["argv"][0] for r in first + second} == {f"training.run_dir={run_dir}"}
    assert "forwarding to the training step" in text
    assert f"requeueing job {job}" in text
    assert not (run_dir / "preempted").exists()  # cleared before the resumed run
    history = (run_dir / "slurm" / "preemptions.log").read_text()
    assert "signal SIGUSR1" in history and "requeued" in history


def test_requeue_bound_stops_with_tempfail(slurm, tmp_path):
    job, log, run_dir = _submit_waiting_probe(slurm, tmp_path, MEGASPAN_MAX_REQUEUES="0")
    slurm.signal_batch(job, "USR1")
    (rec,) = slurm.wait(job, timeout=180, log=log)
    text = log.read_text()
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0", text
    assert rec["Restarts"] == "0"
    assert "requeue limit reached" in text
    assert (run_dir / "preempted").exists()


def test_scancel_is_not_undone_by_a_requeue(slurm, tmp_path):
    job, log, run_dir = _submit_waiting_probe(slurm, tmp_path)
    slurm.cancel(job)
    (rec,) = slurm.wait(job, timeout=180, log=log)
    assert rec["JobState"] == "CANCELLED", log.read_text()
    assert rec["Restarts"] == "0"
    # The ranks still got the chance to checkpoint (SIGTERM reached them).
    wait_for(lambda: (run_dir / "preempted").exists(), 30, "the probe's marker after SIGTERM")


def test_real_time_limit_warning_reaches_ranks_that_are_still_starting(slurm, tmp_path):
    """Slurm's own --signal=B:USR1@secs (not scancel): with a 2-minute limit and a 110 s warning
    the signal comes 0-10 s after the start (Slurm may send it up to 60 s early), i.e. while the
    ranks are still "building the model" (no handler for 15 s). They must survive it (USR1 is
    ignored until their handler is installed) and still get it (the batch shell re-sends it)."""
    runs = tmp_path / "runs"
    log = tmp_path / "tl.out"
    env = _probe_env(
        runs,
        PROBE_WAIT_SIGNAL="1",
        PROBE_HANDLER_DELAY="15",
        MEGASPAN_SIGNAL_REPEAT="5",
        MEGASPAN_MAX_REQUEUES="1",
    )
    job = slurm.submit(
        [
            "sbatch",
            "--parsable",
            "--job-name=tl",
            "--ntasks=2",
            "--time=2",
            "--signal=B:USR1@110",
            f"--output={log}",
            str(TRAIN_SBATCH),
        ],
        env=env,
        cwd=tmp_path,
    )
    (rec,) = slurm.wait(job, timeout=300, log=log)
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text
    assert rec["Restarts"] == "1", text
    first = _records(runs / f"tl-{job}", 0)
    assert [r["signal"] for r in first] == ["SIGUSR1", "SIGUSR1"], text
    assert {r["usr1_at_start"] for r in first} == {"SIG_IGN"}
    # Slurm's timing of the warning varies (its timer loop is coarse); when it did land in the
    # startup window, the re-sent copy is what reached the ranks.
    if text.index("got SIGUSR1: forwarding") < text.index("waiting for a signal"):
        assert "re-sending SIGUSR1" in text, text
