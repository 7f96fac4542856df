"""Loading a checkpoint: strictness (TE extra state), one-line errors, tokenizer/data/model checks,
the optimizer's param groups.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException as _DcpException

from megaspan.errors import CheckpointError, ConfigError
from megaspan.training.checkpoint.layout import (
    LEGACY_LINEAGE,
    META_FILE,
    Resumed,
    _first_error,
    _is_distributed,
    _model_states,
    _sharded_state_dict,
    _warn,
    _world,
    hyperparameters,
    read_meta,
    set_rng_state,
)
from megaspan.training.checkpoint.verify import check_checkpoint

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
    # The saved section went through JSON (tuples became lists): compare like with like.
    now = json.loads(json.dumps(now, default=str))
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
    # Megatron's load_state_dict *adds* the saved step count (self.step(increment=num_steps)): a
    # scheduler that has already stepped (the guard's rollback loads into the live one) must
    # start from 0, or the schedule jumps ahead by the steps it had taken.
    scheduler.num_steps = 0
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
