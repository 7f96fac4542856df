"""Atomic, verified, resumable checkpoints on ``megatron.core.dist_checkpointing``.

Layout of ``<ckpt_dir>``::

    step_0000010/            one complete checkpoint (dist_checkpointing files + META_FILE)
    tmp-step_20/             a save in progress (or one that crashed); never loaded
    diverged-step_30/        the first model with non-finite parameters, kept aside for debugging
    superseded-<lineage>-step_N/  another run's checkpoint a new run's save of step N replaced
    latest                   the name of the newest complete checkpoint

Commit protocol, and why each step is ordered as it is:

1. every rank checks its parameters are finite (all-reduced): a diverged model is never committed
   (see :class:`NonFiniteModelError`);
2. every rank writes its shards into ``tmp-step_N`` (``dist_checkpointing.save``) with a
   synchronous writer (see :func:`_sync_save_strategy` for why);
3. the ranks checksum the files (each a share of them) and rank 0 writes ``META_FILE`` with the
   manifest (name -> size, crc32) inside the directory, last, so "META_FILE present and the files
   match its manifest" means "every shard was written, and is intact";
4. rank 0 renames ``tmp-step_N`` to ``step_000000N`` (atomic on POSIX);
5. rank 0 replaces ``latest`` (temp file + ``os.replace``) and only then prunes old checkpoints.

A crash anywhere before 4 leaves a ``tmp-`` directory that is ignored (and removed by
:func:`remove_stale_tmp` at the next start); a crash between 4 and 5 leaves ``latest`` on the
previous checkpoint, which is still complete. Resuming treats ``latest`` as a hint: a newer
checkpoint of the same run that passes full verification wins (with a warning), and a garbage
``latest`` is ignored (see :func:`find_latest_valid`).

Each checkpoint records its *lineage* (the run it belongs to: new at a fresh start, inherited on
resume). Pruning deletes only the saving run's own checkpoints, so a run started over in the same
directory (``checkpoint.resume=none``) never deletes another run's work; a same-step checkpoint
of another run is moved aside to ``superseded-<lineage>-step_N``.

What is saved: model chunks' and optimizer's sharded state (reshardable across TP/PP/DP), the LR
scheduler (and the fp16 loss scaler, which is part of the optimizer state), per-rank RNG states
(python, numpy, torch, CUDA and Megatron's RNG tracker), step, consumed samples and the config.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as _DcpException

from megaspan.errors import CheckpointError, ConfigError, RunDirError

META_FILE = "megaspan_checkpoint.json"
LATEST_FILE = "latest"
_PREFIX = "step_"
_TMP_PREFIX = "tmp-step_"
DIVERGED_PREFIX = "diverged-step_"
SUPERSEDED_PREFIX = "superseded-"
# The lineage of checkpoints committed before lineages were recorded (and of saves that pass
# none): they prune each other, as they always did.
LEGACY_LINEAGE = "legacy"
_HASH_CHUNK = 4 << 20


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


@dataclass(frozen=True)
class Progress:
    step: int
    consumed_samples: int


@dataclass(frozen=True)
class Resumed(Progress):
    """What :func:`load_checkpoint` restored: a :class:`Progress` plus what differs from the save.

    ``changed`` maps a hyper-parameter name (``optimizer.lr``, ``optimizer.min_lr``,
    ``optimizer.weight_decay``, ``optimizer.clip_grad``, ``schedule.warmup_steps``,
    ``schedule.decay_steps``, ``schedule.decay_style``) to ``(value in the checkpoint, value now)``
    for every one that the current config changed; the current value is the one that applies from
    the resumed step on. Log one line per entry.
    """

    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict, compare=False)
    lineage: str | None = field(default=None, compare=False)
    """The loaded checkpoint's lineage: pass it to every later :func:`save_checkpoint` (None after
    a weights-only load: that starts a new run)."""


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_PREFIX) or not name[len(_PREFIX) :].isdigit():
        return None
    return int(name[len(_PREFIX) :])


def read_meta(path: Path) -> dict[str, Any] | None:
    """The commit record of a checkpoint, or None if it is missing or unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


