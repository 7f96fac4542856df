"""The checkpoint format: directory names, the commit record (``META_FILE``) and its manifest,
``latest``, lineages, the sharded state dict saved and loaded, RNG states, and the collective
helpers the other modules share (they work without a process group too).
"""

from __future__ import annotations

import json
import os
import random
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

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


def _gather(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` on every rank (a plain list without a process group). ``group``: the
    process group (None = the default one; an async save's thread passes its own gloo group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
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


def _manifest(path: Path, group=None) -> dict[str, dict[str, Any]]:
    """``{relative file: {"size": bytes, "crc32": hex}}``; each rank checksums a share of the
    files (CRC-32: zlib's runs at memory speed, and it is there to catch truncation and bit rot,
    not tampering). Collective over ``group`` (None = the default process group)."""
    names = _gather(_files(path) if _rank() == 0 else None, group)[0]
    mine = {
        n: {"size": (path / n).stat().st_size, "crc32": _crc32(path / n)} for n in names[_rank() :: _world()]
    }
    out: dict[str, dict[str, Any]] = {}
    for part in _gather(mine, group):
        out.update(part)
    return out


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


def _latest_name(ckpt_dir: Path) -> str | None:
    return read_latest(ckpt_dir)[0]


def new_lineage() -> str:
    """A fresh lineage id for a run that starts from scratch (see :func:`save_checkpoint`)."""
    import uuid

    return uuid.uuid4().hex


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, DistributedOptimizer) for part in parts)
