"""Checkpoint integrity, in-process on a tiny model (real Megatron model, optimizer, scheduler).

Covers: the manifest and its checks (truncated / missing / overwritten files), ``resume=auto``
skipping a corrupt newest checkpoint with one warning, explicit resumes that fail in one line
(corrupt, other model, other tokenizer), resuming with changed optimizer hyper-parameters, the
non-finite safety floor, filesystem errors during a save (a real full tmpfs), and the writer having
no helper processes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from megaspan.errors import CheckpointError, RunDirError, UserError
from megaspan.training.checkpoint import (
    META_FILE,
    NonFiniteModelError,
    check_checkpoint,
    checkpoint_name,
    find_latest_valid,
    is_valid,
    load_checkpoint,
    remove_stale_tmp,
)
from megaspan.training.checkpoint import save as ck_save
from tests.helpers.checkpoints import objs as _objs
from tests.helpers.checkpoints import one_line as _one_line
from tests.helpers.checkpoints import save as _save
from tests.helpers.models import one_optimizer_step, tiny_overrides


def _shard(path: Path) -> Path:
    return max((p for p in path.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def _damage(path: Path, damage: str) -> str:
    """Damage the checkpoint at ``path`` one way; returns the name of the file that is wrong."""
    shard = _shard(path)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete":
        shard.unlink()
    elif damage == "garbage":  # same size: only the checksum sees it
        shard.write_bytes(os.urandom(shard.stat().st_size))
    elif damage == "no_meta":
        (path / META_FILE).unlink()
        return META_FILE
    elif damage == "no_metadata_json":
        (path / "metadata.json").unlink()
        return "metadata.json"
    else:
        raise ValueError(damage)
    return shard.name


# ---- manifest ----------------------------------------------------------------------------------


def test_commit_records_a_manifest_of_every_file(mcore, tmp_path):
    objs = _objs()
    path = _save(objs, tmp_path, 1)
    meta = json.loads((path / META_FILE).read_text())
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != META_FILE)
    assert sorted(meta["manifest"]) == files
    for name, entry in meta["manifest"].items():
        assert entry["size"] == (path / name).stat().st_size
        assert len(entry["crc32"]) == 8
    assert is_valid(path, verify=True)


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage", "no_meta", "no_metadata_json"])
def test_damage_is_detected(mcore, tmp_path, damage):
    objs = _objs()
    path = _save(objs, tmp_path, 1)
    _damage(path, damage)
    problem = check_checkpoint(path, verify=True)
    assert problem is not None
    assert is_valid(path) is (damage == "garbage")  # the cheap check is sizes only


def test_auto_resume_skips_a_corrupt_newest_with_one_warning(mcore, tmp_path):
    objs = _objs()
    _save(objs, tmp_path, 1)
    newest = _save(objs, tmp_path, 2)
    shard = _shard(newest)
    shard.write_bytes(shard.read_bytes()[:-10])
    warnings: list[str] = []
    assert find_latest_valid(tmp_path, warn=warnings.append) == tmp_path / checkpoint_name(1)
    assert len(warnings) == 1 and shard.name in warnings[0] and checkpoint_name(1) in warnings[0]


def test_auto_resume_with_checksums_skips_overwritten_newest(mcore, tmp_path):
    objs = _objs()
    _save(objs, tmp_path, 1)
    newest = _save(objs, tmp_path, 2)
    shard = _shard(newest)
    shard.write_bytes(os.urandom(shard.stat().st_size))
    warnings: list[str] = []
    assert find_latest_valid(tmp_path, verify=True, warn=warnings.append) == tmp_path / checkpoint_name(1)
    assert len(warnings) == 1 and "checksum" in warnings[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_meta"])
def test_explicit_corrupt_resume_is_one_line(mcore, tmp_path, damage):
    objs = _objs()
    path = _save(objs, tmp_path, 1)
    wrong = _damage(path, damage)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, objs.chunks, objs.optimizer, objs.scheduler)
    text = _one_line(err.value)
    assert str(path) in text
    if damage != "no_meta":
        assert wrong in text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_meta", "no_metadata_json"])
def test_explicit_unusable_resume_target_names_the_file(mcore, tmp_path, damage):
    """``checkpoint.resume=PATH`` is checked before the run dir is touched: one line naming the
    file that is wrong, not just "incomplete"."""
    from megaspan.config.loader import load_config
    from megaspan.training.build import resolve_resume

    path = _save(_objs(), tmp_path, 1)
    expected = _damage(path, damage)
    cfg = load_config(None, tiny_overrides(extra=[f"checkpoint.resume={path}"]))
    with pytest.raises(CheckpointError) as err:
        resolve_resume(cfg)
    text = _one_line(err.value)
    assert f"checkpoint.resume={path}" in text and expected in text


def test_checkpoint_of_another_model_names_the_tensor_and_shapes(mcore, tmp_path):
    path = _save(_objs(), tmp_path, 1)
    other = _objs("model.hidden_size=96", "model.num_attention_heads=4")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, other.chunks, other.optimizer, other.scheduler)
    text = _one_line(err.value)
    assert "another model" in text and "96" in text and "64" in text, text


def test_resume_with_another_tokenizer_is_refused(mcore, tmp_path):
    objs = _objs()
    one_optimizer_step(objs)
    path = _save(objs, tmp_path, 1, tokenizer_hash="a" * 64)
    assert json.loads((path / META_FILE).read_text())["tokenizer_hash"] == "a" * 64
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, objs.chunks, objs.optimizer, objs.scheduler, expected_tokenizer_hash="b" * 64)
    assert "another tokenizer" in _one_line(err.value)
    load_checkpoint(path, objs.chunks, objs.optimizer, objs.scheduler, expected_tokenizer_hash="a" * 64)


# ---- changed hyper-parameters ----------------------------------------------------------------


def test_resume_with_changed_optimizer_hyperparameters(mcore, tmp_path):
    objs = _objs("schedule.warmup_steps=1", "training.steps=8")
    for _ in range(3):
        one_optimizer_step(objs)
    path = _save(objs, tmp_path, 3)
    changed_cfg = (
        "optimizer.lr=0.002",
        "optimizer.min_lr=0.0002",
        "optimizer.weight_decay=0.05",
        "optimizer.clip_grad=0.5",
        "schedule.warmup_steps=2",
        "training.steps=12",
    )
    resumed_objs = _objs(*changed_cfg)
    resumed = load_checkpoint(path, resumed_objs.chunks, resumed_objs.optimizer, resumed_objs.scheduler)
    assert resumed.step == 3
    assert set(resumed.changed) >= {
        "optimizer.lr",
        "optimizer.min_lr",
        "optimizer.weight_decay",
        "optimizer.clip_grad",
        "schedule.warmup_steps",
        "schedule.decay_steps",
    }
    assert resumed.changed["optimizer.lr"] == (pytest.approx(0.001), pytest.approx(0.002))
    # The config's schedule applies from the resumed step: the scheduler kept the new values...
    sch = resumed_objs.scheduler
    assert sch.max_lr == pytest.approx(0.002) and sch.min_lr == pytest.approx(0.0002)
    assert sch.num_steps == 3
    # ... and so did the param groups Megatron's scheduler reads max_lr/min_lr from.
    for group in resumed_objs.optimizer.param_groups:
        assert group["max_lr"] == pytest.approx(0.002)
    # The optimizer state (Adam moments) was loaded, not re-initialized.
    inner = (
        resumed_objs.optimizer.chained_optimizers[0].optimizer
        if hasattr(resumed_objs.optimizer, "chained_optimizers")
        else resumed_objs.optimizer.optimizer
    )
    moments = [s["exp_avg"] for s in inner.state.values() if "exp_avg" in s]
    assert moments and any(float(m.abs().sum()) > 0 for m in moments)
    one_optimizer_step(resumed_objs)  # and training goes on


def test_unchanged_resume_reports_no_changes(mcore, tmp_path):
    objs = _objs()
    one_optimizer_step(objs)
    path = _save(objs, tmp_path, 1)
    again = _objs()
    assert load_checkpoint(path, again.chunks, again.optimizer, again.scheduler).changed == {}


# ---- non-finite safety floor -------------------------------------------------------------------


def test_non_finite_model_is_never_committed_and_prune_keeps_finite(mcore, tmp_path):
    objs = _objs()
    _save(objs, tmp_path, 1, keep_last=1)
    good = _save(objs, tmp_path, 2, keep_last=1)
    with torch.no_grad():
        next(objs.chunks[0].parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteModelError) as err:
        _save(objs, tmp_path, 3, keep_last=1)
    assert err.value.step == 3 and err.value.aside == tmp_path / "diverged-step_3"
    assert "step 3" in _one_line(err.value) and checkpoint_name(2) in str(err.value)
    assert (tmp_path / "latest").read_text().strip() == good.name
    assert find_latest_valid(tmp_path) == good
    with pytest.raises(NonFiniteModelError) as err:  # written aside at most once
        _save(objs, tmp_path, 4, keep_last=1)
    assert err.value.aside is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["diverged-step_3", good.name, "latest"])


# ---- stale tmp, filesystem errors ----------------------------------------------------------------


def test_remove_stale_tmp_logs_each(tmp_path):
    (tmp_path / "tmp-step_7").mkdir()
    (tmp_path / "tmp-step_7" / "x").write_text("partial")
    (tmp_path / checkpoint_name(5)).mkdir()
    lines: list[str] = []
    assert remove_stale_tmp(tmp_path, lines.append) == [tmp_path / "tmp-step_7"]
    assert len(lines) == 1 and "tmp-step_7" in lines[0]
    assert (tmp_path / checkpoint_name(5)).is_dir()
    assert remove_stale_tmp(tmp_path / "missing") == []


def test_full_disk_during_save_is_one_line_and_keeps_earlier(mcore, small_tmpfs):
    objs = _objs()
    ckpts = small_tmpfs / "ckpts"
    first = _save(objs, ckpts, 1)
    # Fill the filesystem so the next save cannot fit.
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))
    with pytest.raises(RunDirError) as err:
        _save(objs, ckpts, 2)
    text = _one_line(err.value)
    assert "ENOSPC" in text and str(ckpts) in text
    assert not any(ckpts.glob("tmp-*"))
    assert (ckpts / "latest").read_text().strip() == first.name and is_valid(first, verify=True)


def test_read_only_checkpoint_dir_is_one_line(mcore, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a read-only bind... simplest honest check is a
        # read-only tmpfs remount.
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            with pytest.raises(RunDirError) as err:
                _save(_objs(), mnt / "ckpts", 1)
            assert "EROFS" in _one_line(err.value)
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(RunDirError) as err:
            _save(_objs(), ro / "ckpts", 1)
        assert "EACCES" in _one_line(err.value)


def test_run_dir_error_is_a_user_error():
    assert issubclass(RunDirError, UserError) and issubclass(NonFiniteModelError, UserError)


# ---- writer without helper processes -------------------------------------------------------------


def test_save_starts_no_helper_process(mcore, tmp_path):
    objs = _objs()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    _save(objs, tmp_path, 1)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after - before == set()


def test_fault_injection_point_is_a_function(monkeypatch, mcore, tmp_path):
    """A crash after the shards are written and before the commit leaves only tmp-*: latest
    stays on the previous checkpoint (tests inject it by patching checkpoint.save._write_shards)."""
    objs = _objs()
    first = _save(objs, tmp_path, 1)
    real = ck_save._write_shards

    def crash(state, tmp):
        real(state, tmp)
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(ck_save, "_write_shards", crash)
    with pytest.raises(RuntimeError):
        _save(objs, tmp_path, 2)
    assert (tmp_path / "latest").read_text().strip() == first.name
    assert find_latest_valid(tmp_path) == first


def test_signals_during_a_save_let_it_finish(monkeypatch, mcore, tmp_path):
    """SIGTERM and a first Ctrl-C arriving mid-write only set the flag; the save commits."""
    import signal

    from megaspan.training.signals import PreemptionFlag

    objs = _objs()
    real = ck_save._write_shards

    def signalled_write(state, tmp):
        os.kill(os.getpid(), signal.SIGINT)
        real(state, tmp)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ck_save, "_write_shards", signalled_write)
    flag = PreemptionFlag()
    flag.install()
    try:
        path = _save(objs, tmp_path, 1)
    finally:
        flag.restore()
    assert is_valid(path, verify=True) and (tmp_path / "latest").read_text().strip() == path.name
    assert flag.signum == signal.SIGINT and flag.exit_code == 130