# ---- distribution helpers (work without a process group too) -------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a plain list without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _first_error(local: str | None) -> str | None:
    """The first rank's error message, on every rank: ranks agree before anyone raises, so no
    rank is left waiting in a collective the others have abandoned."""
    return next((e for e in _gather(local) if e), None)


# ---- manifest -------------------------------------------------------------------------------


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != META_FILE)


def _manifest(path: Path) -> dict[str, dict[str, Any]]:
    """``{relative file: {"size": bytes, "crc32": hex}}``; each rank checksums a share of the
    files (CRC-32: zlib's runs at memory speed, and it is there to catch truncation and bit rot,
    not tampering)."""
    names = _gather(_files(path) if _rank() == 0 else None)[0]
    mine = {
        n: {"size": (path / n).stat().st_size, "crc32": _crc32(path / n)} for n in names[_rank() :: _world()]
    }
    out: dict[str, dict[str, Any]] = {}
    for part in _gather(mine):
        out.update(part)
    return out


def check_checkpoint(path: Path, verify: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is.

    Cheap by default: the name, the commit record, and every file of its manifest present with
    its recorded size (this catches missing and truncated files). ``verify=True`` also compares
    the CRC-32 of every file (garbage written over a file at the same size); it reads the whole
    checkpoint once. Checkpoints from before manifests existed pass the cheap checks only.
    Not collective: each caller reads the files it checks.
    """
    step = _step_of(path)
    if step is None:
        return f"{path.name} is not a checkpoint directory name (step_NNNNNNN)"
    if not path.is_dir():
        return f"{path} does not exist"
    meta = read_meta(path)
    if meta is None:
        return f"{path / META_FILE} is missing or unreadable (an interrupted save)"
    if meta.get("step") != step:
        return f"{path / META_FILE} records step {meta.get('step')}, not {step}"
    if not (path / "metadata.json").is_file():
        return f"{path / 'metadata.json'} is missing"
    for name, entry in (meta.get("manifest") or {}).items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file} is missing"
        if size != entry["size"]:
            return f"{file} has {size} bytes, the commit recorded {entry['size']} (truncated or overwritten)"
        if verify and _crc32(file) != entry["crc32"]:
            return f"{file} is corrupt (checksum differs from the one recorded at save)"
    return None


def is_valid(path: Path, verify: bool = False) -> bool:
    """Complete = named ``step_N``, commit record for step N, its files as recorded (see
    :func:`check_checkpoint`; ``verify=True`` also compares checksums)."""
    return check_checkpoint(path, verify) is None


def _warn(message: str) -> None:
    if _rank() == 0:
        print(f"megaspan: warning: {message}", file=sys.stderr, flush=True)


def read_latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """``(name, problem)``: the checkpoint name ``latest`` holds, or why it holds none usable.

    ``problem`` is None when the file is absent (a run dir without checkpoints) or names a
    ``step_N`` directory of ``ckpt_dir``; otherwise it says what is wrong (binary garbage from a
    bad disk, a path, anything not ``step_N``) and ``name`` is None."""
    file = ckpt_dir / LATEST_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{file} is unreadable ({exc.strerror})"
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{file} holds garbage, not a checkpoint name"
    if not name:
        return None, f"{file} is empty"
    if "/" in name or _step_of(Path(name)) is None:
        return None, f"{file} holds {name[:60]!r}, not a checkpoint name (step_NNNNNNN)"
    return name, None


def lineage_of(path: Path) -> str | None:
    """The lineage recorded in ``path``'s commit record (:data:`LEGACY_LINEAGE` for checkpoints
    from before lineages were recorded), or None when the record is unreadable."""
    meta = read_meta(path)
    return None if meta is None else (meta.get("lineage") or LEGACY_LINEAGE)


def find_latest_valid(
    ckpt_dir: Path,
    verify: bool = False,
    warn: Callable[[str], None] | None = None,
    *,
    require_intact: bool = False,
) -> Path | None:
    """The newest intact checkpoint of the run in ``ckpt_dir``, or None.

    ``latest`` is trusted only as a hint. Checkpoints of its lineage that are *newer* than the
    one it names are real work (a crash between the commit's rename and the ``latest`` update, or
    a ``latest`` restored from an old backup): the newest of them that passes full verification
    (checksums, whatever ``verify`` says) is chosen, with a warning. A ``latest`` holding garbage
    is ignored the same way (the newest intact ``step_*`` wins). Checkpoints skipped because they
    fail :func:`check_checkpoint` are named in ONE warning line (``warn``, default: ``megaspan:
    warning: ...`` on stderr from rank 0). ``verify=True`` checks checksums for every candidate
    (for ``checkpoint.resume=auto``: the chosen checkpoint is then read once more, which also
    warms the page cache for the load).

    ``require_intact=True`` (``checkpoint.resume=auto``): when checkpoints exist and none is
    intact, raise a :class:`~megaspan.errors.CheckpointError` naming them instead of returning
    None: a run whose storage went bad must not silently start over. Not collective: every rank
    reaches the same answer.
    """
    warn = warn or _warn
    candidates = sorted(
        (p for p in ckpt_dir.glob(f"{_PREFIX}*") if _step_of(p) is not None), key=_step_of, reverse=True
    )
    name, latest_problem = read_latest(ckpt_dir)
    notes = [f"{latest_problem}: ignoring it"] if latest_problem else []
    newer: list[Path] = []
    if name is not None:
        pointed = ckpt_dir / name
        lineage = lineage_of(pointed)
        # Newer checkpoints of another lineage (another run started over in this directory) are
        # not this run's work; with the pointed one unreadable its lineage is unknown: all count.
        newer = [
            p
            for p in candidates
            if _step_of(p) > _step_of(pointed) and (lineage is None or lineage_of(p) == lineage)
        ]
        candidates = newer + [pointed] + [p for p in candidates if _step_of(p) < _step_of(pointed)]
    skipped: list[str] = []
    for path in candidates:
        problem = check_checkpoint(path, verify or path in newer)
        if problem is None:
            if path in newer:
                notes.append(
                    f"{ckpt_dir / LATEST_FILE} names {name}, but {path.name} is newer and passes full "
                    "verification"
                )
            if skipped:
                notes.append(f"skipping corrupt checkpoint(s): {'; '.join(skipped)}")
            if notes:
                warn(f"{'; '.join(notes)}; resuming from {path}")
            return path
        if path.exists():
            skipped.append(problem)
    if skipped and require_intact:
        raise CheckpointError(
            f"no intact checkpoint in {ckpt_dir} ({'; '.join(skipped)}); not starting over on top of "
            "them: restore them from a copy, point checkpoint.resume at an intact checkpoint, or start "
            "over in this run dir with checkpoint.resume=none (the damaged ones are kept; a new run "
            "never prunes or overwrites another run's checkpoints)"
        )
    if skipped:
        warn(f"no intact checkpoint in {ckpt_dir} ({'; '.join(skipped)}): starting from scratch")
    elif notes:
        warn("; ".join(notes))
    return None


def remove_stale_tmp(ckpt_dir: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Delete ``tmp-*`` saves left by a crashed or killed run; call once at start (rank 0 only, or
    on every rank before any save: removing a missing directory is a no-op). Logs one line per
    removed directory through ``log`` (default: stderr). Returns what it removed."""
    removed = []
    for tmp in sorted(ckpt_dir.glob("tmp-*")) if ckpt_dir.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"removed {tmp}: an unfinished save of an earlier run"
        )
    return removed


