"""The range of every numeric option, NaN and infinity included.

One table, :data:`RANGES`, maps each dotted key of a number in :class:`MegaspanConfig` (and each
number among the placements' ``model.norm.*`` options) to its allowed interval. Before it,
several values reached torch or Megatron unchecked: ``optimizer.lr=nan`` or ``adam_beta1=1.5``
raised deep inside the optimizer, ``clip_grad=-1`` or ``layernorm_epsilon=-1`` trained on and
diverged (blamed on the LR), ``training.seed=-1`` crashed in numpy. ``tests/unit/test_ranges.py``
walks the schema and fails when a numeric field has no entry here, so a new option cannot skip
this check.

Torch-free, like the rest of :mod:`megaspan.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from megaspan.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval of finite numbers; ``None`` = unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    fix: str = ""
    """What to do instead, appended to the message."""

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "a finite number"

    def message(self, key: str, value: Any) -> str:
        fix = f"; {self.fix}" if self.fix else ""
        if isinstance(value, int) and abs(value) > INT64_MAX:
            return f"{key}={value} does not fit in a 64-bit integer: it must be {self.describe()}{fix}"
        finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
        return f"{key} must be {finite}{self.describe()}, got {value!r}{fix}"

    def contains(self, value: float) -> bool:
        # ints are compared exactly (10**400 is not a float); floats must be finite.
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and not -INT64_MAX <= value <= INT64_MAX:
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _at_least(lo: float, fix: str = "") -> Range:
    return Range(lo=lo, fix=fix)


def _positive(fix: str = "") -> Range:
    return Range(lo=0.0, lo_open=True, fix=fix)


def _probability(fix: str = "") -> Range:
    return Range(lo=0.0, hi=1.0, hi_open=True, fix=fix)


INT64_MAX = 2**63 - 1
"""Every integer ends up in a torch or numpy int64."""

SIZE = _at_least(1)
COUNT = _at_least(0)
SEED_MAX = 2**32 - 1
"""numpy's RandomState (Megatron's dataset shuffling) takes seeds in [0, 2**32 - 1]."""

RANGES: dict[str, Range] = {
    # model
    "model.num_layers": SIZE,
    "model.hidden_size": SIZE,
    "model.num_attention_heads": SIZE,
    "model.num_query_groups": SIZE,
    "model.ffn_hidden_size": SIZE,
    "model.vocab_size": SIZE,
    "model.make_vocab_size_divisible_by": _at_least(1, "typical: 128"),
    "model.seq_length": SIZE,
    "model.max_position_embeddings": SIZE,
    "model.rotary_base": _at_least(1, "the usual RoPE base is 10000"),
    "model.layernorm_epsilon": Range(lo=0.0, hi=1.0, lo_open=True, hi_open=True, fix="typical: 1e-5"),
    "model.init_method_std": _positive("typical: 0.02, or null for the placement's default"),
    "model.hidden_dropout": _probability("0 turns dropout off"),
    "model.attention_dropout": _probability("0 turns dropout off"),
    "model.moe.num_experts": _at_least(1, "null for a dense model"),
    "model.moe.router_topk": SIZE,
    "model.moe.ffn_hidden_size": SIZE,
    "model.moe.aux_loss_coeff": _at_least(0.0, "typical: 0.01; 0 turns the load-balancing loss off"),
    "model.moe.z_loss_coeff": _at_least(0.0, "typical: 1e-3; null turns it off"),
    "model.moe.layer_freq": SIZE,
    "model.moe.shared_expert_ffn_hidden_size": SIZE,
    # model.norm.<option> of the placements (see megaspan.norms.placements)
    "model.norm.deepnorm_alpha": _positive("null for DeepNet's (2L)^(1/4)"),
    "model.norm.deepnorm_beta": _positive("null for DeepNet's (8L)^(-1/4)"),
    "model.norm.mixln_alpha": Range(lo=0.0, hi=1.0, fix="the fraction of Post-LN layers, e.g. 0.25"),
    "model.norm.span_residual_alpha": _positive("1 is the paper's SpanNorm"),
    # parallel
    "parallel.tensor_model_parallel_size": SIZE,
    "parallel.pipeline_model_parallel_size": SIZE,
    "parallel.virtual_pipeline_model_parallel_size": SIZE,
    "parallel.num_layers_in_first_pipeline_stage": SIZE,
    "parallel.num_layers_in_last_pipeline_stage": SIZE,
    "parallel.expert_model_parallel_size": SIZE,
    "parallel.expert_tensor_parallel_size": SIZE,
    "parallel.context_parallel_size": SIZE,
    "parallel.recompute_num_layers": SIZE,
    # precision
    "precision.initial_loss_scale": _positive("typical: 65536"),
    "precision.loss_scale": _positive("null for dynamic loss scaling"),
    # data
    "data.weights": _positive("one positive weight per path, or null for size-proportional blending"),
    # tokenizer
    "tokenizer.vocab_size": _at_least(1, "typical: 4096-65536"),
    "tokenizer.max_train_sentences": SIZE,
    # optimizer
    "optimizer.lr": _at_least(0.0, "typical: 1e-4 to 1e-3"),
    "optimizer.min_lr": _at_least(0.0, "typical: lr/10"),
    "optimizer.weight_decay": _at_least(0.0, "typical: 0.1; 0 turns it off"),
    "optimizer.adam_beta1": Range(lo=0.0, hi=1.0, hi_open=True, fix="typical: 0.9"),
    "optimizer.adam_beta2": Range(lo=0.0, hi=1.0, hi_open=True, fix="typical: 0.95"),
    "optimizer.adam_eps": _positive("typical: 1e-8"),
    "optimizer.clip_grad": _at_least(0.0, "0 turns gradient clipping off; typical: 1.0"),
    # schedule
    "schedule.warmup_steps": COUNT,
    "schedule.decay_steps": SIZE,
    "schedule.wsd_decay_steps": SIZE,
    # training
    "training.steps": _at_least(1, "the number of optimizer steps, e.g. 300"),
    "training.micro_batch_size": SIZE,
    "training.global_batch_size": SIZE,
    "training.seed": Range(lo=0, hi=SEED_MAX, fix="numpy's seed range"),
    "training.z_loss": _at_least(0.0, "0 turns it off; PaLM used 1e-4"),
    "training.eval_interval": SIZE,
    "training.eval_steps": SIZE,
    "training.guard.spike_factor": Range(
        lo=1.0, lo_open=True, fix="typical: 3 (x the median of recent losses)"
    ),
    "training.guard.window": SIZE,
    "training.guard.warmup_steps": COUNT,
    "training.guard.max_retries": COUNT,
    "training.guard.rollback_lr_factor": Range(
        lo=0.0, hi=1.0, lo_open=True, fix="1 keeps the LR, 0.5 halves it after each rollback"
    ),
    # checkpoint
    "checkpoint.save_interval": _at_least(1, "null saves only at the end and on signals"),
    "checkpoint.keep_last": _at_least(1, "null keeps every checkpoint"),
    # logging
    "logging.log_interval": SIZE,
    "logging.diagnostics_interval": _at_least(1, "null turns diagnostics off"),
    # eval
    "eval.downstream.interval": _at_least(1, "null scores the tasks once, at the end of training"),
    "eval.downstream.limit": _at_least(1, "null scores every example of each task"),
    "eval.downstream.batch_size": SIZE,
    "eval.downstream.num_fewshot": _at_least(0, "null keeps each task's default"),
}


def _is_number_type(tp: Any) -> bool:
    """int, float, Optional[...] of them, or a list of them (not bool)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_number_type(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return _is_number_type(get_args(tp)[0])
    return tp in (int, float)


def numeric_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every numeric field of the dataclass ``cls``, recursing into sections."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += numeric_fields(tp, f"{prefix}{f.name}.")
        elif _is_number_type(tp):
            keys.append(f"{prefix}{f.name}")
    return keys


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or not any(f.name == part for f in dataclasses.fields(obj)):
            return None  # a norm option of another placement
        obj = getattr(obj, part)
    return obj


def check_ranges(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first number outside its range (NaN and inf included)."""
    for key, rng in RANGES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if not rng.contains(item):
                raise ConfigError(rng.message(key, item))
    check_split(cfg.data.split)


SPLIT_SYNTAX = re.compile(r"\s*[0-9.]+(\s*,\s*[0-9.]+){0,2}\s*")


def check_split(split: str) -> list[float]:
    """``data.split`` is one to three non-negative weights with a positive sum (Megatron's format)."""
    try:
        if not SPLIT_SYNTAX.fullmatch(split):
            raise ValueError
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError(f"data.split={split!r} is not 'train,valid,test' weights like '98,2,0'") from None
    if not sum(weights) > 0 or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"data.split={split!r} needs a positive train,valid,test weight, like '98,2,0'")
    return weights
