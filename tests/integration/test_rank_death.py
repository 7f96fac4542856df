"""A rank dies: every surviving rank says so in one line (issue 20, item 7).

Before: the surviving rank printed gloo's RuntimeError with its whole traceback and torchrun its
ChildFailedError traceback and failure table, 115-147 lines. Now: one line per surviving rank
naming the lost peer and the last intact checkpoint, and one line from torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers.cli import long_torchrun

pytestmark = [pytest.mark.integration, pytest.mark.distributed]


def test_kill_9_of_a_rank_gives_one_line_naming_the_peer_and_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    command, env = long_torchrun(run, save_interval=2)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    before: list[str] = []
    try:
        for line in proc.stdout:
            before.append(line)
            if "saved checkpoint" in line and "step_0000002" in line:
                break
        else:
            pytest.fail("".join(before[-40:]))
        ranks = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "training.run_dir" in " ".join(p.cmdline()) and p.ppid() != proc.pid
        ]
        assert len(ranks) == 2
        victim = max(ranks, key=lambda p: p.pid)  # torchrun starts local rank 0 first
        victim.kill()
        after, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "Traceback" not in after, after[-4000:]
    lost = [line for line in after.splitlines() if "lost rank" in line]
    assert len(lost) == 1, after[-4000:]
    assert re.match(
        rf"megaspan: rank 0: lost rank 1 \(pid {victim.pid}\), stopping; the last intact checkpoint is ",
        lost[0],
    )
    assert re.search(r"step_\d{7}", lost[0])
    noise = [line for line in after.splitlines() if not line.startswith(("step ", "saved checkpoint"))]
    assert len(noise) <= 5, "\n".join(noise)  # the rank's line, torchrun's line and its two log lines
