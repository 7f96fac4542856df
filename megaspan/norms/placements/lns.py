"""LayerNorm Scaling, "The Curse of Depth in LLMs" (Sun et al., NeurIPS 2025).

    y  = x + A(N1(x) / sqrt(l))
    x' = y + F(N2(y) / sqrt(l))       l = global 1-based layer number; final norm on.

The authors found LNS + scaled init (sigma/sqrt(2L)) hurts and drop it, so ``scaled_init`` is
off. 1/sqrt(l) is a constant multiplier on the norm output, never folded into the gain.
"""

from megaspan.norms.base import LayerPlan, Placement, inv_sqrt
from megaspan.norms.registry import register


@register
class LayerNormScaling(Placement):
    name = "lns"
    description = "LayerNorm Scaling: Pre-LN with N(.)/sqrt(l); no scaled init; final norm"
    scaled_init = False

    def plan(self, layer_number: int) -> LayerPlan:
        return LayerPlan(input_norm=True, pre_mlp_norm=True, norm_scale=inv_sqrt(layer_number))
