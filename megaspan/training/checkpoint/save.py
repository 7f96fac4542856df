"""Saving and committing a checkpoint: finite check, shards, manifest, atomic rename, ``latest``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
    and after a ``kill -9`` of the rank it is left behind as an orphan. Torch DCP's own
    ``FileSystemWriter`` with one writer thread writes the same format (``.metadata`` +
    ``__<rank>_0.distcp``, loaded by Megatron's ``TorchDistLoadShardedStrategy`` unchanged) from
    the calling thread: no helper process, no thread, nothing for a signal to kill.
    ``FullyParallelSaveStrategyWrapper`` is not used either: it only spreads replicated shards
    across DP ranks, which matters at large DP, and wraps the same writer.
    """
    return _save_strategy()


def _save_strategy(background: _Background | None = None):
    """The torch_dist strategy :func:`_sync_save_strategy` describes; with ``background``, the
    shards are written by torch DCP's ``async_save`` instead (``checkpoint.async_save``).

    :func:`_snapshot` first copies every tensor to CPU memory in the calling thread (the snapshot:
    the next optimizer step may change the live tensors at once); ``async_save`` then writes the
    copies from a *thread* of this process over ``background.group``, a gloo group of its own: a thread dies
    with its process (no orphan writer after ``kill -9``, unlike MCore's forked writers), and a
    group of its own keeps its collectives (DCP's plan and finish) out of the order of the
    training loop's collectives on the other groups. The future lands in ``background.write``.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import async_save as dcp_async_save
    from torch.distributed.checkpoint import save as dcp_save

    class TorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            if background is not None:
                _snapshot(sharded_state_dict)
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            state = mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True)
            planner = MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica,
                flatten_state_dict=False,
                flatten_sharded_tensors=False,
            )
            if background is None:
                dcp_save(state, storage_writer=writer, planner=planner)
            else:
                background.write = dcp_async_save(
                    state,
                    storage_writer=writer,
                    planner=planner,
                    process_group=background.group,
                    async_stager=_Staged(),
                )

    return TorchDistSaveStrategy(backend="torch_dist")


def _snapshot(sharded_state_dict) -> None:
    """Point every ShardedTensor at a host copy of its data: the snapshot the background thread
    writes while training changes the live tensors. Done here rather than by DCP's stager, which
    cannot copy Megatron's ``CheckpointableShardedTensor`` wrappers (it raises "__torch_dispatch__
    not implemented"); MCore's own async writer preloads to CPU the same way."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for item in nested_values(sharded_state_dict):
        if isinstance(item, ShardedTensor):
            item.data = item.data.detach().to("cpu", copy=True)


class _Staged:
    """DCP's ``AsyncStager`` for a state dict that :func:`_snapshot` has already copied."""

    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Background:
    group: Any
    write: Future | None = None


_GROUP: list = []
"""[(weakref to the default process group it was made under, weakref to the gloo group)]: weak,
so that destroying the process groups frees the gloo group's threads (a strong reference here
kept them alive, caught by test_runtime_contract)."""


def _background_group():
    """The gloo group the background writes use (created once per default process group,
    collectively, at the first async save; None without a process group). DCP's async save needs
    a group with a CPU backend, and the training loop's groups are NCCL on GPU."""
    if not dist.is_initialized():
        return None
    world = dist.GroupMember.WORLD
    group = _GROUP[0][1]() if _GROUP else None
    if group is None or _GROUP[0][0]() is not world or not _alive(group):
        # first use, a new default group, or ours destroyed (megaspan.runtime.destroy, a re-init)
        group = dist.new_group(backend="gloo")
        _GROUP[:] = [(weakref.ref(world), weakref.ref(group))]
    return group


def _alive(group) -> bool:
    try:
        dist.get_rank(group)  # raises once the group is destroyed
    except (ValueError, RuntimeError):
        return False
    return True


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


@dataclass
class PendingSave:
    """A save whose shards are still being written by a background thread
    (``checkpoint.async_save``): :func:`save_done` says when every rank has written them, and
    :func:`finish_save` commits it. Until then nothing of it is visible: ``tmp-step_N`` is
    ignored by resume and removed at the next start."""

    ckpt_dir: Path
    tmp: Path
    final: Path
    step: int
    meta: dict[str, Any]
    keep_last: int | None
    lineage: str
    device: torch.device
    blocked_s: float
    """How long :func:`save_checkpoint` held the caller: the finite check, the sharded state dict,
    DCP's plan and the copy of every tensor to CPU memory."""
    started: float = field(default_factory=time.perf_counter)
    written: Future | None = None
    """Resolves to the manifest once this rank's shards are written (and checksummed)."""


def _write_shards(state: dict, tmp: Path, background: _Background | None = None) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(background))


def _written(write: Future | None, tmp: Path, group) -> dict[str, dict[str, Any]]:
    """The background job after DCP's write: wait for it, then checksum the files (a share per
    rank, over the background group), so that committing takes no reading on the caller's side."""
    if write is not None:
        write.result()
    return _manifest(tmp, group)