# ---- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ---- state dict -----------------------------------------------------------------------------

# Fully reshardable distributed-optimizer state: a run may resume with a different DP/TP/PP
# layout. Same flags as megatron.training's _build_sharded_state_dict_metadata.
_SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def _sharding_metadata() -> dict[str, Any]:
    """A fresh copy per call: Megatron stores the current data-parallel group into the metadata
    dict in place (``ensure_metadata_has_dp_cp_group``), so a shared dict would carry a stale
    group, and wrong replica ids, into the next save or load after the parallel layout changes."""
    return dict(_SHARDING_METADATA)


def _model_states(chunks: list) -> dict:
    """``{"model<i>": sharded state of chunk i}``.

    Placements whose layers own different norms (SpanNorm's block-0 N0, Mix-LN) get per-layer
    checkpoint keys from Megatron itself (``hetereogenous_dist_checkpoint``, set in models/mcore_config.py),
    so the layouts stay reshardable without any rewriting here.
    """
    return {
        f"model{i}": chunk.sharded_state_dict(metadata=_sharding_metadata()) for i, chunk in enumerate(chunks)
    }


def _sharded_state_dict(
    chunks: list, optimizer, scheduler, *, is_loading: bool, with_rng: bool, extra: dict
) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state: dict[str, Any] = _model_states(chunks)
    # The optimizer maps its per-parameter state onto the model's sharded tensors.
    state["optimizer"] = optimizer.sharded_state_dict(
        dict(state), is_loading=is_loading, metadata=_sharding_metadata()
    )
    state["scheduler"] = scheduler.state_dict()
    if with_rng:
        # RNG states differ per rank, so each rank owns one shard of a world-sized object.
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    state.update(extra)
    return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def hyperparameters(optimizer, scheduler) -> dict[str, Any]:
    """The optimizer/schedule values a resume may change (recorded in META, diffed on load)."""
    cfg = getattr(optimizer, "config", None)
    return {
        "optimizer.lr": scheduler.max_lr,
        "optimizer.min_lr": scheduler.min_lr,
        "optimizer.weight_decay": scheduler.end_wd,
        "optimizer.clip_grad": getattr(cfg, "clip_grad", None),
        "schedule.warmup_steps": scheduler.lr_warmup_steps,
        "schedule.decay_steps": scheduler.lr_decay_steps,
        "schedule.decay_style": scheduler.lr_decay_style,
    }


