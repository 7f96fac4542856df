"""The run directory: one live run per dir, resolved config.yaml written only after a good
start, one-line filesystem errors, TensorBoard without redone steps, logged resume changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megaspan.config.loader import load_config
from megaspan.errors import RunDirError, UserError
from megaspan.training.build import build_trainer
from megaspan.training.rundir import CONFIG_FILE, RunDirLock
from tests.distributed import layout_workers as lw


def _datasets():
    return (
        lw.synthetic_dataset(lw.STEPS * lw.GLOBAL_BATCH, 1),
        lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, 2),
    )


def _build(run: Path, **options):
    cfg = lw.layout_config("pre", False, "tp1", str(run), **options)
    return build_trainer(cfg, datasets=_datasets(), vocab_size=lw.VOCAB)


def _fit(run: Path, **options):
    trainer = _build(run, **options)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def test_a_second_live_run_is_refused_in_one_line(tmp_path):
    first, second = RunDirLock(tmp_path), RunDirLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match="in use by another live run") as err:
        second.acquire()
    assert "\n" not in str(err.value) and str(os.getpid()) in str(err.value)
    first.release()
    second.acquire()  # free again once the holder is gone
    second.release()


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from megaspan.training.rundir import "
            "RunDirLock; RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError):
            RunDirLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock = RunDirLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead run's lock
    lock.release()


def test_the_second_trainer_in_a_live_run_dir_is_refused(single_process_group, tmp_path):
    trainer = _build(tmp_path / "run")
    try:
        with pytest.raises(RunDirError, match="in use"):
            _build(tmp_path / "run")
    finally:
        trainer.close()


def test_config_yaml_holds_resolved_values_and_round_trips(single_process_group, tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=2)
    text = (run / CONFIG_FILE).read_text()
    assert "# world: " in text and '"megatron-core"' in text and "# tokenizer_hash:" in text
    cfg = yaml.safe_load(text)
    assert cfg["model"]["vocab_size"] == lw.VOCAB and cfg["precision"]["dtype"] == "fp32"
    assert load_config(str(run / CONFIG_FILE), []).model.vocab_size == lw.VOCAB


def test_a_failed_resume_leaves_config_yaml_untouched(single_process_group, tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=2, save_at_end=True)
    before = (run / CONFIG_FILE).read_bytes()
    # Another model size in the same run dir: the resume fails after the run dir is opened.
    cfg = lw.layout_config(
        "pre", False, "tp1", str(run), resume="auto", load_optimizer=True, extra=("model.hidden_size=32",)
    )
    with pytest.raises(UserError):
        build_trainer(cfg, datasets=_datasets(), vocab_size=lw.VOCAB)
    assert (run / CONFIG_FILE).read_bytes() == before
    _build(run, resume="auto", load_optimizer=True).close()  # and the lock was released


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_unusable_run_dir_is_one_line(single_process_group, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    run = blocker if where == "file" else blocker / "run"
    with pytest.raises(RunDirError) as err:
        _build(run)
    message = str(err.value)
    assert "\n" not in message and str(blocker) in message and "training.run_dir" in message


def test_tensorboard_hides_the_steps_a_resume_redoes(single_process_group, tmp_path):
    from tests.helpers.cli import scalars

    run = tmp_path / "run"
    tb = ("logging.tensorboard=true", "logging.log_interval=1", "checkpoint.save_interval=2")
    _fit(run, steps=3, extra=tb)  # checkpoint at 2, steps 1-3 logged
    first, first_lr = scalars(run, "train/loss"), scalars(run, "train/lr")
    resumed = _fit(
        run, steps=lw.STEPS, resume="auto", load_optimizer=True, extra=(*tb, "optimizer.lr=1.0e-3")
    )
    assert resumed.progress.step == lw.STEPS
    after = scalars(run, "train/loss")
    assert sorted(after) == list(range(1, lw.STEPS + 1))  # step 3 once, from the resumed run
    assert after[1] == first[1] and after[2] == first[2]
    # Step 3's loss comes before its update; its learning rate is the new run's (the old one hidden).
    assert after[3] == first[3] and scalars(run, "train/lr")[3] < first_lr[3] / 2


def test_changed_optimizer_keys_on_resume_are_applied_and_logged(single_process_group, tmp_path, capsys):
    run = tmp_path / "run"
    _fit(run, steps=2, save_at_end=True)
    capsys.readouterr()
    trainer = _build(
        run, resume="auto", load_optimizer=True, extra=("optimizer.lr=1.0e-3", "optimizer.min_lr=1.0e-4")
    )
    trainer.close()
    out = capsys.readouterr().out
    assert "resume: optimizer.lr changed 0.003 -> 0.001; the new value applies from step 3" in out
    assert "resume: optimizer.min_lr changed" in out
    assert trainer.objs.scheduler.max_lr == pytest.approx(1.0e-3)
