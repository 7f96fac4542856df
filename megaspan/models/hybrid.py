"""Every placement on Megatron-Core's ``HybridModel`` (``model.arch=hybrid``).

Megatron's hybrid stack builds one layer per pattern *symbol*: a GPT block becomes ``*`` (a
``TransformerLayer`` with attention only) followed by ``-`` (dense MLP) or ``E`` (MoE), each adding
its own residual. Here a block's spec (:func:`megaspan.models.specs.layer_spec`, the same one the
GPT build uses) is split along :data:`megaspan.norms.slots.SLOTS`' ``sublayer`` column:

* the attention half keeps the input norm, attention, its bias-dropout-add and the
  post-attention / attention-output norms;
* the MLP half keeps the pre-MLP norm, the MLP or MoE, its bias-dropout-add and the
  post-MLP / MLP-output norms.

Each half is a :class:`HybridHalfLayer` (a :class:`NormPlacementTransformerLayer`), so a half
runs Megatron's own ``TransformerLayer.forward`` with the other half's modules as identities, and
only its own bias-dropout-add is wrapped with the placement's residual equation.

Three rules make hybrid equal GPT bit for bit (tests/unit/test_hybrid.py):

* **Block numbers.** Hybrid layer ``n`` (global, 1-based, what Megatron stores in
  ``layer_number``) belongs to block ``(n + 1) // 2``. Every layer-index rule of a placement
  (Mix-LN's switch, LNS's ``1/sqrt(l)``, HybridNorm*'s and SpanNorm's block 0) is evaluated on the
  block number: the placement's equations see a :class:`_BlockView` whose ``layer_number`` is the
  block's. Megatron keeps the hybrid number (checkpoint keys, MoE router statistics).
* **Block input.** Block-spanning placements (SpanNorm, B2T) read the block input ``x`` in the
  MLP half's residual. The attention half hands it to its partner through a :class:`_BlockCarry`
  shared by the two halves (a Python reference, not a wider residual stream: exactly one
  ``[s, b, h]`` tensor still flows between layers and pipeline stages). Hence the two halves of
  a block must run in the same stack and the same recompute chunk: :func:`check_pattern`
  refuses a pipeline boundary between them, and config validation refuses full recompute with
  ``recompute_method=block`` (it checkpoints each hybrid layer on its own).
* **Final norm.** Megatron's ``HybridStack`` hard-codes TE's ``TENorm`` as its final norm (an
  ``ImportError`` without Transformer Engine); :class:`MegaspanHybridStack` builds the
  placement's own final norm (local or TE) instead, or none.

Only transformer symbols exist here: Mamba (``M``), gated delta-net (``G``) and DeepSeek sparse
attention (``D``) are refused (:class:`HybridPatternError`). A placement is defined by where its
norms sit relative to the residual adds of an attention-and-MLP block (Post-LN normalizes
``x + A(x)``, SpanNorm adds the block input before the block's last norm, DeepNorm scales the
skip by ``(2L)^{1/4}`` derived from the number of such blocks); a Mamba mixer is a single
sequence-mixing sublayer with its own internal gated norm and no MLP partner, so none of these
equations says what its residual should be, nor how it would count towards ``L``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megaspan.errors import ConfigError
from megaspan.norms.base import Placement
from megaspan.norms.layer import NormPlacementSubmodules, NormPlacementTransformerLayer
from megaspan.norms.slots import SLOTS, LayerPlan

Half = Literal["attention", "mlp", "moe"]

ATTENTION, MLP, MOE, PIPE = "*", "-", "E", "|"
_SYMBOL_HALF: dict[str, Half] = {ATTENTION: "attention", MLP: "mlp", MOE: "moe"}
_REFUSED = {
    "M": "Mamba",
    "G": "gated delta-net",
    "D": "DeepSeek sparse attention",
    "+": "multi-latent attention",
}


class HybridPatternError(ConfigError):
    """A hybrid layer pattern megaspan's placements cannot run."""


def block_of(layer_number: int) -> int:
    """The GPT block (1-based) that hybrid layer ``layer_number`` (1-based) is half of."""
    return (layer_number + 1) // 2


def _sublayer(half: Half) -> str:
    return "attention" if half == "attention" else "mlp"


# ---- patterns ---------------------------------------------------------------------------------


