"""DeepNorm (Wang et al. 2022, DeepNet), decoder-only constants from microsoft/torchscale.

    y  = N1(alpha * x + A(x))
    x' = N2(alpha * y + F(y))          alpha = (2L)^{1/4}

Init: v, out-proj, fc1, fc2 weights x beta = (8L)^{-1/4}; q and k untouched. Only the V rows
of Megatron's fused, per-group interleaved QKV weight are scaled. No Megatron output scaling
(torchscale has none) and no final norm.
"""

from dataclasses import dataclass
from typing import Optional

from megaspan.norms.base import PlacementOptions
from megaspan.norms.placements.post import PostNorm
from megaspan.norms.registry import register
from megaspan.norms.weights import scale_value_rows, scale_weights


@dataclass(kw_only=True)
class DeepNormOptions(PlacementOptions):
    deepnorm_alpha: Optional[float] = None
    """Residual multiplier; None = (2L)^(1/4) (decoder-only rule)."""
    deepnorm_beta: Optional[float] = None
    """Init gain on v/proj/fc1/fc2; None = (8L)^(-1/4)."""


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
        scale_weights(layer, ("proj", "fc1", "fc2"), self.beta)
