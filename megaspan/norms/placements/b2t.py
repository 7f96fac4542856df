"""B2T connection (Takase et al., Findings of ACL 2023), verified from takase/b2t_connection.

    y  = N1(x + A(x))
    x' = N2(x + y + F(y))        the extra skip carries the block input x to the last norm.

Init: after the standard init every block weight (q/k/v, out proj, fc1, fc2; experts
included; norms, biases and the router untouched) is multiplied by L^{-1/2}. Megatron's
sigma/sqrt(2L) output-projection scaling is therefore *not* stacked on top. No final norm.
"""

from megaspan.norms.base import inv_sqrt
from megaspan.norms.placements.post import PostNorm
from megaspan.norms.registry import register
from megaspan.norms.weights import ALL_BLOCK_WEIGHTS, scale_weights


@register
class B2T(PostNorm):
    """Post-LN's norms and attention sublayer; only the MLP residual and the init differ."""

    name = "b2t"
    description = "B2T: N(x + A(x)) then N(x + y + F(y)); all block weights x L^-1/2; no final norm"
    scaled_init = False
    block_spanning = True

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        # residual is y; the bottom-to-top term adds the block input x.
        return layer.post_mlp_norm(bda(out_with_bias, residual + layer.block_input, p))

    def init_weights(self, layer) -> None:
        scale_weights(layer, ALL_BLOCK_WEIGHTS, inv_sqrt(self.num_layers))
