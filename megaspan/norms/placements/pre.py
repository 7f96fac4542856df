"""Pre-LN (Baevski & Auli 2019; Xiong et al. 2020).

y  = x + A(N1(x))
x' = y + F(N2(y))            final norm before the LM head; Megatron scaled init.
"""

from megaspan.norms.base import LayerPlan, Placement
from megaspan.norms.registry import register


@register
class PreNorm(Placement):
    name = "pre"
    description = "Pre-LN: x + A(N(x)), y + F(N(y)); final norm"

    def plan(self, layer_number: int) -> LayerPlan:
        return LayerPlan(input_norm=True, pre_mlp_norm=True)
