"""Fast in-process tests of the trainer's pure parts: sampler, checkpoint discovery, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaspan.config.loader import ConfigError, load_config
from megaspan.training.batches import micro_batch_indices
from megaspan.training.checkpoint import (
    LATEST_FILE,
    META_FILE,
    checkpoint_name,
    find_latest_valid,
    is_valid,
    prune,
)
from megaspan.training.setup import check_schedule


def _fake_checkpoint(ckpt_dir: Path, step: int, *, committed: bool = True) -> Path:
    """A directory shaped like a checkpoint (the content of the shards is irrelevant here)."""
    path = ckpt_dir / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if committed:
        (path / META_FILE).write_text(json.dumps({"step": step, "world_size": 1}))
    return path


def test_sampler_shards_data_parallel_ranks_without_overlap() -> None:
    ranks = [list(micro_batch_indices(0, 24, 2, r, 3)) for r in range(3)]
    assert [list(b) for b in ranks[0]] == [[0, 1], [6, 7], [12, 13], [18, 19]]
    seen = sorted(i for batches in ranks for b in batches for i in b)
    assert seen == list(range(24))


def test_sampler_resumes_exactly_from_consumed_samples() -> None:
    full = [list(b) for b in micro_batch_indices(0, 100, 4, 1, 2)]
    resumed = [list(b) for b in micro_batch_indices(32, 100, 4, 1, 2)]
    assert resumed == full[4:]


def test_sampler_drops_a_ragged_tail_on_every_rank() -> None:
    # 10 samples, blocks of 2x2: two full blocks, the tail of 2 would reach only one rank.
    counts = [len(list(micro_batch_indices(0, 10, 2, r, 2))) for r in range(2)]
    assert counts == [2, 2]


def test_checkpoint_name_is_zero_padded() -> None:
    assert checkpoint_name(7) == "step_0000007"


def test_latest_pointer_is_used_when_nothing_newer_is_valid(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, committed=False)  # an interrupted save: no commit record
    (tmp_path / LATEST_FILE).write_text(checkpoint_name(10) + "\n")
    assert find_latest_valid(tmp_path) == tmp_path / checkpoint_name(10)


def test_a_newer_complete_checkpoint_than_latest_wins(tmp_path: Path) -> None:
    """A stale ``latest`` (issue 20 item 4): newer intact work of the same run is resumed."""
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20)
    (tmp_path / LATEST_FILE).write_text(checkpoint_name(10) + "\n")
    assert find_latest_valid(tmp_path, warn=lambda _: None) == tmp_path / checkpoint_name(20)


def test_broken_latest_falls_back_to_previous_valid(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 10)
    broken = _fake_checkpoint(tmp_path, 20, committed=False)
    (tmp_path / LATEST_FILE).write_text(broken.name)
    assert not is_valid(broken)
    assert find_latest_valid(tmp_path) == tmp_path / checkpoint_name(10)


def test_uncommitted_and_inconsistent_checkpoints_are_ignored(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 5)
    (tmp_path / "tmp-step_9").mkdir()
    lying = _fake_checkpoint(tmp_path, 8)
    (lying / META_FILE).write_text(json.dumps({"step": 3}))  # commit record of another step
    assert find_latest_valid(tmp_path) == tmp_path / checkpoint_name(5)


def test_no_checkpoint_dir_means_no_resume(tmp_path: Path) -> None:
    assert find_latest_valid(tmp_path / "missing") is None


def test_prune_keeps_newest_and_removes_abandoned_saves(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "tmp-step_5").mkdir()
    prune(tmp_path, keep_last=2, keep=tmp_path / checkpoint_name(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(3), checkpoint_name(4)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule.warmup_steps=30", "training.steps=20"], "schedule.warmup_steps=30"),
        (["schedule.decay_style=WSD"], "wsd_decay_steps"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr"),
        (["training.eval_interval=0"], "training.eval_interval"),
    ],
)
def test_schedule_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_schedule(load_config("tiny", overrides))


def test_overlapped_grad_reduce_gives_the_schedule_the_chunk_no_sync(mcore) -> None:
    # Megatron's no-pipelining schedule enters config.no_sync_func() as a context manager: one
    # model chunk must hand over that chunk's method; a list is the interleaved schedule's form
    # (mutants of `len(no_sync) == 1` in training/setup.py that hand over a list survived).
    from tests.helpers.checkpoints import objs

    built = objs("parallel.overlap_grad_reduce=true")
    assert len(built.model) == 1
    assert built.config.no_sync_func == built.model[0].no_sync
    with built.config.no_sync_func():
        pass