def _write_shards(state: dict, tmp: Path) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(tmp), sharded_strategy=_sync_save_strategy())


def _latest_name(ckpt_dir: Path) -> str | None:
    return read_latest(ckpt_dir)[0]


def new_lineage() -> str:
    """A fresh lineage id for a run that starts from scratch (see :func:`save_checkpoint`)."""
    import uuid

    return uuid.uuid4().hex


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


def prune(ckpt_dir: Path, keep_last: int | None, keep: Path, lineage: str | None = None) -> None:
    """Delete abandoned ``tmp-`` saves and all but the newest ``keep_last`` checkpoints of
    ``lineage`` (None = :data:`LEGACY_LINEAGE`).

    Never deletes ``keep``, what ``latest`` names, a checkpoint of another lineage (another run
    that started over in this directory) or one whose commit record is unreadable (its lineage is
    unknown); ``diverged-*`` copies are not ``step_*`` checkpoints and are never pruned (there is
    at most one)."""
    for tmp in ckpt_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is None:
        return
    lineage = lineage or LEGACY_LINEAGE
    protected = {keep.name, _latest_name(ckpt_dir)}
    steps = sorted(
        (p for p in ckpt_dir.glob(f"{_PREFIX}*") if _step_of(p) is not None and lineage_of(p) == lineage),
        key=_step_of,
    )
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


# ---- load -----------------------------------------------------------------------------------

_SHAPE_MISMATCH = re.compile(
    r"Global shape mismatch for loaded \((.*?)\) and expected \((.*?)\) tensor for key (\S+)"
)
_MISSING_KEY = re.compile(r"[Mm]issing key[s]?[^:]*:?\s*(\S+)")


def _shape(text: str) -> str:
    """``torch.Size([64, 8])`` or ``(64, 8)`` -> ``[64, 8]``."""
    return "[" + ", ".join(re.findall(r"\d+", text)) + "]"


def _translate_load_error(exc: BaseException, path: Path) -> CheckpointError:
    text = str(exc)
    if m := _SHAPE_MISMATCH.search(text):
        saved, expected = (_shape(m[1]), _shape(m[2]))
        return CheckpointError(
            f"{path} is from another model: tensor {m[3]} has shape {saved} in the checkpoint but "
            f"{expected} with this config; resume with the model settings it was saved with "
            "(its config is in the run dir's config.yaml), or start a new run dir"
        )
    problem = check_checkpoint(path, verify=True)
    if problem is not None:
        return CheckpointError(f"{path} is corrupt: {problem}; pick another checkpoint")
    first = next((line for line in text.splitlines() if "Error" in line or "Exception" in line), text[:300])
    return CheckpointError(
        f"{path} does not match this model/optimizer ({type(exc).__name__}: {first.strip()[:300]}); resume "
        "with the config it was saved with, or take only the weights with checkpoint.load_optimizer=false"
    )


