"""DeepNorm (Wang et al. 2022, DeepNet), decoder-only constants from microsoft/torchscale.

    y  = N1(alpha * x + A(x))
    x' = N2(alpha * y + F(y))          alpha = (2L)^{1/4}

Init: v, out-proj, fc1, fc2 weights x beta = (8L)^{-1/4}; q and k untouched. Only the V rows
of Megatron's fused, per-group interleaved QKV weight are scaled. No Megatron output scaling
(torchscale has none) and no final norm.

Gated FFN (SwiGLU): torchscale's GLU has ``fc1`` (activated: silu(fc1 x)), a linear ``gate`` and
``fc2``, and its DeepNorm init divides only parameters named fc1/fc2/out_proj/v_proj, so the
linear gate keeps its init. Megatron fuses both into ``linear_fc1`` as [activated; linear] rows
(``glu``: ``x_glu, x_linear = chunk(x, 2)``; each TP shard keeps that layout), so by default
only the first half of its rows is scaled (``deepnorm_glu_scale=activated``);
``deepnorm_glu_scale=both`` scales the whole fused weight (megaspan's earlier rule, which starts
the FFN branch beta times smaller than torchscale's).
"""

from dataclasses import dataclass
from typing import Literal, Optional

from megaspan.norms.base import PlacementOptions
from megaspan.norms.placements.post import PostNorm
from megaspan.norms.registry import register
from megaspan.norms.weights import block_weights, scale_value_rows, scale_weights


@dataclass(kw_only=True)
class DeepNormOptions(PlacementOptions):
    deepnorm_alpha: Optional[float] = None
    """Residual multiplier; None = (2L)^(1/4) (decoder-only rule)."""
    deepnorm_beta: Optional[float] = None
    """Init gain on v/proj/fc1/fc2; None = (8L)^(-1/4)."""
    deepnorm_glu_scale: Literal["activated", "both"] = "activated"
    """Gated FFN: beta on the activated half of linear_fc1 only (torchscale's GLU), or on both."""


@register
class DeepNorm(PostNorm):
    """Post-LN's norms with an up-weighted skip."""

    name = "deepnorm"
    description = "DeepNorm: N(alpha x + A(x)), alpha=(2L)^1/4; v/proj/fc1/fc2 x beta=(8L)^-1/4"
    Options = DeepNormOptions
    options: DeepNormOptions
    scaled_init = False

    @property
    def alpha(self) -> float:
        if self.options.deepnorm_alpha is not None:
            return self.options.deepnorm_alpha
        return (2.0 * self.num_layers) ** 0.25

    @property
    def beta(self) -> float:
        if self.options.deepnorm_beta is not None:
            return self.options.deepnorm_beta
        return (8.0 * self.num_layers) ** -0.25

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        return layer.post_attn_norm(bda(out_with_bias, self.alpha * residual, p))

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        return layer.post_mlp_norm(bda(out_with_bias, self.alpha * residual, p))

    def init_weights(self, layer) -> None:
        scale_value_rows(layer, self.beta)
        gated = bool(getattr(getattr(layer, "config", None), "gated_linear_unit", False))
        if gated and self.options.deepnorm_glu_scale == "activated":
            scale_weights(layer, ("proj", "fc2"), self.beta)
            scale_activated_fc1_rows(layer, self.beta)
        else:
            scale_weights(layer, ("proj", "fc1", "fc2"), self.beta)


def scale_activated_fc1_rows(layer, factor: float) -> None:
    """Multiply the activated half of every gated ``linear_fc1`` (dense and experts) by ``factor``.

    Every fc1 weight megatron-core 0.19 builds is ``[2 * ffn_local, h]`` (``[out, in]``), one per
    expert in TEGroupedMLP (``linear_fc1.weight<N>``): rows ``[:ffn_local]`` feed the activation,
    rows ``[ffn_local:]`` are the gate's linear half (mcore's ``glu``: ``act(x0) * x1``).
    """
    import torch

    with torch.no_grad():
        for param in block_weights(layer, "fc1"):
            param[: param.shape[0] // 2].mul_(factor)
