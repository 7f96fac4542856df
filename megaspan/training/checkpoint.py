"""Atomic, resumable checkpoints on ``megatron.core.dist_checkpointing``.

Layout of ``<ckpt_dir>``::

    step_0000010/            one complete checkpoint (dist_checkpointing files + META_FILE)
    tmp-step_20/             a save in progress (or one that crashed); never loaded
    latest                   the name of the newest complete checkpoint

Commit protocol, and why each step is ordered as it is:

1. every rank writes its shards into ``tmp-step_N`` (``dist_checkpointing.save``);
2. after a barrier, rank 0 writes ``META_FILE`` inside it, last, so "META_FILE present and
   consistent" means "every shard was written";
3. rank 0 renames ``tmp-step_N`` to ``step_000000N`` (atomic on POSIX);
4. rank 0 replaces ``latest`` (temp file + ``os.replace``) and only then prunes old checkpoints.

A crash anywhere before 3 leaves a ``tmp-`` directory that is ignored; a crash between 3 and 4
leaves ``latest`` on the previous checkpoint, which is still complete. Resuming trusts ``latest``
only after validating what it names and otherwise scans for the newest valid ``step_*``.

What is saved: model chunks' and optimizer's sharded state (reshardable across TP/PP/DP), the LR
scheduler (and the fp16 loss scaler, which is part of the optimizer state), per-rank RNG states
(python, numpy, torch, CUDA and Megatron's RNG tracker), step, consumed samples and the config.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

META_FILE = "megaspan_checkpoint.json"
LATEST_FILE = "latest"
_PREFIX = "step_"
_TMP_PREFIX = "tmp-step_"
FAULT_ENV = "MEGASPAN_TEST_FAIL_CHECKPOINT_AT_STEP"
"""Test-only fault injection: when set to N, saving step N raises after the shards are written
and before the checkpoint is committed, exactly like a crash mid-write."""


class CheckpointWriteFault(RuntimeError):
    """Raised by the test-only fault-injection point (see :data:`FAULT_ENV`)."""


@dataclass(frozen=True)
class Progress:
    step: int
    consumed_samples: int


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
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_valid(path: Path) -> bool:
    """Complete = named ``step_N``, dist-checkpoint metadata present, commit record for step N."""
    step = _step_of(path)
    if step is None or not (path / "metadata.json").is_file():
        return False
    meta = read_meta(path)
    return meta is not None and meta.get("step") == step


def find_latest_valid(ckpt_dir: Path) -> Path | None:
    """``latest`` if it names a valid checkpoint, else the newest valid ``step_*`` directory."""
    try:
        pointed = ckpt_dir / (ckpt_dir / LATEST_FILE).read_text().strip()
        if is_valid(pointed):
            return pointed
    except OSError:
        pass
    candidates = sorted(
        (p for p in ckpt_dir.glob(f"{_PREFIX}*") if _step_of(p) is not None),
        key=lambda p: _step_of(p),
        reverse=True,
    )
    return next((p for p in candidates if is_valid(p)), None)


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
    return {f"model{i}": chunk.sharded_state_dict(metadata=_sharding_metadata()) for i, chunk in enumerate(chunks)}


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_dir: Path,
    progress: Progress,
    chunks: list,
    optimizer,
    scheduler,
    config: dict[str, Any],
    keep_last: int | None,
) -> Path:
    """Save and commit a checkpoint of ``progress.step`` (collective: call on every rank)."""
    from megatron.core import dist_checkpointing

    step = progress.step
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f"{_TMP_PREFIX}{step}"
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale attempt of the same step
        tmp.mkdir()
    _barrier()
    state = _sharded_state_dict(
        chunks, optimizer, scheduler, is_loading=False, with_rng=True,
        extra={"step": step, "consumed_samples": progress.consumed_samples, "config": config},
    )
    dist_checkpointing.save(state, str(tmp))
    if os.environ.get(FAULT_ENV) == str(step):
        raise CheckpointWriteFault(f"{FAULT_ENV}={step}: simulated crash while writing {tmp}")
    _barrier()
    if dist.get_rank() == 0:
        meta = {
            "step": step,
            "consumed_samples": progress.consumed_samples,
            "world_size": dist.get_world_size(),
            # Its optimizer-state format differs from the plain optimizer's (checked on load).
            "distributed_optimizer": _is_distributed(optimizer),
            "saved_at": time.time(),
        }
        _write_atomic(tmp / META_FILE, json.dumps(meta))
        if final.exists():  # re-saving a step (e.g. after a resume): the new copy wins
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(ckpt_dir / LATEST_FILE, final.name + "\n")
        prune(ckpt_dir, keep_last, keep=final)
    _barrier()
    return final


def prune(ckpt_dir: Path, keep_last: int | None, keep: Path) -> None:
    """Delete abandoned ``tmp-`` saves and all but the newest ``keep_last`` checkpoints."""
    for tmp in ckpt_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is None:
        return
    steps = sorted((p for p in ckpt_dir.glob(f"{_PREFIX}*") if _step_of(p) is not None), key=_step_of)
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, chunks: list, optimizer, scheduler, load_optimizer: bool = True) -> Progress:
    """Restore model, optimizer, scheduler and (same world size only) RNG state from ``path``.

    ``load_optimizer=False`` restores the model weights only and returns step 0: the optimizer
    and scheduler keep their fresh state (Megatron-LM's ``--finetune``).
    """
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    assert meta is not None, f"{path} is not a complete checkpoint"
    if not load_optimizer:
        return _load_weights_only(path, chunks, optimizer)
    saved_distributed = meta.get("distributed_optimizer")
    if saved_distributed is not None and saved_distributed != _is_distributed(optimizer):
        from megaspan.config.loader import ConfigError

        raise ConfigError(
            f"{path} holds {'distributed' if saved_distributed else 'non-distributed'}-optimizer state: resume "
            f"with parallel.use_distributed_optimizer={str(saved_distributed).lower()}, or take only the "
            "weights with checkpoint.load_optimizer=false"
        )
    # RNG states are per rank; after a world-size change there is no state to give a rank, so
    # it keeps its fresh seed (the model and optimizer still reshard exactly).
    with_rng = meta["world_size"] == dist.get_world_size()
    template = _sharded_state_dict(
        chunks, optimizer, scheduler, is_loading=True, with_rng=with_rng, extra={}
    )
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if with_rng:
        set_rng_state(state["rng_state"])
    return Progress(step=int(state["step"]), consumed_samples=int(state["consumed_samples"]))


def _load_weights_only(path: Path, chunks: list, optimizer) -> Progress:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_model_states(chunks), str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])
    # Mixed-precision and distributed optimizers keep fp32 main copies of the weights; without
    # this they would overwrite the loaded weights with the fresh init at the first step.
    optimizer.reload_model_params()
    return Progress(step=0, consumed_samples=0)


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, DistributedOptimizer) for part in parts)

