"""Fixtures for the Slurm launcher tests: a handle on the local cluster from tests/slurm/cluster.sh.

The session fixture ``slurm`` reads ``$MEGASPAN_SLURM_DIR/env`` (default /tmp/megaspan-slurm/env),
checks with ``sinfo`` that the node is usable, and otherwise SKIPS with the command to run. Every
job a test submits is tracked and cancelled at teardown if it is still queued or running, and
every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp"}


def _read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
    return env


@dataclass
class Slurm:
    """Submits and watches jobs on the local test cluster."""

    env: dict[str, str]
    submitted: list[str] = field(default_factory=list)

    def run(
        self, cmd: list[str], timeout: float = 60, check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        env = dict(self.env)
        env.update(kw.pop("env", {}) or {})
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def submit(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Run an sbatch (or launch/submit) command that prints a job id; track the job."""
        proc = self.run(cmd, env=env, cwd=cwd, timeout=120)
        job_id = proc.stdout.strip().splitlines()[-1].split(";")[0]
        assert job_id.isdigit(), f"no job id from {shlex.join(cmd)}: {proc.stdout!r} {proc.stderr!r}"
        self.submitted.append(job_id)
        return job_id

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` records (one per array task) as dicts."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=30)
        records = []
        for line in proc.stdout.splitlines():
            rec = {}
            for token in line.split():
                if "=" in token:
                    key, _, value = token.partition("=")
                    rec.setdefault(key, value)
            if rec:
                records.append(rec)
        return records

    def job(self, job_id: str) -> dict[str, str]:
        recs = [r for r in self.jobs(job_id) if r.get("JobId") == job_id]
        return recs[0] if recs else {}

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> list[dict[str, str]]:
        """Wait until every record of job_id (all array tasks) is terminal; cancel on timeout."""
        deadline = time.monotonic() + timeout
        stable = 0
        recs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            recs = self.jobs(job_id)
            done = bool(recs) and all(r.get("JobState") in TERMINAL for r in recs)
            # Require two polls in a row: a requeue passes through short transitional states.
            stable = stable + 1 if done else 0
            if stable >= 2:
                return recs
            time.sleep(1.0)
        self.cancel(job_id)
        tail = ""
        if log is not None and log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in recs]
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f}s: {states}\n{tail}")

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", job_id], check=False, timeout=30)

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """What `--signal=B:USR1@secs` does before the time limit: signal only the batch shell."""
        self.run(["scancel", "--batch", f"--signal={sig}", job_id], timeout=30)

    def cleanup(self) -> None:
        for job_id in self.submitted:
            recs = self.jobs(job_id)
            if any(r.get("JobState") not in TERMINAL for r in recs):
                self.cancel(job_id)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def slurm_session():
    state_dir = Path(os.environ.get("MEGASPAN_SLURM_DIR", "/tmp/megaspan-slurm"))
    env_file = state_dir / "env"
    hint = f"local Slurm cluster not up: run `{CLUSTER_SH.relative_to(REPO)} up` first"
    if not env_file.exists():
        pytest.skip(f"{hint} (no {env_file})")
    env = dict(os.environ)
    env.update(_read_env_file(env_file))
    # Jobs inherit this environment (sbatch --export=ALL): this interpreter's venv first on PATH,
    # so `megaspan` and `python` in the job are the ones under test.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MEGASPAN_HOME"] = str(REPO)
    for key in list(env):  # do not leak an outer allocation into the test jobs
        if key.startswith("SLURM_") and key != "SLURM_CONF":
            env.pop(key)
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{hint} (sinfo: {exc})")
    states = set(proc.stdout.split())
    if proc.returncode != 0 or not states & USABLE_NODE_STATES:
        pytest.skip(f"{hint} (sinfo rc={proc.returncode}: {proc.stdout.strip()} {proc.stderr.strip()})")
    handle = Slurm(env=env)
    yield handle
    handle.cleanup()


@pytest.fixture
def slurm(slurm_session):
    """The session handle; jobs this test left running are cancelled when it ends."""
    before = len(slurm_session.submitted)
    yield slurm_session
    for job_id in slurm_session.submitted[before:]:
        recs = slurm_session.jobs(job_id)
        if any(r.get("JobState") not in TERMINAL for r in recs):
            slurm_session.cancel(job_id)