def _cleanup_after(exc: BaseException, tmp: Path, ckpt_dir: Path) -> None:
    """Remove the partial ``tmp`` of a failed save and raise the error as the user should see
    it: a filesystem refusal as one :class:`RunDirError` line naming the path, anything else as is."""
    os_error = None if isinstance(exc, RunDirError) else (_os_error(exc) or _probe_write(tmp))
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if os_error is not None:
        raise _run_dir_error(os_error, tmp, ckpt_dir) from None
    raise exc


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
    background: bool = False,
) -> Path | PendingSave:
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

    ``background=True`` (``checkpoint.async_save``) returns a :class:`PendingSave` as soon as
    the state is copied to CPU memory; the shards are written by a thread, and
    :func:`finish_save` commits them by the same protocol. A diverged model is never written in
    the background (it raises at once, as above).
    """
    t0 = time.perf_counter()
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
    # The commit record is taken now, with the state: the LR and step go on changing while a
    # background write runs.
    meta = _meta(progress, optimizer, scheduler, tokenizer_hash, lineage, data_identity, config)
    state = _sharded_state_dict(
        chunks,
        optimizer,
        scheduler,
        is_loading=False,
        with_rng=True,
        extra={"step": step, "consumed_samples": progress.consumed_samples, "config": config},
    )
    pending = PendingSave(
        ckpt_dir, tmp, final, step, meta, keep_last, lineage, _param_device(chunks), 0.0, started=t0
    )
    bg = _Background(_background_group()) if background and not diverged else None
    try:
        # DCP reports a write failure of any rank on every rank, so all ranks get here together.
        _write_shards(state, tmp) if bg is None else _write_shards(state, tmp, bg)
        if bg is not None:
            pool = _pool()
            pending.written = pool.submit(_written, bg.write, tmp, bg.group)
            pool.shutdown(wait=False)  # the submitted job still runs; then the thread ends
            pending.blocked_s = time.perf_counter() - t0
            return pending
    except (Exception, _DcpException) as exc:
        if bg is not None and bg.write is not None:
            bg.write.exception()  # a write already started must end before its directory goes
        _cleanup_after(exc, tmp, ckpt_dir)
    path = finish_save(pending, diverged=diverged)
    if diverged:
        raise NonFiniteModelError(step, bad, total, final, _latest_name(ckpt_dir))
    return path


def _pool() -> ThreadPoolExecutor:
    """A one-worker executor for one background save's post-write work, shut down at once: its
    thread ends when that job does. Not a daemon: a process that ends while a write is under way
    waits for it rather than dying inside a torch op. (A long-lived idle executor thread would
    hang ``megaspan train``'s exit, which joins every non-daemon thread.)"""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="megaspan-ckpt")


def save_done(pending: PendingSave) -> bool:
    """Whether every rank has written (and checksummed) its part of ``pending`` (collective: one
    small all-reduce, on every rank alike, so that all ranks commit at the same step)."""
    done = torch.tensor([1 if pending.written is not None and pending.written.done() else 0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        done = done.to(pending.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())


def finish_save(pending: PendingSave, *, diverged: bool = False) -> Path:
    """Wait for ``pending``'s write (if it still runs) and commit it: the manifest goes into the
    commit record, ``tmp-step_N`` is renamed to ``step_N``, ``latest`` replaced and old
    checkpoints pruned (collective). A write that failed is cleaned up and raised here, a full
    disk as one :class:`RunDirError` line."""
    ckpt_dir, tmp, final = pending.ckpt_dir, pending.tmp, pending.final
    try:
        manifest = pending.written.result() if pending.written is not None else _manifest(tmp)
        local_error = None
        if _rank() == 0:
            try:
                _commit(ckpt_dir, tmp, final, {**pending.meta, "manifest": manifest}, diverged)
                if not diverged:
                    prune(ckpt_dir, pending.keep_last, keep=final, lineage=pending.lineage)
            except OSError as exc:
                if exc.errno not in _FS_ERRNOS:
                    raise
                local_error = str(_run_dir_error(exc, tmp, ckpt_dir))
        if (local_error := _first_error(local_error)) is not None:
            raise RunDirError(local_error)
    except (Exception, _DcpException) as exc:
        _cleanup_after(exc, tmp, ckpt_dir)
    _barrier()
    return final


def _meta(
    progress: Progress,
    optimizer,
    scheduler,
    tokenizer_hash: str | None,
    lineage: str,
    data_identity: dict[str, Any] | None,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The commit record (``META_FILE``) but its manifest."""
    return {
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
        "saved_at": time.time(),
    }


def _commit(ckpt_dir: Path, tmp: Path, final: Path, meta: dict[str, Any], diverged: bool) -> None:
    _write_atomic(tmp / META_FILE, json.dumps(meta, default=str))
    if final.exists():
        other = lineage_of(final)
        if other == meta["lineage"]:  # re-saving a step (e.g. after a resume): the new copy wins
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
