"""The one ``TransformerLayer`` subclass every placement runs on, and the Q/K/V-norm attention.

Megatron-Core's ``TransformerLayer.forward`` is kept intact: attention, MLP/MoE, recompute,
activation offloading, TP/SP/EP/CP and ``sharded_state_dict`` all keep working. Placements
change only three things, all through documented extension points:

1. which norm slots exist (the spec, built from :class:`~megaspan.norms.base.LayerPlan`);
2. the two bias-dropout-add callables (``self_attn_bda``, ``mlp_bda``): they are *wrapped*,
   so Megatron's fused BDA still does the add, and the placement adds norms / scales / extra
   residual terms around it;
3. the pre-MLP norm may return ``(out, residual)`` - Megatron's own tuple contract - for
   placements whose MLP residual is the normed input (HybridNorm).

Block-spanning residuals (SpanNorm, B2T) read the block input, stashed by :meth:`forward`.
Full-layer recompute re-runs ``forward`` and so re-stashes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Optional

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megaspan.norms.base import Placement
from megaspan.norms.modules import add_output_scale
from megaspan.norms.slots import EXTRA_SLOTS, LayerPlan

NormPlacementSubmodules = make_dataclass(
    "NormPlacementSubmodules",
    [(slot.module, object, field(default=IdentityOp)) for slot in EXTRA_SLOTS],
    bases=(TransformerLayerSubmodules,),
    module=__name__,
)
NormPlacementSubmodules.__doc__ = (
    "Megatron's layer slots plus one field per extra norm slot of megaspan.norms.slots.SLOTS."
)


class NormPlacementTransformerLayer(TransformerLayer):
    """A Megatron-Core ``TransformerLayer`` whose norm placement is set by ``placement``."""

    def __init__(
        self,
        config,
        submodules: NormPlacementSubmodules,
        layer_number: int = 1,
        *args,
        placement: Placement,
        plan: LayerPlan,
        **kwargs,
    ):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.placement = placement
        self.plan = plan
        if plan != placement.plan(self.layer_number):
            # The spec was built for another global layer number (e.g. sliced wrongly for a
            # pipeline stage): the norm layout would silently belong to a different layer.
            raise RuntimeError(
                f"layer {self.layer_number}: spec plan {plan} != placement plan "
                f"{placement.plan(self.layer_number)}; build specs with megaspan.models.block_spec"
            )

        def make_norm(builder):
            return builder(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

        for slot in EXTRA_SLOTS:  # Megatron's own slots are built by TransformerLayer
            setattr(self, slot.module, make_norm(getattr(submodules, slot.module)))
        if plan.norm_scale != 1.0:
            for norm in (self.input_layernorm, self.pre_mlp_layernorm):
                if not isinstance(norm, IdentityOp):
                    add_output_scale(norm, plan.norm_scale)

        if plan.mlp_residual_normed:
            # CheckpointWithoutOutput frees the norm output after the MLP, but here it is also
            # the residual of the MLP add: recomputing it would free a live tensor.
            self.recompute_pre_mlp_layernorm = False
        if placement.block_spanning and config.cuda_graph_modules:
            raise ValueError(
                f"norm_placement={placement.name} adds the block input to the MLP residual, which "
                "partial CUDA graphs (cuda_graph_modules) replay outside the graph; use "
                "full-layer CUDA graphs or none"
            )

        self._block_input = None
        self.attn_output = None  # stashed by placements that reuse A(x) (SpanNorm option)
        attn_bda, mlp_bda = self.self_attn_bda, self.mlp_bda

        def wrapped_attn_bda(training, fused):
            inner = attn_bda(training, fused)
            return lambda out, residual, p: placement.attn_residual(self, inner, out, residual, p)

        def wrapped_mlp_bda(training, fused):
            inner = mlp_bda(training, fused)
            return lambda out, residual, p: placement.mlp_residual(self, inner, out, residual, p)

        self.self_attn_bda = wrapped_attn_bda
        self.mlp_bda = wrapped_mlp_bda

    @property
    def block_input(self):
        """The layer's input ``x_l`` ``[s, b, h]`` during the current forward."""
        return self._block_input

    def forward(self, *args, **kwargs):
        self._block_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._block_input = None
            self.attn_output = None

    def _forward_pre_mlp_layernorm(self, hidden_states):
        out = super()._forward_pre_mlp_layernorm(hidden_states)
        if self.plan.mlp_residual_normed:
            return out, out
        return out

    def _get_submodules_under_cudagraphs(self):
        submodules = super()._get_submodules_under_cudagraphs()
        if self.config.cuda_graph_modules:
            for sublayer, module in (("attention", self.self_attention), ("mlp", self.mlp)):
                if module in submodules:
                    submodules += [getattr(self, s.module) for s in EXTRA_SLOTS if s.sublayer == sublayer]
        return submodules


@dataclass
class QKVNormSelfAttentionSubmodules(SelfAttentionSubmodules):
    v_layernorm: Optional[object] = None


class QKVNormSelfAttention(SelfAttention):
    """Self-attention with per-head norms on Q, K *and* V (HybridNorm).

    Megatron applies ``q_layernorm``/``k_layernorm`` per head after the QKV split and before
    RoPE; this adds the matching ``v_layernorm`` on the value heads ``[sq, b, ng, hn]``.
    """

    def __init__(self, config, submodules: QKVNormSelfAttentionSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.v_layernorm = submodules.v_layernorm(
            hidden_size=self.hidden_size_per_attention_head,
            config=self.config,
            eps=self.config.layernorm_epsilon,
        )

    def get_query_key_value_tensors(
        self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True
    ):
        if not split_qkv:
            raise NotImplementedError("QKV-norm attention needs split_qkv=True (no fused QKV path)")
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        query, key, value, *rest = out
        return (query, key, self.v_layernorm(value), *rest)
