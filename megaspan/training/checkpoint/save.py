"""Saving and committing a checkpoint: finite check, shards, manifest, atomic rename, ``latest``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as _DcpException

from megaspan.errors import CheckpointError, RunDirError
from megaspan.training.checkpoint.layout import (
    _TMP_PREFIX,
    DIVERGED_PREFIX,
    LATEST_FILE,
    LEGACY_LINEAGE,
    META_FILE,
    SUPERSEDED_PREFIX,
    Progress,
    _barrier,
    _first_error,
    _is_distributed,
    _latest_name,
    _manifest,
    _rank,
    _sharded_state_dict,
    _world,
    _write_atomic,
    checkpoint_name,
    hyperparameters,
    lineage_of,
)
from megaspan.training.checkpoint.pruning import prune


class NonFiniteModelError(CheckpointError):
    """The model to be saved has NaN/Inf parameters: it was not committed as a checkpoint.

    ``step`` is the step of the refused save and ``aside`` the ``diverged-step_N`` copy kept for
    debugging (None when one already existed: only the first diverged model is kept, so a
    diverged run cannot fill the disk). ``latest`` and every ``step_*`` checkpoint are untouched,
    so pruning can never delete the newest finite checkpoint. A subclass of ``CheckpointError``
    (a ``UserError``): if nothing catches it, the CLI prints its one line and exits 2.
    """

    def __init__(
        self, step: int, bad_tensors: int, total_tensors: int, aside: Path | None, latest: str | None
    ):
        self.step, self.aside = step, aside
        kept = f"kept aside as {aside}" if aside else "not written (a diverged-step_* copy already exists)"
        resume = f"the last finite checkpoint is {latest}" if latest else "no finite checkpoint exists yet"
        super().__init__(
            f"training diverged: at step {step} {bad_tensors} of {total_tensors} parameter tensors are "
            f"non-finite (NaN/Inf); the checkpoint was {kept}; {resume}: lower optimizer.lr or raise "
            "schedule.warmup_steps and resume from it"
        )


def _sync_save_strategy():
    """Megatron's torch_dist format, written synchronously by the saving process itself.

    Why not Megatron's default (``TorchDistSaveShardedStrategy.save``): it always goes through
    its deprecated MCore async machinery (``FileSystemWriterAsync`` driven synchronously,
    "MCore's async save is deprecated" at every save), whose results queue lives in a
    ``multiprocessing.Manager`` child process. That child shares the rank's session and process
    group, so the SIGTERM of ``scancel``/``kill -TERM -PGID``/torchrun's shutdown kills it in the
    middle of the very checkpoint the signal asked for (``ConnectionResetError``, lost progress),
    and after a ``kill -9`` of the rank it is left behind as an orphan. The async path only pays
    off when the training loop overlaps the write, which megaspan does not do (a preemption save
    must be complete before exit anyway). Torch DCP's own ``FileSystemWriter`` with one writer
    thread writes the same format (``.metadata`` + ``__<rank>_0.distcp``, loaded by Megatron's
    ``TorchDistLoadShardedStrategy`` unchanged) from the calling thread: no helper process, no
    thread, nothing for a signal to kill. ``FullyParallelSaveStrategyWrapper`` is not used
    either: it only spreads replicated shards across DP ranks, which matters at large DP, and
    wraps the same writer.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            dcp_save(
                mcore_to_pyt_state_dict(sharded_state_dict, False),
                storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica,
                    flatten_state_dict=False,
                    flatten_sharded_tensors=False,
                ),
            )

    return SyncTorchDistSaveStrategy(backend="torch_dist")


# ---- errors ---------------------------------------------------------------------------------

_FS_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.EFBIG,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EIO,
}


