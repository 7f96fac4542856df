"""Mix-LN (Li, Yin, Liu; ICLR 2025): Post-LN in the first floor(alpha*L) blocks, Pre-LN after.

alpha = 0.25 by default (``model.norm.mixln_alpha``). The rule uses the *global* 1-based layer
number, so it is the same under pipeline parallelism. Final norm on (the last blocks are Pre-LN).
"""

import math
from dataclasses import dataclass

from megaspan.norms.base import LayerPlan, Placement, PlacementOptions
from megaspan.norms.placements.post import PostNorm
from megaspan.norms.placements.pre import PreNorm
from megaspan.norms.registry import register


@dataclass(kw_only=True)
class MixLNOptions(PlacementOptions):
    mixln_alpha: float = 0.25
    """The first floor(alpha*L) blocks are Post-LN, the rest Pre-LN."""


@register
class MixLN(Placement):
    name = "mixln"
    description = "Mix-LN: Post-LN for layers <= floor(alpha L), Pre-LN after; final norm"
    Options = MixLNOptions
    options: MixLNOptions

    def __init__(self, options, num_layers):
        super().__init__(options, num_layers)
        self.num_post = math.floor(self.options.mixln_alpha * num_layers)
        # The halves only contribute their equations; final_norm and init are Mix-LN's own.
        self._post = PostNorm(None, num_layers)
        self._pre = PreNorm(None, num_layers)

    def _for(self, layer_number: int) -> Placement:
        return self._post if layer_number <= self.num_post else self._pre

    def plan(self, layer_number: int) -> LayerPlan:
        return self._for(layer_number).plan(layer_number)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        return self._for(layer.layer_number).attn_residual(layer, bda, out_with_bias, residual, p)

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        return self._for(layer.layer_number).mlp_residual(layer, bda, out_with_bias, residual, p)