def check_pattern(pattern: str) -> list[str]:
    """Validate a hybrid layer pattern for megaspan's placements; return its segments.

    Every segment (``|`` separates pipeline stages) must be whole blocks, ``*-`` or ``*E``: a
    boundary between the halves of a block would put the block input on another stage.
    Raises :class:`HybridPatternError` with one line naming the problem and the fix.
    """
    main = pattern.split("/", 1)[0]
    if main != pattern:
        raise HybridPatternError(
            f"hybrid layer pattern {pattern!r}: multi-token prediction ('/...') is not supported with "
            "megaspan placements; drop the part after '/'"
        )
    for symbol, name in _REFUSED.items():
        if symbol in main:
            raise HybridPatternError(
                f"hybrid layer pattern {pattern!r} has '{symbol}' ({name}) layers: megaspan placements "
                "define norms around attention+MLP blocks only (no equation for a mixer without an MLP "
                "partner); use '*-' or '*E' blocks"
            )
    segments = main.split(PIPE)
    for index, segment in enumerate(segments):
        unknown = sorted(set(segment) - set(_SYMBOL_HALF))
        if unknown:
            raise HybridPatternError(
                f"hybrid layer pattern {pattern!r}: unknown symbols {unknown}; use '*-' or '*E' blocks"
            )
        if len(segment) % 2 or any(
            segment[i] != ATTENTION or segment[i + 1] not in (MLP, MOE) for i in range(0, len(segment), 2)
        ):
            raise HybridPatternError(
                f"hybrid layer pattern {pattern!r}: pipeline segment {index} ({segment!r}) splits a block "
                "between its attention and MLP halves (the MLP half reads the block input); every segment "
                "must be whole '*-' / '*E' pairs, with '|' only between blocks"
            )
    return segments


def pattern_for(gpt_config) -> str:
    """The hybrid pattern of megaspan's GPT layout: ``*-`` / ``*E`` per block, and a ``|`` at
    every (virtual) pipeline-stage boundary, exactly where the GPT build splits blocks."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megaspan.models.specs import _moe_pattern

    moe = _moe_pattern(gpt_config)
    pp = gpt_config.pipeline_model_parallel_size
    vpp = gpt_config.virtual_pipeline_model_parallel_size
    if pp == 1 and vpp is None:
        return "".join(ATTENTION + (MOE if m else MLP) for m in moe)
    segments = []
    # Megatron numbers segments vp_stage * pp_size + pp_rank (select_pipeline_segment).
    for vp_stage in range(vpp or 1):
        for pp_rank in range(pp):
            stage = vp_stage if vpp else None
            offset = get_transformer_layer_offset(gpt_config, vp_stage=stage, pp_rank=pp_rank)
            count = get_num_layers_to_build(gpt_config, vp_stage=stage, pp_rank=pp_rank)
            segments.append(
                "".join(ATTENTION + (MOE if moe[b] else MLP) for b in range(offset, offset + count))
            )
    return PIPE.join(segments)


# ---- configs ----------------------------------------------------------------------------------


def hybrid_transformer_config(gpt_config, placement: Placement):
    """The ``TransformerConfig`` of the hybrid model equal to a GPT model built with ``gpt_config``.

    ``num_layers`` counts hybrid layers (2 per block) and ``is_hybrid_model`` makes Megatron's
    output-projection init sigma/sqrt(num_layers) = sigma/sqrt(2L), GPT's value. The pipeline split
    lives in the pattern (:func:`pattern_for`), so the uneven-stage fields are cleared (Megatron
    refuses them together with '|'); ``recompute_num_layers`` is given in blocks and doubled.
    """
    changes = dict(
        num_layers=2 * gpt_config.num_layers,
        is_hybrid_model=True,
        num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None,
        # The pattern places MoE layers; moe_layer_freq would be checked against 2L layers.
        moe_layer_freq=1,
        hetereogenous_dist_checkpoint=False,  # hybrid checkpoint keys are always per layer
    )
    if gpt_config.recompute_num_layers is not None:
        changes["recompute_num_layers"] = 2 * gpt_config.recompute_num_layers
    if placement.scaled_init:
        changes["output_layer_init_method"] = None  # recomputed with the hybrid rule (same value)
    return dataclasses.replace(gpt_config, **changes)


# ---- layers -----------------------------------------------------------------------------------


def split_plan(plan: LayerPlan, half: Half) -> LayerPlan:
    """The slots of ``plan`` that belong to ``half``; modifiers stay where they act."""
    sublayer = _sublayer(half)
    off = {s.flag: False for s in SLOTS if s.sublayer != sublayer}
    if sublayer == "attention":
        off["mlp_residual_normed"] = False
    else:
        off["qkv_norm"] = False
    return dataclasses.replace(plan, **off)


def _absent_bda(training, fused):
    """The bias-dropout-add of the half a layer does not have: its input passes through.

    Megatron's default (``IdentityFuncOp``) is a module, which the placement layer cannot wrap;
    this is the same identity as a plain function."""
    return _pass_through


def _pass_through(x, residual, p):
    return x


def split_submodules(submodules: NormPlacementSubmodules, half: Half) -> NormPlacementSubmodules:
    """``submodules`` of a whole block, with the other half's modules left as identities."""
    sublayer = _sublayer(half)
    own = {s.module for s in SLOTS if s.sublayer == sublayer}
    own |= {"self_attention", "self_attn_bda"} if sublayer == "attention" else {"mlp", "mlp_bda"}
    absent = {"mlp_bda": _absent_bda} if sublayer == "attention" else {"self_attn_bda": _absent_bda}
    keys_map = {
        key: target
        for key, target in submodules.sharded_state_dict_keys_map.items()
        if key.rstrip(".") in own
    }
    return NormPlacementSubmodules(
        **{name: getattr(submodules, name) for name in own}, **absent, sharded_state_dict_keys_map=keys_map
    )


