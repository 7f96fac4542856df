"""Layer and block specs for every placement, for the local and the Transformer Engine backend.

One spec per *global* layer (placements such as Mix-LN, LNS, HybridNorm* and SpanNorm differ by
layer number), sliced to the layers of this pipeline stage exactly as Megatron's
``get_gpt_decoder_block_spec`` does. Always returns ``TransformerBlockSubmodules`` so the final
norm is explicit (``layer_norm=None`` means none).

Backends:
* ``local``: Megatron-Core modules only (runs on CPU); norms are :class:`SPNorm`.
* ``transformer_engine``: TE linears/attention/norms. Where a layer has a plain pre-norm it keeps
  TE's fused norm+linear (``TELayerNormColumnParallelLinear``); unfused only where the placement
  needs the norm output elsewhere (HybridNorm's MLP residual) or scales it (LNS, in every layer).
  The local spec maps the would-be-fused norms to TE's key names, so checkpoints are
  interchangeable between the two backends.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megaspan.norms.base import Placement
from megaspan.norms.layer import (
    NormPlacementSubmodules,
    NormPlacementTransformerLayer,
    QKVNormSelfAttention,
    QKVNormSelfAttentionSubmodules,
)
from megaspan.norms.modules import HeadNorm, SPNorm
from megaspan.norms.slots import SLOTS, LayerPlan


class _Backend:
    """The provider plus the norm builders megaspan uses with it."""

    def __init__(self, impl: str, rms: bool):
        self.impl = impl
        if impl == "transformer_engine":
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

            self.provider: BackendSpecProvider = TESpecProvider()
            self.norm = self.provider.layer_norm(rms_norm=rms, for_qk=False)
            self.qk_norm = self.provider.layer_norm(rms_norm=rms, for_qk=True)
        else:
            self.provider = LocalSpecProvider()
            self.norm = SPNorm
            self.qk_norm = SPNorm
        self.fuses = self.provider.fuse_layernorm_and_linear()


def _attention_spec(backend: _Backend, plan: LayerPlan, fuse_norm: bool, qk_norm: bool = False) -> ModuleSpec:
    """The attention of one layer: HybridNorm's Q/K/V-norm attention where the placement's plan
    asks for it, else Megatron's SelfAttention, with per-head Q and K norms when ``qk_norm``
    (``model.qk_layernorm``, any placement)."""
    p = backend.provider
    linear_qkv = p.column_parallel_layer_norm_linear() if fuse_norm else p.column_parallel_linear()
    common = dict(
        linear_qkv=linear_qkv, core_attention=p.core_attention(), linear_proj=p.row_parallel_linear()
    )
    if plan.qkv_norm:
        return ModuleSpec(
            module=QKVNormSelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=QKVNormSelfAttentionSubmodules(
                **common, q_layernorm=backend.qk_norm, k_layernorm=backend.qk_norm, v_layernorm=HeadNorm
            ),
        )
    if qk_norm:
        common.update(q_layernorm=backend.qk_norm, k_layernorm=backend.qk_norm)
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(**common),
    )


def _mlp_spec(backend: _Backend, is_moe: bool, num_experts, grouped_gemm: bool, fuse_norm: bool):
    p = backend.provider
    if is_moe:
        return get_moe_module_spec_for_backend(p, num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    linear_fc1 = p.column_parallel_layer_norm_linear() if fuse_norm else p.column_parallel_linear()
    return partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=p.row_parallel_linear()),
    )


def layer_spec(
    config, placement: Placement, layer_number: int, backend: _Backend, is_moe: bool
) -> ModuleSpec:
    """The spec of global layer ``layer_number`` (1-based)."""
    plan = placement.plan(layer_number)
    # TE can fuse a pre-norm into the following linear only if nothing else needs the norm's
    # output and it is not rescaled; the local backend records the same decision in its key map.
    # Rescaling is decided per placement, not per layer (see Placement.scales_pre_norms): LNS's
    # block 1 has scale 1 but must keep the same keys as the other blocks.
    # The MLP's input norm also stays unfused when the MLP residual is the normed input
    # (HybridNorm) and for MoE layers (the router reads the norm output too).
    unfusable = {"attention": False, "mlp": plan.mlp_residual_normed or is_moe}
    scaled = placement.scales_pre_norms
    norms, keys_map = {}, {}
    fused = {"attention": False, "mlp": False}  # does the sublayer's first linear own a norm?
    for slot in SLOTS:
        on = getattr(plan, slot.flag)
        fuse = on and slot.fused_key is not None and not scaled and not unfusable[slot.sublayer]
        fused[slot.sublayer] |= fuse
        if fuse and backend.fuses:
            norms[slot.module] = IdentityOp  # TE's fused norm+linear owns it
        else:
            norms[slot.module] = backend.norm if on else IdentityOp
            if fuse:
                keys_map[f"{slot.module}."] = slot.fused_key
    submodules = NormPlacementSubmodules(
        **norms,
        self_attention=_attention_spec(
            backend, plan, fused["attention"] and backend.fuses, qk_norm=bool(config.qk_layernorm)
        ),
        self_attn_bda=get_bias_dropout_add,
        mlp=_mlp_spec(
            backend, is_moe, config.num_moe_experts, config.moe_grouped_gemm, fused["mlp"] and backend.fuses
        ),
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=keys_map,
    )
    return ModuleSpec(
        module=NormPlacementTransformerLayer,
        submodules=submodules,
        params={"placement": placement, "plan": plan},
    )


def _moe_pattern(config) -> list[bool]:
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def block_spec(
    config, placement: Placement, impl: str, vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """Specs of the layers this (virtual) pipeline stage builds, plus the final norm."""
    backend = _Backend(impl, rms=config.normalization == "RMSNorm")
    moe = _moe_pattern(config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    specs = [
        layer_spec(config, placement, layer_number, backend, moe[layer_number - 1])
        for layer_number in range(offset + 1, offset + count + 1)
    ]
    return TransformerBlockSubmodules(
        layer_specs=specs, layer_norm=backend.norm if placement.final_norm else None
    )
