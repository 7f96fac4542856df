"""Re-running a finished run changes nothing (issue 20, item 3).

Before: the re-run trained zero steps and rewrote summary.json (final_train_loss null, tokens/s
0.0, so `megaspan report` showed "-") and config.yaml (with whatever overrides were passed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import train

pytestmark = [pytest.mark.integration]

COMMON = ("training.steps=3", "schedule.warmup_steps=1", "training.eval_interval=100")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_a_finished_run_rerun_says_complete_and_touches_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(run, *COMMON)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)
    # issue 20 item 10: config.yaml says what the run used, not null, for what the run derives.
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in [
        ("model", "num_query_groups"),
        ("model", "ffn_hidden_size"),
        ("model", "max_position_embeddings"),
        ("model", "init_method_std"),
        ("schedule", "decay_steps"),
    ]:
        assert resolved[section][key] is not None, (section, key)
    assert resolved["model"]["norm"]["final_norm"] is not None
    assert resolved["schedule"]["decay_steps"] == 3

    same = train(run, *COMMON)
    assert same.returncode == 0, same.stderr[-3000:]
    assert "already complete at step 3" in same.stdout + same.stderr
    assert _snapshot(run) == before

    other = train(run, *COMMON, "optimizer.lr=0.002", "model.hidden_dropout=0.1")
    assert other.returncode == 2, other.stdout[-2000:] + other.stderr[-2000:]
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1, other.stderr
    assert "completed at step 3" in lines[0] and "optimizer.lr 0.003 -> 0.002" in lines[0]
    assert "model.hidden_dropout 0.0 -> 0.1" in lines[0]
    assert _snapshot(run) == before

    more = train(run, "training.steps=4", "schedule.warmup_steps=1", "training.eval_interval=100")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "training finished at step 4" in more.stdout + more.stderr
