"""A sweep cell trained in an in-process worker equals the same cell in its own process.

The worker (megaspan.sweep.worker) runs several ``megaspan train`` calls in one interpreter; if any
state leaked from one cell into the next (RNG, Megatron globals, the micro-batch calculator), the
second cell's losses would differ from a fresh process's. Two real cells, twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaspan.sweep import expand
from megaspan.sweep.runner import run_local

pytestmark = pytest.mark.integration

SWEEP = {
    "name": "equal",
    "config": "tiny",
    "fixed": {
        "training.steps": 4,
        "training.eval_interval": 2,
        "training.eval_steps": 1,
        "schedule.warmup_steps": 1,
        "logging.log_interval": 1,
        "checkpoint.save_at_end": False,
    },
    "axes": {"placement": ["post", "pre"], "depth": [2]},
}


def _losses(run_dir: Path) -> tuple:
    summary = json.loads((run_dir / "summary.json").read_text())
    log = [line for line in (run_dir / "train.log").read_text().splitlines() if "| loss " in line]
    return (
        summary["status"],
        summary["final_val_loss"],
        summary["initial_val_loss"],
        [line.split("| loss ")[1].split(" ")[0] for line in log],
    )


def test_worker_cells_equal_fresh_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASPAN_CACHE_DIR", str(tmp_path / "cache"))
    sweep = expand(SWEEP)
    code, _ = run_local(sweep, tmp_path / "isolated", echo=lambda _: None)
    assert code == 0
    code, _ = run_local(sweep, tmp_path / "worker", in_process=True, echo=lambda _: None)
    assert code == 0
    for cell in sweep["cells"]:  # the second cell ran after the first in the same worker
        fresh = _losses(tmp_path / "isolated" / cell["name"])
        reused = _losses(tmp_path / "worker" / cell["name"])
        assert fresh[0] == "completed" and len(fresh[3]) == 4
        assert isinstance(fresh[2], float) and fresh[2] > fresh[1]  # the step-0 loss, then trained
        assert reused == fresh, cell["name"]
    summary = json.loads((tmp_path / "worker" / "pre-L2" / "summary.json").read_text())
    assert summary["data"]["train"] and Path(summary["data"]["train"][0] + ".bin").is_file()