class _BlockCarry:
    """What the two halves of one block share: the block input and (SpanNorm option) A(x~)."""

    __slots__ = ("block_input", "attn_output")

    def __init__(self) -> None:
        self.block_input = None
        self.attn_output = None

    def clear(self) -> None:
        self.block_input = None
        self.attn_output = None


class _BlockView:
    """The layer as a placement's equations see it: a GPT block.

    ``layer_number`` is the block number; ``block_input`` / ``attn_output`` live in the block's
    carry; everything else (the norm modules) is the half layer's own.
    """

    _CARRIED = frozenset(_BlockCarry.__slots__)

    def __init__(self, layer: HybridHalfLayer):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "layer_number", layer.block_number)

    def __getattr__(self, name):
        layer = object.__getattribute__(self, "_layer")
        if name in _BlockView._CARRIED:
            value = getattr(layer.carry, name)
            if value is None and name == "block_input":
                raise RuntimeError(
                    f"hybrid layer {layer.layer_number} (block {layer.block_number}) has no block input: "
                    "its attention half did not run just before it in the same stack (a pipeline "
                    "boundary or a recompute chunk between the halves)"
                )
            return value
        return getattr(layer, name)

    def __setattr__(self, name, value):
        layer = object.__getattribute__(self, "_layer")
        if name in _BlockView._CARRIED:
            setattr(layer.carry, name, value)
        else:
            setattr(layer, name, value)


