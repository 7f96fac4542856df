"""Peri-LN / sandwich norm (Kim et al. 2025; Ding et al. 2021).

    y  = x + N3(A(N1(x)))
    x' = y + N4(F(N2(y)))        plus a final norm.

Secondary sources say Peri-LN also normalizes the embedding output; megaspan does not (the
abstract does not say so) - see docs/placements.md (Peri-LN).
"""

from megaspan.norms.base import LayerPlan, Placement
from megaspan.norms.registry import register


def _normed_output(norm, out_with_bias):
    out, bias = out_with_bias
    if bias is not None:
        out = out + bias
    return norm(out), None


@register
class PeriNorm(Placement):
    name = "peri"
    description = "Peri-LN (sandwich): x + N(A(N(x))), y + N(F(N(y))); final norm"

    def plan(self, layer_number: int) -> LayerPlan:
        return LayerPlan(input_norm=True, pre_mlp_norm=True, attn_out_norm=True, mlp_out_norm=True)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        return bda(_normed_output(layer.attn_out_norm, out_with_bias), residual, p)

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        return bda(_normed_output(layer.mlp_out_norm, out_with_bias), residual, p)
