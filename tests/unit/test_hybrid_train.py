"""``megaspan train --config tiny model.arch=hybrid``: trains, resumes, and equals the GPT run.

Both architectures start from the same weights (same seed, same init order) and are bitwise equal
step for step, so a hybrid run stopped at step 3 and resumed to step 5 must print the losses of
an uninterrupted GPT run, and write the same per-layer diagnostics (hybrid rows keyed on the
block number: one row per attention + MLP pair).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import STEP_LINE, train

pytestmark = pytest.mark.integration

COMMON = (
    "model.norm_placement=spannorm",
    "training.steps={}",
    "schedule.decay_steps=5",
    "schedule.warmup_steps=2",
    "logging.log_interval=1",
    "training.eval_interval=100",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "logging.diagnostics_interval=1",
)


def _losses(out: str) -> dict[int, str]:
    return {int(m[1]): m[3] for line in out.splitlines() if (m := STEP_LINE.match(line))}


def _run(run_dir: Path, steps: int, *extra: str) -> dict[int, str]:
    result = train(run_dir, *(o.format(steps) for o in COMMON), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return _losses(result.stdout)


def test_hybrid_trains_resumes_and_equals_gpt(tmp_path: Path) -> None:
    gpt = _run(tmp_path / "gpt", 5)
    first = _run(tmp_path / "hybrid", 3, "model.arch=hybrid")
    resumed = _run(tmp_path / "hybrid", 5, "model.arch=hybrid")
    assert sorted(gpt) == [1, 2, 3, 4, 5] and sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5]
    assert {**first, **resumed} == gpt
    diag = {
        arch: [json.loads(line) for line in (tmp_path / arch / "diagnostics.jsonl").read_text().splitlines()]
        for arch in ("gpt", "hybrid")
    }
    assert [r["step"] for r in diag["hybrid"]] == [1, 2, 3, 4, 5]
    assert diag["hybrid"] == diag["gpt"]
