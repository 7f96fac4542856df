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
   synchronous writer (see :func:`_sync_save_strategy` for why), or, with
   ``checkpoint.async_save``, copies them to host memory and writes them from a thread
   (:class:`PendingSave`; steps 3-5 then run at a later step boundary, in :func:`finish_save`,
   once :func:`save_done` says every rank has written its part);
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

The package: ``layout`` (format, commit record and manifest, ``latest``, lineages, the sharded
state dict), ``verify`` (intact? which one to resume), ``pruning``, ``save``, ``load``. Import
from the package; fault-injection tests patch ``megaspan.training.checkpoint.save``.
"""

from megaspan.training.checkpoint.layout import (
    DIVERGED_PREFIX,
    LATEST_FILE,
    LEGACY_LINEAGE,
    META_FILE,
    SUPERSEDED_PREFIX,
    Progress,
    Resumed,
    checkpoint_name,
    hyperparameters,
    lineage_of,
    new_lineage,
    read_latest,
    read_meta,
    rng_state,
    set_rng_state,
)
from megaspan.training.checkpoint.load import (
    EXTRA_STATE_SUFFIX,
    check_data,
    check_tokenizer,
    key_mismatch,
    load_checkpoint,
    load_model_weights,
    model_difference,
)
from megaspan.training.checkpoint.pruning import prune, remove_stale_tmp
from megaspan.training.checkpoint.save import (
    NonFiniteModelError,
    PendingSave,
    _sync_save_strategy,
    finish_save,
    save_checkpoint,
    save_done,
)
from megaspan.training.checkpoint.verify import check_checkpoint, find_latest_valid, is_valid

__all__ = [
    "META_FILE",
    "LATEST_FILE",
    "DIVERGED_PREFIX",
    "SUPERSEDED_PREFIX",
    "LEGACY_LINEAGE",
    "Progress",
    "Resumed",
    "checkpoint_name",
    "read_meta",
    "read_latest",
    "lineage_of",
    "rng_state",
    "set_rng_state",
    "hyperparameters",
    "new_lineage",
    "check_checkpoint",
    "is_valid",
    "find_latest_valid",
    "remove_stale_tmp",
    "prune",
    "NonFiniteModelError",
    "save_checkpoint",
    "_sync_save_strategy",
    "PendingSave",
    "finish_save",
    "save_done",
    "EXTRA_STATE_SUFFIX",
    "key_mismatch",
    "model_difference",
    "check_tokenizer",
    "check_data",
    "load_checkpoint",
    "load_model_weights",
]
