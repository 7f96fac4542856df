"""Mix-LN (Li, Yin, Liu; ICLR 2025): Post-LN in the first floor(alpha*L) blocks, Pre-LN after.

alpha = 0.25 by default (``model.norm.mixln_alpha``). The rule uses the *global* 1-based layer
number, so it is the same under pipeline parallelism. Final norm on (the last blocks are Pre-LN).

Init: the authors' ``post_pre`` code initializes every linear layer with plain N(0, 0.02), output
projections included, so by default Megatron's sigma/sqrt(2L) output scaling is off
(``mixln_init=original``); ``mixln_init=megatron`` keeps Megatron's scaled output init (megaspan's
earlier default: output projections 6.9x smaller at 24 layers). Below 4 layers (with alpha
0.25) floor(alpha*L) = 0 and Mix-LN is exactly Pre-LN: megaspan warns once.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Literal

from megaspan.norms.base import LayerPlan, Placement, PlacementOptions
from megaspan.norms.placements.post import PostNorm
from megaspan.norms.placements.pre import PreNorm
from megaspan.norms.registry import register


@dataclass(kw_only=True)
class MixLNOptions(PlacementOptions):
    mixln_alpha: float = 0.25
    """The first floor(alpha*L) blocks are Post-LN, the rest Pre-LN."""
    mixln_init: Literal["original", "megatron"] = "original"
    """original: N(0, 0.02) everywhere (the authors' code); megatron: output projections sigma/sqrt(2L)."""


_warned: set[tuple[float, int]] = set()


@register
class MixLN(Placement):
    name = "mixln"
    description = "Mix-LN: Post-LN for layers <= floor(alpha L), Pre-LN after; final norm"
    Options = MixLNOptions
    options: MixLNOptions

    def __init__(self, options, num_layers):
        super().__init__(options, num_layers)
        self.num_post = math.floor(self.options.mixln_alpha * num_layers)
        key = (self.options.mixln_alpha, num_layers)
        if self.num_post == 0 and key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"Mix-LN with {num_layers} layers and mixln_alpha={self.options.mixln_alpha} has "
                f"floor({self.options.mixln_alpha}*{num_layers}) = 0 Post-LN layers: it is plain Pre-LN "
                "(use >= 4 layers or a larger model.norm.mixln_alpha)",
                UserWarning,
                stacklevel=2,
            )
        # The halves only contribute their equations; final_norm and init are Mix-LN's own.
        self._post = PostNorm(None, num_layers)
        self._pre = PreNorm(None, num_layers)

    @property
    def scaled_init(self) -> bool:  # type: ignore[override]  # per instance: an option decides
        return self.options.mixln_init == "megatron"

    def _for(self, layer_number: int) -> Placement:
        return self._post if layer_number <= self.num_post else self._pre

    def plan(self, layer_number: int) -> LayerPlan:
        return self._for(layer_number).plan(layer_number)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        return self._for(layer.layer_number).attn_residual(layer, bda, out_with_bias, residual, p)

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        return self._for(layer.layer_number).mlp_residual(layer, bda, out_with_bias, residual, p)
