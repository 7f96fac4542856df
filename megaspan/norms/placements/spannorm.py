"""SpanNorm (Wang et al., arXiv 2601.22580, ICML 2026) - RECONSTRUCTED equations.

The paper's full text was not available; the block below follows the best available
reconstruction (docs/placements.md, SpanNorm caveat): a clean residual that spans the *whole*
block, and a Post-LN-style norm of the aggregated block output.

    x~ = N0(x)  in block 0 only (the embedding is not normalized), else x
    y  = N1(alpha * x + A(x~))
    x' = N2(alpha * x [+ y] [+ A(x~)] + F(y))     the MLP skip is the BLOCK INPUT x, not y

Switches (``model.norm.*``) select the variant without code changes:
    span_include_y_term     add y inside N2 (then SpanNorm == B2T's sum)
    span_include_attn_term  add A(x~) inside N2 (the raw attention output, no second dropout)
    span_residual_alpha     alpha above (default 1)
    span_branch_init        'megatron': sigma/sqrt(2L) on output projections (default);
                            'b2t': L^{-1/2} on all block weights, no Megatron scaling
No final norm by default (the stream is already normalized).
"""

from dataclasses import dataclass
from typing import Literal

from megaspan.norms.base import LayerPlan, Placement, PlacementOptions, inv_sqrt
from megaspan.norms.registry import register
from megaspan.norms.weights import ALL_BLOCK_WEIGHTS, scale_weights


@dataclass(kw_only=True)
class SpanNormOptions(PlacementOptions):
    """Switches of the reconstructed equations (``model.norm.*``)."""

    span_include_attn_term: bool = False
    """Add the attention output A(x~) inside the block's final norm N2."""
    span_include_y_term: bool = False
    """Add y = N1(x + A) inside N2 (makes SpanNorm equal to B2T's sum)."""
    span_residual_alpha: float = 1.0
    """Multiplier on the block input x inside both norms."""
    span_branch_init: Literal["megatron", "b2t"] = "megatron"
    """Branch init: 'megatron' = sigma/sqrt(2L) on output projections; 'b2t' = L^-1/2 on all block weights."""


@register
class SpanNorm(Placement):
    name = "spannorm"
    description = "SpanNorm (reconstructed): N1(x + A(N0 x)), N2(x + F(y)); no final norm"
    Options = SpanNormOptions
    options: SpanNormOptions
    default_final_norm = False
    block_spanning = True

    @property
    def scaled_init(self) -> bool:  # type: ignore[override]
        return self.options.span_branch_init == "megatron"

    def plan(self, layer_number: int) -> LayerPlan:
        return LayerPlan(input_norm=layer_number == 1, post_attn_norm=True, post_mlp_norm=True)

    def attn_residual(self, layer, bda, out_with_bias, residual, p):
        # residual is the un-normed block input x (N0 feeds only the attention input).
        if self.options.span_include_attn_term:
            out, bias = out_with_bias
            layer.attn_output = out if bias is None else out + bias
        return layer.post_attn_norm(bda(out_with_bias, self.options.span_residual_alpha * residual, p))

    def mlp_residual(self, layer, bda, out_with_bias, residual, p):
        # residual is y; the span skip is the block input x.
        skip = self.options.span_residual_alpha * layer.block_input
        if self.options.span_include_y_term:
            skip = skip + residual
        if self.options.span_include_attn_term:
            skip = skip + layer.attn_output
        return layer.post_mlp_norm(bda(out_with_bias, skip, p))

    def init_weights(self, layer) -> None:
        if self.options.span_branch_init == "b2t":
            scale_weights(layer, ALL_BLOCK_WEIGHTS, inv_sqrt(self.num_layers))