def _os_error(exc: BaseException | None, seen: set[int] | None = None) -> OSError | None:
    """The filesystem error inside ``exc``: itself, its cause/context, or a failure of torch
    DCP's ``CheckpointException`` (which collects one exception per rank)."""
    seen = seen if seen is not None else set()
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _FS_ERRNOS:
        return exc
    for failure in (getattr(exc, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException) and (found := _os_error(inner, seen)):
            return found
    return _os_error(exc.__cause__, seen) or _os_error(exc.__context__, seen)


def _probe_write(directory: Path, size: int = 1 << 20) -> OSError | None:
    """The filesystem error a write into ``directory`` gets now, if any.

    torch's zip writer turns a failed ``write`` (ENOSPC, EFBIG) into ``RuntimeError: unexpected
    pos``, losing the errno; after a failed save, one real write (fsynced, then removed) recovers
    it, before the partial checkpoint is deleted and frees the space."""
    probe = directory / f".megaspan-probe-{_rank()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc if exc.errno in _FS_ERRNOS else None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def _run_dir_error(exc: OSError, where: Path, ckpt_dir: Path) -> RunDirError:
    what = {
        errno.ENOSPC: "the filesystem is full: free space there",
        errno.EDQUOT: "the disk quota is exceeded: free space there",
        errno.EFBIG: "a file size limit was hit (ulimit -f): raise it",
        errno.EROFS: "the filesystem is read-only: use a writable one",
        errno.EACCES: "permission denied: fix the directory's permissions",
        errno.EPERM: "permission denied: fix the directory's permissions",
    }.get(exc.errno, "fix the directory")
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return RunDirError(
        f"cannot write checkpoint {where} ({name}: {exc.strerror}); {what} or set checkpoint.dir to "
        f"another directory; earlier checkpoints in {ckpt_dir} are untouched"
    )


# ---- save -----------------------------------------------------------------------------------


def _nonfinite_counts(chunks: list) -> tuple[int, int]:
    """(non-finite, total) parameter tensors over all ranks (collective)."""
    device = _param_device(chunks)
    finite = [torch.isfinite(p.detach()).all() for chunk in chunks for p in chunk.parameters()]
    bad = (
        torch.stack(finite).logical_not().sum()
        if finite
        else torch.zeros((), dtype=torch.int64, device=device)
    )
    # One device->host sync for the whole model, not one per tensor.
    counts = torch.stack([bad.to(torch.int64), torch.tensor(len(finite), dtype=torch.int64, device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _param_device(chunks: list) -> torch.device:
    for chunk in chunks:
        for p in chunk.parameters():
            return p.device
    return torch.device("cpu")


def _write_shards(state: dict, tmp: Path) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(tmp), sharded_strategy=_sync_save_strategy())


def save_checkpoint(
    ckpt_dir: Path,
    progress: Progress,
    chunks: list,
    optimizer,
    scheduler,
    config: dict[str, Any],
    keep_last: int | None,
    *,
    tokenizer_hash: str | None = None,
    lineage: str | None = None,
    data_identity: dict[str, Any] | None = None,
) -> Path:
    """Save and commit a checkpoint of ``progress.step`` (collective: call on every rank).

    Raises :class:`NonFiniteModelError` (nothing committed, ``latest`` untouched) when a
    parameter is NaN/Inf, and :class:`~megaspan.errors.RunDirError` with one line naming the path
    when the filesystem refuses the write (full, read-only, permissions): the partial
    ``tmp-step_N`` is removed and earlier checkpoints are untouched. ``tokenizer_hash``
    (:func:`megaspan.data.tokenizer.tokenizer_hash`) is recorded so that a resume with another
    tokenizer can be refused; ``data_identity``
    (:func:`megaspan.data.datasets.dataset_identity`: prefixes, sizes, ``.idx`` hashes, blend) so
    that a resume on other data can be.

    ``lineage`` names the run the checkpoint belongs to (:func:`new_lineage` at a fresh start,
    the resumed checkpoint's :attr:`Resumed.lineage` after a resume; rank 0's value is the one
    recorded). Pruning deletes only checkpoints of the same lineage, and a save whose step
    directory already holds another lineage's checkpoint moves that one aside
    (``superseded-<lineage>-step_N``) instead of deleting it. None = :data:`LEGACY_LINEAGE`.
    """
    lineage = lineage or LEGACY_LINEAGE
    step = progress.step
    bad, total = _nonfinite_counts(chunks)
    diverged = bad > 0
    if diverged and any(ckpt_dir.glob(f"{DIVERGED_PREFIX}*")):
        raise NonFiniteModelError(step, bad, total, None, _latest_name(ckpt_dir))
    final = ckpt_dir / (f"{DIVERGED_PREFIX}{step}" if diverged else checkpoint_name(step))
    tmp = ckpt_dir / f"{_TMP_PREFIX}{step}"
    error: str | None = None
    try:
        if _rank() == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a stale attempt of the same step
            tmp.mkdir()
    except OSError as exc:
        if exc.errno not in _FS_ERRNOS:
            raise
        error = str(_run_dir_error(exc, tmp, ckpt_dir))
    if (error := _first_error(error)) is not None:
        raise RunDirError(error)
    state = _sharded_state_dict(
        chunks,
        optimizer,
        scheduler,
        is_loading=False,
        with_rng=True,
        extra={"step": step, "consumed_samples": progress.consumed_samples, "config": config},
    )
    try:
        # DCP reports a write failure of any rank on every rank, so all ranks get here together.
        _write_shards(state, tmp)
        manifest = _manifest(tmp)
        local_error = None
        if _rank() == 0:
            try:
                _commit(
                    ckpt_dir,
                    tmp,
                    final,
                    progress,
                    optimizer,
                    scheduler,
                    manifest,
                    tokenizer_hash,
                    diverged,
                    lineage,
                    data_identity,
                    config,
                )
                if not diverged:
                    prune(ckpt_dir, keep_last, keep=final, lineage=lineage)
            except OSError as exc:
                if exc.errno not in _FS_ERRNOS:
                    raise
                local_error = str(_run_dir_error(exc, tmp, ckpt_dir))
        if (local_error := _first_error(local_error)) is not None:
            raise RunDirError(local_error)
    except (Exception, _DcpException) as exc:
        os_error = None if isinstance(exc, RunDirError) else (_os_error(exc) or _probe_write(tmp))
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if os_error is not None:
            raise _run_dir_error(os_error, tmp, ckpt_dir) from None
        raise
    _barrier()
    if diverged:
        raise NonFiniteModelError(step, bad, total, final, _latest_name(ckpt_dir))
    return final


def _commit(
    ckpt_dir: Path,
    tmp: Path,
    final: Path,
    progress: Progress,
    optimizer,
    scheduler,
    manifest: dict,
    tokenizer_hash: str | None,
    diverged: bool,
    lineage: str,
    data_identity: dict[str, Any] | None,
    config: dict[str, Any],
) -> None:
    meta = {
        "lineage": lineage,
        "data": data_identity,
        # The model settings, to say what differs when a resume does not fit (see load_checkpoint).
        "model": config.get("model") if isinstance(config, dict) else None,
        "step": progress.step,
        "consumed_samples": progress.consumed_samples,
        "world_size": _world(),
        # Its optimizer-state format differs from the plain optimizer's (checked on load).
        "distributed_optimizer": _is_distributed(optimizer),
        "tokenizer_hash": tokenizer_hash,
        "hyperparameters": hyperparameters(optimizer, scheduler),
        "manifest": manifest,
        "saved_at": time.time(),
    }
    _write_atomic(tmp / META_FILE, json.dumps(meta, default=str))
    if final.exists():
        other = lineage_of(final)
        if other == lineage:  # re-saving a step (e.g. after a resume): the new copy wins
            shutil.rmtree(final)
        else:  # another run's (or an unreadable) checkpoint: never deleted, moved aside
            aside = ckpt_dir / f"{SUPERSEDED_PREFIX}{(other or 'unknown')[:12]}-{final.name}"
            shutil.rmtree(aside, ignore_errors=True)  # the same step of the same other run, twice
            os.rename(final, aside)
            print(
                f"megaspan: warning: {final} held a checkpoint of another run (lineage {other or 'unknown'}): "
                f"moved it to {aside}",
                file=sys.stderr,
                flush=True,
            )
    os.rename(tmp, final)
    if not diverged:
        _write_atomic(ckpt_dir / LATEST_FILE, final.name + "\n")
