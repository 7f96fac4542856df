"""launch/submit checks, before submitting, that the job will find megaspan (issue 20, item 10).

Before: from a shell without the venv the job ran the system ``python3`` and every rank's log
showed a 15-line ModuleNotFoundError. ``--dry-run`` stops right before ``sbatch``, after the check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SUBMIT = Path(__file__).resolve().parents[2] / "launch" / "submit"


def _submit(tmp_path: Path, path: str) -> subprocess.CompletedProcess:
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": path}
    return subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--dry-run",
            "-g",
            "0",
            "--runs",
            str(tmp_path / "runs"),
            "--",
            "training.steps=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_submit_without_megaspan_on_path_fails_in_one_line(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    python3 = bare / "python3"  # a python3 without megaspan, as a system one
    python3.write_text("#!/bin/sh\nexit 1\n")
    python3.chmod(0o755)
    result = _submit(tmp_path, f"{bare}:/usr/bin:/bin")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "that imports megaspan: activate the venv" in lines[0], result.stderr
    assert "sbatch" not in result.stdout


def test_submit_with_the_venv_on_path_goes_on(tmp_path: Path) -> None:
    result = _submit(tmp_path, f"{Path(sys.executable).parent}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sbatch ")