# TE modules (its norm ops, linears with FP8 metadata) carry torch "extra state", saved as
# ``<module>._extra_state`` sharded objects; the local backend's norms carry none. A checkpoint of
# one backend loads into the other only if these keys may be absent on either side: the model
# then keeps its own (default) extra state, and a checkpoint's extra state nobody asks for is
# ignored. Every other key must match exactly.
EXTRA_STATE_SUFFIX = "_extra_state"
# Checkpoint entries that are not model weights: a weights-only load, or a world-size change (no
# RNG state to give a rank), legitimately leaves them unread.
_NOT_MODEL_KEYS = ("optimizer.", "rng_state", "common_state")


def _listing(keys: list[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def key_mismatch(path: Path, in_checkpoint_only: set[str], in_model_only: set[str]) -> str | None:
    """Why the keys of ``path`` and of this model disagree beyond what a TE<->local-backend
    switch explains (``_extra_state`` on either side, optimizer/RNG entries left unread), or
    None. ``in_model_only`` are keys the model asks for that the checkpoint lacks (Megatron's
    "unexpected"), ``in_checkpoint_only`` the reverse (Megatron's "missing")."""
    absent = [k for k in in_model_only if not k.endswith(EXTRA_STATE_SUFFIX)]
    surplus = [
        k
        for k in in_checkpoint_only
        if not k.endswith(EXTRA_STATE_SUFFIX) and not k.startswith(_NOT_MODEL_KEYS)
    ]
    if not absent and not surplus:
        return None
    parts = []
    if absent:
        parts.append(f"it lacks {len(absent)} tensor(s) this model has ({_listing(absent)})")
    if surplus:
        parts.append(f"it holds {len(surplus)} tensor(s) this model lacks ({_listing(surplus)})")
    return (
        f"{path} is from another model: {'; '.join(parts)}; resume with the model settings it was "
        "saved with (its config is in the run dir's config.yaml), or start a new run dir"
    )


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out
    return {prefix: node}


def model_difference(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """``model.num_layers 4 -> 6, model.norm_placement spannorm -> pre`` for the ``model``
    config sections of a checkpoint and of this run, or None (equal, or either unknown)."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return None
    before, after = _flat(saved, "model"), _flat(now, "model")
    keys = [k for k in after if k in before and before[k] != after[k]]
    keys += [k for k in before if k not in after] + [k for k in after if k not in before]
    if not keys:
        return None
    parts = [f"{k} {before.get(k, '(absent)')} -> {after.get(k, '(absent)')}" for k in keys]
    return _listing(parts, limit=5)


def _explained(exc: CheckpointError, path: Path, difference: str | None) -> CheckpointError:
    """A load failure of a checkpoint saved with other model settings, said as that difference
    (the tensor-level detail of Megatron/DCP, e.g. ``CheckpointException ranks:dict_keys([0])``,
    does not tell a user that the depth or placement changed)."""
    if difference is None or " is corrupt" in str(exc):
        return exc
    return CheckpointError(
        f"{path} was saved with other model settings: {difference}; resume with the settings it was "
        "saved with (its run dir's config.yaml has them), or start a new run dir"
    )


def _load(template: dict, path: Path) -> dict:
    """``dist_checkpointing.load`` with explicit strictness (see ``EXTRA_STATE_SUFFIX``).

    Megatron's default (``ASSUME_OK_UNEXPECTED``) leaves key checks to torch DCP, which refuses
    any key the checkpoint lacks, extra state included ("Missing key in checkpoint state_dict"),
    so a local-backend checkpoint could not load into a TE model. ``RETURN_ALL`` (what Megatron's
    own TE<->local test uses) drops the template's keys the checkpoint lacks and returns both
    mismatch sets; anything beyond extra state is refused here in one line. Collective: the
    model-only keys are per rank, so the ranks agree on the first problem before raising.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        state, in_checkpoint_only, in_model_only = dist_checkpointing.load(
            template, str(path), strict=StrictHandling.RETURN_ALL
        )
    except (Exception, _DcpException) as exc:
        raise _translate_load_error(exc, path) from None
    if (problem := _first_error(key_mismatch(path, in_checkpoint_only, in_model_only))) is not None:
        raise CheckpointError(problem)
    return state


def _load_chunk(chunk, state: dict, path: Path) -> None:
    """``chunk.load_state_dict`` where only extra state may be absent from ``state`` (it was
    dropped by :func:`_load` because the checkpoint lacks it): the module keeps its own."""
    result = chunk.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            key_mismatch(path, set(result.unexpected_keys), set(missing))
            or f"{path} does not match this model"
        )


def check_tokenizer(path: Path, meta: dict[str, Any], expected_tokenizer_hash: str | None) -> None:
    saved = meta.get("tokenizer_hash")
    if expected_tokenizer_hash and saved and saved != expected_tokenizer_hash:
        raise CheckpointError(
            f"{path} was trained with another tokenizer (content hash {saved[:12]}, this run's is "
            f"{expected_tokenizer_hash[:12]}): resume with the tokenizer.model it was trained with, or start "
            "a new run dir"
        )


def check_data(
    path: Path, meta: dict[str, Any], expected: dict[str, Any] | None, allow_change: bool = False
) -> None:
    """Refuse (one line) to resume ``path`` on other data than it was trained on, unless
    ``allow_change`` (``checkpoint.allow_data_change``), which warns instead. Checkpoints without
    a data record (older megaspan) and callers without one pass."""
    from megaspan.data.identity import describe_difference

    saved = meta.get("data")
    if not saved or not expected or (difference := describe_difference(saved, expected)) is None:
        return
    if allow_change:
        _warn(
            f"{path} was trained on other data ({difference}); continuing on the new data "
            "(checkpoint.allow_data_change=true)"
        )
        return
    raise CheckpointError(
        f"{path} was trained on other data: {difference}; resume with the data it was trained on, "
        "or continue on the new data with checkpoint.allow_data_change=true"
    )


def _align_param_groups(loaded: Any, optimizer) -> None:
    """Give the loaded optimizer param groups this run's hyper-parameters.

    Megatron pairs saved and current param groups by a key that includes ``max_lr``/``min_lr``/
    ``start_wd``/``end_wd`` (``param_group_identifier_keys``), so a resume with a changed LR or
    weight decay fails to find its groups. The groups are paired here by their structural keys
    (weight-decay/LR multipliers, expert/decoupled flags) and take the current values; per-param
    state (Adam moments, step) is untouched.
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    tunable = ("max_lr", "min_lr", "start_wd", "end_wd")
    structural = [k for k in param_group_identifier_keys if k not in tunable]
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    current: dict[tuple, dict | None] = {}
    for part in parts:
        for group in part.optimizer.param_groups:
            key = tuple(group.get(k) for k in structural)
            # Two current groups that differ only in tunable values cannot be told apart: leave
            # them to Megatron's own matching.
            current[key] = None if key in current else group

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list):
                for group in groups:
                    if isinstance(group, dict) and (
                        now := current.get(tuple(group.get(k) for k in structural))
                    ):
                        group.update({k: now[k] for k in tunable if k in now})
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(loaded)


def load_checkpoint(
    path: Path,
    chunks: list,
    optimizer,
    scheduler,
    load_optimizer: bool = True,
    *,
    expected_tokenizer_hash: str | None = None,
    expected_data: dict[str, Any] | None = None,
    allow_data_change: bool = False,
    expected_model: dict[str, Any] | None = None,
) -> Resumed:
    """Restore model, optimizer, scheduler and (same world size only) RNG state from ``path``.

    Returns a :class:`Resumed` (a :class:`Progress`) whose ``changed`` lists the optimizer and
    schedule hyper-parameters that this run's config changed relative to the checkpoint: the
    optimizer state (moments, step) is loaded, and the config's values apply from the resumed step
    on (the scheduler's checkpointed values never override the config).

    ``load_optimizer=False`` restores the model weights only and returns step 0: the optimizer
    and scheduler keep their fresh state (Megatron-LM's ``--finetune``).

    Raises :class:`~megaspan.errors.CheckpointError` (one line) when ``path`` is not a complete
    checkpoint, is corrupt, belongs to another model (which tensor, its shape there and here),
    or was trained with another tokenizer than ``expected_tokenizer_hash``, or (full resumes only)
    on other data than ``expected_data`` (:func:`check_data`; ``allow_data_change`` warns instead).
    ``expected_model`` (this run's ``model`` config section): when the checkpoint does not fit and
    was saved with other model settings, the error names those (``model.num_layers 4 -> 6``).
    """
    meta = read_meta(path)
    problem = check_checkpoint(path) if meta is not None else f"{path / META_FILE} is missing"
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete megaspan checkpoint: {problem}")
    check_tokenizer(path, meta, expected_tokenizer_hash)
    difference = model_difference(meta.get("model"), expected_model)
    if not load_optimizer:  # a new run on whatever data it is given
        try:
            return _load_weights_only(path, chunks, optimizer)
        except CheckpointError as exc:
            raise _explained(exc, path, difference) from None
    check_data(path, meta, expected_data, allow_data_change)
    saved_distributed = meta.get("distributed_optimizer")
    if saved_distributed is not None and saved_distributed != _is_distributed(optimizer):
        raise ConfigError(
            f"{path} holds {'distributed' if saved_distributed else 'non-distributed'}-optimizer state: resume "
            f"with parallel.use_distributed_optimizer={str(saved_distributed).lower()}, or take only the "
            "weights with checkpoint.load_optimizer=false"
        )
    # RNG states are per rank; after a world-size change there is no state to give a rank, so
    # it keeps its fresh seed (the model and optimizer still reshard exactly).
    with_rng = meta["world_size"] == _world()
    template = _sharded_state_dict(chunks, optimizer, scheduler, is_loading=True, with_rng=with_rng, extra={})
    try:
        state = _load(template, path)
        for i, chunk in enumerate(chunks):
            _load_chunk(chunk, state[f"model{i}"], path)
    except CheckpointError as exc:
        raise _explained(exc, path, difference) from None
    _align_param_groups(state["optimizer"], optimizer)
    optimizer.load_state_dict(state["optimizer"])
    now = hyperparameters(optimizer, scheduler)
    # The config decides the schedule: the checkpoint restores only the step count.
    scheduler.override_opt_param_scheduler = True
    scheduler.load_state_dict(state["scheduler"])
    if with_rng:
        set_rng_state(state["rng_state"])
    saved = meta.get("hyperparameters") or _hyperparameters_from(state["scheduler"])
    changed = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved.get(k) != v}
    return Resumed(
        step=int(state["step"]),
        consumed_samples=int(state["consumed_samples"]),
        changed=changed,
        lineage=meta.get("lineage") or LEGACY_LINEAGE,
    )


def _hyperparameters_from(scheduler_state: dict) -> dict[str, Any]:
    """What a checkpoint without recorded hyper-parameters (older megaspan) tells about them."""
    return {
        "optimizer.lr": scheduler_state.get("max_lr"),
        "optimizer.min_lr": scheduler_state.get("min_lr"),
        "optimizer.weight_decay": scheduler_state.get("end_wd"),
        "schedule.warmup_steps": scheduler_state.get("lr_warmup_steps"),
        "schedule.decay_steps": scheduler_state.get("lr_decay_steps"),
        "schedule.decay_style": scheduler_state.get("lr_decay_style"),
    }


def load_model_weights(path: Path, chunks: list) -> None:
    """Load only the model weights of ``path`` into ``chunks`` (collective).

    ``path`` is any ``dist_checkpointing`` directory with the model's keys (a megaspan
    checkpoint, or ``dist_checkpointing.save(model.sharded_state_dict())``); no commit record is
    checked. A TE model loads a local-backend checkpoint and vice versa (see ``_load``). Raises
    :class:`~megaspan.errors.CheckpointError` (one line naming the keys) on any other mismatch.
    """
    state = _load(_model_states(chunks), path)
    for i, chunk in enumerate(chunks):
        _load_chunk(chunk, state[f"model{i}"], path)


def _load_weights_only(path: Path, chunks: list, optimizer) -> Resumed:
    load_model_weights(path, chunks)
    # Mixed-precision and distributed optimizers keep fp32 main copies of the weights; without
    # this they would overwrite the loaded weights with the fresh init at the first step.
    optimizer.reload_model_params()
    return Resumed(step=0, consumed_samples=0)


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, DistributedOptimizer) for part in parts)
