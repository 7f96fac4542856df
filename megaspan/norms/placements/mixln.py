"""Mix-LN (Li, Yin, Liu; ICLR 2025): Post-LN in the first floor(alpha*L) blocks, Pre-LN after.

alpha = 0.25 by default (``model.norm.mixln_alpha``). The rule uses the *global* 1-based layer
number, so it is the same under pipeline parallelism. Final norm on (the last blocks are Pre-LN).
"""

import math

from megaspan.norms.base import LayerPlan, Placement
from megaspan.norms.post import PostNorm
from megaspan.norms.pre import PreNorm


class MixLN(Placement):
    name = "mixln"
    description = "Mix-LN: Post-LN for layers <= floor(alpha L), Pre-LN after; final norm"

    def __init__(self, options, num_layers):
        super().__init__(options, num_layers)
        self.num_post = math.floor(options.mixln_alpha * num_layers)
        self._post = PostNorm(options, num_layers)
        self._pre = PreNorm(options, num_layers)

    def _for(self, layer_number: int) -> Placement:
        return self._post if layer_number <= self.num_post else self._pre

    def plan(self, layer_number: int) -> LayerPlan:
        return self._for(layer_number).plan(layer_number)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        return self._for(layer.layer_number).attn_residual(layer, bda, out_with_bias, residual, p)

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        return self._for(layer.layer_number).mlp_residual(layer, bda, out_with_bias, residual, p)
