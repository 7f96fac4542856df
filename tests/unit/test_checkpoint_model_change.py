"""A resume with a changed depth or placement says what differs (issue 20 item 10), not
``CheckpointException ranks:dict_keys([0])``: the commit record holds the model settings."""

from __future__ import annotations

import json

import pytest

from megaspan.training.checkpoint import META_FILE, model_difference
from tests.helpers.cli import train

COMMON = ("training.steps=2", "checkpoint.save_interval=2", "schedule.warmup_steps=1")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("model-change") / "run"
    first = train(run, *COMMON, "model.norm_placement=spannorm")
    assert first.returncode == 0, first.stderr[-2000:]
    return run


@pytest.mark.integration  # CLI training subprocesses (~20 s)
@pytest.mark.parametrize(
    "change, named",
    [
        ("model.num_layers=4", "model.num_layers 2 -> 4"),
        ("model.norm_placement=pre", "model.norm_placement spannorm -> pre"),
    ],
)
def test_changed_model_on_resume_names_the_setting(saved_run, change, named):
    meta = json.loads(next((saved_run / "checkpoints").glob(f"step_*/{META_FILE}")).read_text())
    assert meta["model"]["norm_placement"] == "spannorm"
    # More steps than the finished run had: a re-run of a finished run with other settings is
    # refused before any checkpoint is read (test_rerun_complete.py); this one must resume.
    resumed = train(saved_run, *COMMON, "training.steps=4", "model.norm_placement=spannorm", change)
    assert resumed.returncode == 2, (resumed.returncode, resumed.stderr[-2000:])
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("megaspan: error:")]
    assert len(errors) == 1 and named in errors[0], resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr and "dict_keys" not in resumed.stderr


def test_model_difference_lists_changed_and_absent_settings():
    saved = {"num_layers": 4, "norm_placement": "spannorm", "moe": {"num_experts": None}}
    now = {"num_layers": 4, "norm_placement": "pre", "moe": {"num_experts": 4}, "new_field": 1}
    text = model_difference(saved, now)
    assert "model.norm_placement spannorm -> pre" in text
    assert "model.moe.num_experts None -> 4" in text
    assert "model.new_field (absent) -> 1" in text
    assert model_difference(saved, dict(saved)) is None
    assert model_difference(None, now) is None  # a checkpoint from before the record
    # The record went through JSON: a tuple now equals the list saved.
    assert model_difference({"pattern": [1, 2]}, {"pattern": (1, 2)}) is None
