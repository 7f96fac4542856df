"""``checkpoint.async_save``: shards written by a background thread, committed by the same protocol.

In-process, on a real tiny Megatron model, optimizer and scheduler:

* the save returns before the write is committed, and what is committed is the state at the
  save, not the state the optimizer has moved on to since (the copy to CPU is the snapshot);
* nothing is visible (no ``step_N``, ``latest`` unchanged) until :func:`finish_save`;
* a full disk during the background write is one line at the commit, with the partial
  ``tmp-step_N`` removed and earlier checkpoints untouched;
* no helper process is started (a thread dies with its process: nothing to orphan);
* the trainer: interval saves in the background, committed at a later step boundary, a resume from
  them reproduces an uninterrupted run, a SIGTERM during a write commits it before the stop's own
  save, and a crash during a write still commits it (one process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch

from megaspan.errors import RunDirError
from megaspan.training.build import build_trainer
from megaspan.training.checkpoint import (
    LATEST_FILE,
    PendingSave,
    checkpoint_name,
    finish_save,
    is_valid,
    load_checkpoint,
    read_meta,
    save_done,
)
from megaspan.training.checkpoint import save as ck_save
from megaspan.training.hooks import Hook
from tests.distributed import layout_workers as lw
from tests.helpers.checkpoints import objs as _objs
from tests.helpers.checkpoints import one_line as _one_line
from tests.helpers.checkpoints import save as _save
from tests.helpers.models import one_optimizer_step, tiny_overrides


def _params(objs) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in objs.chunks[0].named_parameters()}


def _wait(pending: PendingSave) -> None:
    pending.written.result(timeout=120)
    assert save_done(pending)


def test_background_save_commits_the_state_at_the_save_not_later_updates(monkeypatch, mcore, tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter

    # Hold torch's writer until training has moved on (fault injection on the test side): the
    # thread then writes after the live tensors changed, whatever the machine's speed.
    gate, real = threading.Event(), FileSystemWriter.write_data

    def held(self, *args, **kwargs):
        assert gate.wait(120)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", held)
    objs = _objs()
    one_optimizer_step(objs)
    at_save = _params(objs)
    pending = _save(objs, tmp_path, 1, background=True)
    assert isinstance(pending, PendingSave) and pending.blocked_s > 0
    assert not pending.written.done()
    # Train on while the thread waits to write: the live tensors change under it.
    for _ in range(2):
        one_optimizer_step(objs)
    moved = _params(objs)
    assert any(not torch.equal(moved[n], at_save[n]) for n in at_save)
    gate.set()
    _wait(pending)
    path = finish_save(pending)
    assert path == tmp_path / checkpoint_name(1) and is_valid(path, verify=True)
    assert (tmp_path / LATEST_FILE).read_text().strip() == path.name
    assert read_meta(path)["step"] == 1 and read_meta(path)["manifest"]

    fresh = _objs()
    load_checkpoint(path, fresh.chunks, fresh.optimizer, fresh.scheduler)
    loaded = _params(fresh)
    for name, value in at_save.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_background_save_is_byte_identical_in_content_to_a_synchronous_one(mcore, tmp_path):
    objs = _objs()
    one_optimizer_step(objs)
    sync = _save(objs, tmp_path / "sync", 1, background=False)
    pending = _save(objs, tmp_path / "async", 1, background=True)
    _wait(pending)
    background = finish_save(pending)
    files = sorted(read_meta(sync)["manifest"])
    assert files == sorted(read_meta(background)["manifest"])
    # The tensors' bytes are the same; only DCP's .metadata and the pickles may differ in layout.
    a, b = _objs(), _objs()
    load_checkpoint(sync, a.chunks, a.optimizer, a.scheduler)
    load_checkpoint(background, b.chunks, b.optimizer, b.scheduler)
    for (name, x), (_, y) in zip(a.chunks[0].named_parameters(), b.chunks[0].named_parameters()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert json.dumps(sa["param_groups"], default=str) == json.dumps(sb["param_groups"], default=str)


def test_nothing_is_visible_until_the_commit(mcore, tmp_path):
    objs = _objs()
    first = _save(objs, tmp_path, 1, background=False)
    pending = _save(objs, tmp_path, 2, background=True)
    _wait(pending)
    assert not (tmp_path / checkpoint_name(2)).exists() and (tmp_path / "tmp-step_2").is_dir()
    assert (tmp_path / LATEST_FILE).read_text().strip() == first.name
    finish_save(pending)
    assert (tmp_path / LATEST_FILE).read_text().strip() == checkpoint_name(2)
    assert not (tmp_path / "tmp-step_2").exists()


def test_a_failed_background_write_is_one_line_at_the_commit_and_keeps_earlier(mcore, small_tmpfs):
    objs = _objs()
    ckpts = small_tmpfs / "ckpts"
    first = _save(objs, ckpts, 1, background=False)
    # Leave room for what the caller writes itself (common.pt, metadata.json) but not for the
    # shards the background thread writes: the failure happens in the thread.
    own = sum(p.stat().st_size for p in first.iterdir() if p.suffix != ".distcp") + 64 * 1024
    shards = sum(p.stat().st_size for p in first.iterdir() if p.suffix == ".distcp")
    assert shards > 2 * own
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * max(free - own, 0))
    try:
        pending = _save(objs, ckpts, 2, background=True)
        assert pending.written.exception(timeout=120) is not None  # the write failed in the thread
        with pytest.raises(RunDirError) as err:
            finish_save(pending)
    finally:
        (small_tmpfs / "filler").unlink()
    text = _one_line(err.value)
    assert "ENOSPC" in text and str(ckpts) in text
    assert not any(ckpts.glob("tmp-*"))
    assert (ckpts / LATEST_FILE).read_text().strip() == first.name and is_valid(first, verify=True)


def test_a_write_error_in_the_thread_is_raised_at_the_commit(monkeypatch, mcore, tmp_path):
    objs = _objs()
    first = _save(objs, tmp_path, 1, background=False)

    def broken(write, tmp, group):
        write.result()
        raise RuntimeError("simulated failure of the background write")

    monkeypatch.setattr(ck_save, "_written", broken)
    pending = _save(objs, tmp_path, 2, background=True)
    with pytest.raises(RuntimeError, match="simulated failure"):
        finish_save(pending)
    assert not (tmp_path / "tmp-step_2").exists()
    assert (tmp_path / LATEST_FILE).read_text().strip() == first.name


def test_background_save_starts_no_helper_process(mcore, tmp_path):
    objs = _objs()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pending = _save(objs, tmp_path, 1, background=True)
    during = {p.pid for p in psutil.Process().children(recursive=True)}
    _wait(pending)
    finish_save(pending)
    assert during - before == set()


# ---- the trainer ---------------------------------------------------------------------------------


class Record(Hook):
    """Per-step losses, which checkpoints exist after each step, and optional actions."""

    def __init__(self, at_step=None) -> None:
        self.losses: dict[int, float] = {}
        self.committed: dict[int, list[str]] = {}
        self.in_flight: dict[int, int | None] = {}
        self.at_step = at_step or {}

    def on_step_end(self, trainer, result) -> None:
        self.losses[result.step] = result.loss
        ckpt = trainer.cfg.checkpoint.dir
        self.committed[result.step] = sorted(p.name for p in os.scandir(ckpt) if p.name.startswith("step_"))
        self.in_flight[result.step] = trainer.saving.step if trainer.saving is not None else None
        if result.step in self.at_step:
            self.at_step[result.step](trainer)


def _fit(run, hook, *extra, steps=6, preempt=None):
    cfg = lw.layout_config(
        "pre",
        False,
        "tp1",
        str(run),
        steps=steps,
        save_at_end=True,
        extra=(
            "checkpoint.save_interval=2",
            "checkpoint.async_save=true",
            "model.hidden_dropout=0.1",
            *extra,
        ),
    )
    trainer = build_trainer(
        cfg,
        hooks=[hook],
        datasets=(
            lw.synthetic_dataset(16 * steps, seed=1),
            lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, 2),
        ),
        vocab_size=lw.VOCAB,
        preempt=preempt,
    )
    try:
        code = trainer.fit()
    finally:
        trainer.close()
    return trainer, code


def test_trainer_saves_in_the_background_and_resumes_bitwise(single_process_group, tmp_path):
    straight = Record()
    _fit(tmp_path / "straight", straight, "checkpoint.async_save=false")
    first = Record()
    trainer, code = _fit(tmp_path / "split", first)
    assert code == 0
    run = tmp_path / "split"
    assert sorted(p.name for p in run.glob("step_*")) == [checkpoint_name(s) for s in (2, 4, 6)]
    # Each interval save went to the background; a later step boundary (or the end) committed it.
    assert first.in_flight[2] == 2 and checkpoint_name(2) not in first.committed[2]
    assert checkpoint_name(2) in first.committed[4]
    assert first.losses == straight.losses  # the background copy does not touch training

    # Resume the async-saved step 4 in a new trainer: steps 5-6 equal the uninterrupted run.
    shutil.rmtree(run / checkpoint_name(6))
    (run / LATEST_FILE).write_text(checkpoint_name(4) + "\n")
    resumed = Record()
    _fit(run, resumed, "checkpoint.resume=auto")
    assert sorted(resumed.losses) == [5, 6]
    assert {s: resumed.losses[s] for s in (5, 6)} == {s: straight.losses[s] for s in (5, 6)}


def test_sigterm_during_a_background_write_commits_it_then_saves_the_stop(
    monkeypatch, single_process_group, tmp_path
):
    from megaspan.training.signals import PreemptionFlag

    real = ck_save._written

    def slow(write, tmp, group):  # a write that outlasts the next step
        time.sleep(3)
        return real(write, tmp, group)

    monkeypatch.setattr(ck_save, "_written", slow)
    hook = Record(at_step={2: lambda trainer: os.kill(os.getpid(), signal.SIGTERM)})
    flag = PreemptionFlag()
    flag.install()
    try:
        trainer, code = _fit(tmp_path / "run", hook, steps=20, preempt=flag)
    finally:
        # The trainer's end calls flag.finish(), after which restore() has nothing to restore:
        # the autouse fixture in tests/conftest.py puts pytest's handlers back after the test.
        flag.restore()
    run = tmp_path / "run"
    # SIGTERM after step 2's save started; the loop stops at step 3, with step 2 still writing.
    assert code == 0 and trainer.progress.step == 3, code
    assert hook.in_flight[3] == 2 and hook.committed[3] == []
    # The end of training waited for it and committed it, then saved the stop's own checkpoint.
    assert sorted(p.name for p in run.glob("step_*")) == [checkpoint_name(2), checkpoint_name(3)]
    assert all(is_valid(run / checkpoint_name(s), verify=True) for s in (2, 3))
    assert (run / LATEST_FILE).read_text().strip() == checkpoint_name(3)
    assert not any(run.glob("tmp-*")) and trainer.saving is None


def test_a_crash_during_a_background_write_still_commits_it(monkeypatch, single_process_group, tmp_path):
    def crash(trainer):
        raise RuntimeError("simulated crash in the training loop")

    real = ck_save._written

    def slow(write, tmp, group):  # still writing when the crash comes
        time.sleep(3)
        return real(write, tmp, group)

    monkeypatch.setattr(ck_save, "_written", slow)
    hook = Record(at_step={3: crash})
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", hook, steps=20)
    run = tmp_path / "run"
    assert hook.in_flight[3] == 2  # the crash came while step 2 was being written
    assert is_valid(run / checkpoint_name(2), verify=True)
    assert (run / LATEST_FILE).read_text().strip() == checkpoint_name(2)


def test_async_save_is_a_config_key(single_process_group):
    from megaspan.config.loader import load_config

    assert load_config(None, tiny_overrides(extra=("checkpoint.async_save=true",))).checkpoint.async_save
    assert not load_config(None, tiny_overrides()).checkpoint.async_save


@pytest.mark.integration
def test_megaspan_train_with_async_save_commits_and_exits(tmp_path):
    """The CLI joins every non-daemon thread before it exits: a background save's thread must end
    with its job (an idle executor thread hung the exit for good)."""
    from tests.helpers.cli import train

    run = tmp_path / "run"
    result = train(
        run,
        "training.steps=4",
        "schedule.warmup_steps=1",
        "checkpoint.save_interval=2",
        "checkpoint.async_save=true",
        fresh_process=True,  # what is tested is the process's exit
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "writing in the background" in result.stdout
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [checkpoint_name(2), checkpoint_name(4)]
    assert all(is_valid(ckpts / checkpoint_name(s), verify=True) for s in (2, 4))
