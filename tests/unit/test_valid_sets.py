"""``data.valid_sets``: named validation sets, evaluated at every eval interval and logged as
``valid/<name>/loss`` and ppl (console, TensorBoard, summary.json).

A set named ``same`` points at the prefix the main validation split reads (the stdlib corpus's
held-out file), so its loss must equal ``valid/loss`` at every evaluation: a set that is not
evaluated, evaluated on other data, or logged under another step fails. A second set, the
training prefix, must differ (the named sets are not all the main split).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import scalars, train

pytestmark = pytest.mark.integration


def test_named_valid_sets_are_logged_at_every_evaluation(tiny_corpus, tmp_path):
    _, prefixes = tiny_corpus
    run = tmp_path / "run"
    result = train(
        run,
        "training.steps=4",
        "schedule.warmup_steps=1",
        "training.eval_interval=2",
        "model.seq_length=32",
        f"data.valid_sets={{same: {prefixes['valid']}, code_train: {prefixes['train']}}}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main = scalars(run, "valid/loss")
    same = scalars(run, "valid/same/loss")
    other = scalars(run, "valid/code_train/loss")
    assert sorted(main) == sorted(same) == sorted(other) == [0, 2, 4]
    assert same == main
    assert other != main
    assert scalars(run, "valid/same/ppl")[4] == pytest.approx(2.718281828 ** main[4], rel=1e-5)
    assert f"valid/same loss {main[4]:.6f}" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["valid_sets"]["same"]["final_loss"] == pytest.approx(main[4])
    assert summary["valid_sets"]["code_train"]["best_loss"] == pytest.approx(min(other.values()))


def test_a_missing_valid_set_is_one_line(tiny_corpus, tmp_path):
    result = train(
        tmp_path / "run",
        "training.steps=2",
        "schedule.warmup_steps=1",
        f"data.valid_sets={{held: {tmp_path / 'nope'}}}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert "data.valid_sets.held" in result.stderr and "megaspan preprocess" in result.stderr