class HalfPlacement:
    """Adapter: a placement as seen by one half of its blocks (hybrid layer numbers in, block
    numbers out). The absent half's bias-dropout-add is Megatron's identity and stays one."""

    def __init__(self, placement: Placement, half: Half):
        self.inner = placement
        self.half = half

    def plan(self, layer_number: int) -> LayerPlan:
        return split_plan(self.inner.plan(block_of(layer_number)), self.half)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        if self.half != "attention":
            return bda(out_with_bias, residual, p)
        return self.inner.attn_residual(_BlockView(layer), bda, out_with_bias, residual, p)

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        if self.half == "attention":
            return bda(out_with_bias, residual, p)
        return self.inner.mlp_residual(_BlockView(layer), bda, out_with_bias, residual, p)

    def init_weights(self, layer) -> None:
        self.inner.init_weights(layer)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class HybridHalfLayer(NormPlacementTransformerLayer):
    """One half of a megaspan block in Megatron's hybrid stack (``*``, ``-`` or ``E``).

    Built from the block's GPT spec (:func:`megaspan.models.specs.layer_spec`) for block
    ``(layer_number + 1) // 2``, so the two architectures share one spec source and one set of
    checkpoint key names per module.
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number: int = 1,
        *,
        placement: Placement,
        half: Half,
        impl: str,
        **kwargs,
    ):
        from megaspan.models.specs import _Backend, layer_spec

        block = block_of(layer_number)
        backend = _Backend(impl, rms=config.normalization == "RMSNorm")
        spec = layer_spec(config, placement, block, backend, is_moe=half == "moe")
        kwargs["add_layer_offset"] = False  # the hybrid stack passes global numbers
        super().__init__(
            config,
            split_submodules(spec.submodules, half),
            layer_number,
            placement=HalfPlacement(placement, half),
            plan=split_plan(spec.params["plan"], half),
            **kwargs,
        )
        self.half = half
        self.block_number = block
        self.carry = _BlockCarry()  # replaced by the pair's shared carry in MegaspanHybridStack

    def forward(self, *args, **kwargs):
        if self.half == "attention":
            self.carry.block_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        try:
            return super().forward(*args, **kwargs)
        finally:
            if self.half != "attention":
                self.carry.clear()  # the block is done: drop the references


class MegaspanHybridStack(HybridStack):
    """Megatron's ``HybridStack`` with megaspan's final norm and the halves of each block paired."""

    def __init__(self, config, submodules, *, final_norm=None, **kwargs):
        layer_types = kwargs.get("layer_type_list") or []
        offset = kwargs.get("pp_layer_offset", 0)
        check_pattern("".join(layer_types))
        if offset % 2:
            raise HybridPatternError(
                f"hybrid pipeline segment starts at layer {offset + 1}, the MLP half of a block: put '|' "
                "only between blocks"
            )
        kwargs["post_layer_norm"] = False  # Megatron's is TENorm; megaspan's is built below
        super().__init__(config, submodules, **kwargs)
        for attention, mlp in zip(self.layers[0::2], self.layers[1::2]):
            if attention.block_number != mlp.block_number:
                raise RuntimeError(
                    f"hybrid layers {attention.layer_number} and {mlp.layer_number} are not one block"
                )
            mlp.carry = attention.carry
        if self.post_process and final_norm is not None:
            self.post_layer_norm = True
            self.final_norm = final_norm(
                config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon
            )


def hybrid_stack_spec(placement: Placement, impl: str, config) -> ModuleSpec:
    """The ``hybrid_stack_spec`` for ``HybridModel``: one spec per symbol; each half layer
    builds its block's own submodules from its layer number."""
    from megaspan.models.specs import _Backend

    backend = _Backend(impl, rms=config.normalization == "RMSNorm")

    def half(kind: Half) -> ModuleSpec:
        return ModuleSpec(module=HybridHalfLayer, params={"placement": placement, "half": kind, "impl": impl})

    return ModuleSpec(
        module=MegaspanHybridStack,
        submodules=HybridStackSubmodules(
            attention_layer=half("attention"), mlp_layer=half("mlp"), moe_layer=half("moe")
        ),
        params={"final_norm": backend.norm if placement.final_norm else None},
    )


# ---- build ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HybridLayout:
    pattern: str
    config: object  # the hybrid TransformerConfig


def hybrid_layout(gpt_config, placement: Placement) -> HybridLayout:
    pattern = pattern_for(gpt_config)
    check_pattern(pattern)
    return HybridLayout(pattern=pattern, config=hybrid_transformer_config(gpt_config, placement))


def build_hybrid_model(cfg, vocab_size: int, *, init_rules: bool = True, cuda: bool | None = None):
    """``HybridModel`` chunks equal to :func:`megaspan.models.build.build_model`'s ``GPTModel``
    chunks (same placement, same weights layout per block); returns a ``BuiltModel``."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megaspan.models.backend import resolve_impl
    from megaspan.models.build import BuiltModel, apply_init_rules, language_model_kwargs, placement_for
    from megaspan.models.mcore_config import model_vocab_size, transformer_config

    placement = placement_for(cfg)
    impl = resolve_impl(cfg.model.transformer_impl)
    layout = hybrid_layout(transformer_config(cfg, placement, cuda=cuda, impl=impl), placement)
    tconfig = layout.config
    padded = model_vocab_size(cfg, vocab_size)
    vp_size = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunks.append(
            HybridModel(
                config=tconfig,
                hybrid_stack_spec=hybrid_stack_spec(placement, impl, tconfig),
                hybrid_layer_pattern=layout.pattern,
                **language_model_kwargs(cfg, padded, stage),
            )
        )
    if init_rules:
        apply_init_rules(chunks, placement)
    return BuiltModel(chunks=chunks, config=tconfig, placement=placement, impl=impl, vocab_size=padded)
