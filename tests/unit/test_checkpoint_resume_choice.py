"""Which checkpoint a resume takes, and what pruning may delete (issue 20, items 1 and 4).

* every checkpoint corrupt + ``resume=auto``: stop in one line naming them (exit 2), never a
  silent restart from scratch; ``checkpoint.resume=none`` starts over, keeping them;
* pruning never touches a checkpoint of another lineage (a run that started over in the dir);
* a stale ``latest``: newer checkpoints that pass full verification are real work (resumed from,
  with a warning); a ``latest`` holding garbage falls back the same way.

In-process on the tiny model (real Megatron model, optimizer, scheduler), plus one CLI run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megaspan.errors import CheckpointError
from megaspan.training.checkpoint import (
    LATEST_FILE,
    META_FILE,
    Progress,
    checkpoint_name,
    find_latest_valid,
    lineage_of,
    save_checkpoint,
)
from megaspan.training.setup import cuda_free
from tests.helpers.cli import clean_env, train, train_cmd
from tests.helpers.models import tiny_overrides

VOCAB = 128


@pytest.fixture
def objs():
    """Per test, not per module: test_corrupt_run_dir_... trains in this process
    (tests.helpers.cli.train), and a run's teardown destroys the groups a longer-lived model
    would still hold."""
    from megaspan.config.loader import load_config
    from megaspan.runtime import init_process_group, setup_cpu
    from megaspan.training.setup import build_training_objects
    from tests.helpers.models import fresh_model_parallel

    setup_cpu()
    init_process_group()
    fresh_model_parallel(seed=1234)
    return build_training_objects(load_config(None, tiny_overrides()), VOCAB)


def _save(objs, ckpt_dir: Path, step: int, keep_last: int | None = None, lineage: str | None = None) -> Path:
    with cuda_free():
        return save_checkpoint(
            ckpt_dir,
            Progress(step, step * 4),
            objs.chunks,
            objs.optimizer,
            objs.scheduler,
            {},
            keep_last,
            lineage=lineage,
        )


def _garble(path: Path) -> None:
    """Overwrite the biggest shard with garbage of the same size (only checksums see it)."""
    shard = max((p for p in path.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(os.urandom(shard.stat().st_size))


def _warnings():
    seen: list[str] = []
    return seen, seen.append


# ---- item 1: all corrupt --------------------------------------------------------------------


def test_all_corrupt_with_require_intact_is_one_line_naming_each(objs, tmp_path):
    for step in (1, 2):
        _garble(_save(objs, tmp_path, step))
    with pytest.raises(CheckpointError) as info:
        find_latest_valid(tmp_path, verify=True, require_intact=True)
    text = str(info.value)
    assert "\n" not in text
    assert checkpoint_name(1) in text and checkpoint_name(2) in text
    assert "checkpoint.resume=none" in text  # how to start over
    # Without require_intact (the guard's rollback), still a warning and None.
    seen, warn = _warnings()
    assert find_latest_valid(tmp_path, verify=True, warn=warn) is None
    assert len(seen) == 1


def test_pruning_never_touches_another_lineage(objs, tmp_path):
    old = [_save(objs, tmp_path, step, lineage="run-a") for step in (10, 20)]
    # A second run started over in the same dir: its own saves are pruned, run-a's are not.
    for step in (1, 2, 3, 4):
        _save(objs, tmp_path, step, keep_last=2, lineage="run-b")
    assert all(p.is_dir() for p in old)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_name(s) for s in (3, 4, 10, 20)]
    assert lineage_of(tmp_path / checkpoint_name(4)) == "run-b"
    # Its latest is its own newest, and run-a's newer steps are not mistaken for its work.
    assert find_latest_valid(tmp_path) == tmp_path / checkpoint_name(4)


def test_a_new_run_moves_another_runs_same_step_aside(objs, tmp_path):
    first = _save(objs, tmp_path, 2, lineage="run-a")
    _garble(first)
    _save(objs, tmp_path, 2, lineage="run-b")
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("superseded-")]
    assert aside == [f"superseded-run-a-{checkpoint_name(2)}"]
    assert lineage_of(tmp_path / checkpoint_name(2)) == "run-b"


@pytest.mark.integration  # CLI subprocesses (~20 s)
def test_corrupt_run_dir_stops_resume_auto_and_resume_none_starts_over(tmp_path):
    """The whole command: exit 2 with one line, no new checkpoint; then the asked-for restart."""
    run = tmp_path / "run"
    common = ("training.steps=2", "checkpoint.save_interval=2", "schedule.warmup_steps=1")
    first = train(run, *common)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = run / "checkpoints"
    _garble(ckpts / checkpoint_name(2))
    before = sorted(p.name for p in ckpts.iterdir())
    # Two more steps: a resume (a same-settings re-run of a finished run is "already complete").
    again = subprocess.run(
        train_cmd(run, *common, "training.steps=4"),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    assert again.returncode == 2, (again.returncode, again.stderr[-2000:])
    errors = [line for line in again.stderr.splitlines() if line.startswith("megaspan: error:")]
    assert len(errors) == 1 and checkpoint_name(2) in errors[0], again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == before  # nothing written, nothing pruned
    fresh = train(run, *common, "checkpoint.resume=none", "checkpoint.keep_last=1")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    names = sorted(p.name for p in ckpts.iterdir())
    assert checkpoint_name(2) in names and any(n.startswith("superseded-") for n in names), names


# ---- item 4: stale or garbage latest -------------------------------------------------------


def test_stale_latest_resumes_from_the_newest_verified_with_a_warning(objs, tmp_path):
    for step in (1, 2, 3):
        _save(objs, tmp_path, step)
    (tmp_path / LATEST_FILE).write_text(checkpoint_name(1) + "\n")  # e.g. restored from a backup
    seen, warn = _warnings()
    assert find_latest_valid(tmp_path, warn=warn) == tmp_path / checkpoint_name(3)
    assert len(seen) == 1 and checkpoint_name(3) in seen[0] and checkpoint_name(1) in seen[0]
    # Pruning after that resume keeps the newer work (the save at step 4 is the run's newest).
    _save(objs, tmp_path, 4, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_name(3), checkpoint_name(4)]


def test_newer_than_latest_must_pass_full_verification(objs, tmp_path):
    for step in (1, 2, 3):
        _save(objs, tmp_path, step)
    _garble(tmp_path / checkpoint_name(3))  # same size: only the checksum sees it
    (tmp_path / LATEST_FILE).write_text(checkpoint_name(1) + "\n")
    seen, warn = _warnings()
    # verify=False (cheap checks) for latest itself, but a newer one is taken only if verified.
    assert find_latest_valid(tmp_path, warn=warn) == tmp_path / checkpoint_name(2)
    assert checkpoint_name(3) in seen[0]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80", b"", b"../../etc\n", b"not-a-checkpoint\n"])
def test_garbage_latest_falls_back_to_the_newest_intact(objs, tmp_path, content):
    for step in (1, 2):
        _save(objs, tmp_path, step)
    (tmp_path / LATEST_FILE).write_bytes(content)
    seen, warn = _warnings()
    assert find_latest_valid(tmp_path, verify=True, warn=warn) == tmp_path / checkpoint_name(2)
    assert len(seen) == 1 and LATEST_FILE in seen[0]
    # A save replaces it with a good one and prunes by lineage as usual.
    _save(objs, tmp_path, 3, keep_last=1)
    assert (tmp_path / LATEST_FILE).read_text().strip() == checkpoint_name(3)
    assert json_step(tmp_path / checkpoint_name(3)) == 3


def json_step(path: Path) -> int:
    import json

    return json.loads((path / META_FILE).read_text())["step"]
