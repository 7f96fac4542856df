"""``megaspan bench --checkpoint DIR``: sync vs async save timings (structure only: timings are
the bench's job, never a test's), the directory left as found, and bad input in one line."""

from __future__ import annotations

import json

import pytest

from megaspan.cli import main


def test_checkpoint_bench_times_both_modes_and_leaves_the_directory_empty(
    single_process_group, tmp_path, capsys
):
    ckpts, out = tmp_path / "ckpts", tmp_path / "ck.json"
    ckpts.mkdir()  # an existing empty directory is kept (and emptied), a new one removed
    rc = main(
        ["bench", "--preset", "cpu-small", "--checkpoint", str(ckpts), "--repeats", "2", "--json", str(out)]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "checkpoint" and doc["repeats"] == 2 and doc["checkpoint_bytes"] > 0
    assert doc["sync"]["blocked_s"]["n"] == 2 and doc["async"]["blocked_s"]["n"] == 2
    a = doc["async"]
    for sync_s, start, commit in zip(
        doc["sync"]["blocked_s"]["values"], a["start_s"]["values"], a["commit_s"]["values"]
    ):
        assert sync_s > 0 and start > 0 and commit > 0
    for blocked, start, commit in zip(
        a["blocked_s"]["values"], a["start_s"]["values"], a["commit_s"]["values"]
    ):
        assert blocked == pytest.approx(start + commit)
    # Every background write overlapped at least one training step.
    assert doc["step_s"]["during_async_write"]["n"] >= 2
    assert ckpts.is_dir() and list(ckpts.iterdir()) == []
    printed = capsys.readouterr().out
    assert "| sync |" in printed and "| async |" in printed and "blocked" in printed


def test_a_directory_that_is_not_empty_is_one_line_and_untouched(tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "keep.txt").write_text("mine")
    assert main(["bench", "--preset", "cpu-small", "--checkpoint", str(ckpts)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megaspan: error:") and "not empty" in err and "\n" not in err
    assert [p.name for p in ckpts.iterdir()] == ["keep.txt"]
