"""Post-LN (Vaswani et al. 2017).

y  = N1(x + A(x))
x' = N2(y + F(y))            the stream is already normalized: no final norm.
"""

from megaspan.norms.base import LayerPlan, Placement
from megaspan.norms.registry import register


@register
class PostNorm(Placement):
    name = "post"
    description = "Post-LN: N(x + A(x)), N(y + F(y)); no final norm"
    default_final_norm = False

    def plan(self, layer_number: int) -> LayerPlan:
        return LayerPlan(post_attn_norm=True, post_mlp_norm=True)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        return layer.post_attn_norm(bda(out_with_bias, residual, p))

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        return layer.post_mlp_norm(bda(out_with_bias, residual, p))
