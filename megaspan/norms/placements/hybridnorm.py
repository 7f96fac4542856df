"""HybridNorm and HybridNorm* (Zhuo et al. 2025), verified from BryceZhuo/HybridNorm.

HybridNorm:   attn = softmax(N(Q) N(K)^T / sqrt(d)) N(V)    (per-head norms, before RoPE)
              y  = x + A_qkv(x)                               (no pre-norm on attention)
              x' = F(N2(y)) + N2(y)                           (the MLP residual is the normed y)
HybridNorm*:  block 0 is Pre-LN on both sublayers (QKV norms kept); later blocks as above.

Init: "Megatron" init, sigma = 1/sqrt(2.5 d) (unless model.init_method_std is set) with
sigma/sqrt(2L) on the output projections. Megatron's normal init is not truncated at 3 sigma as
the paper's is (minor). Final norm on.
"""

import math

from megaspan.norms.base import LayerPlan, Placement
from megaspan.norms.registry import register


@register
class HybridNorm(Placement):
    name = "hybridnorm"
    description = "HybridNorm: QKV-norm attention, x + A(x); N(y) + F(N(y)); final norm"
    qkv_norm = True

    def plan(self, layer_number: int) -> LayerPlan:
        return LayerPlan(pre_mlp_norm=True, mlp_residual_normed=True, qkv_norm=True)

    def init_std(self, hidden_size: int, requested: float | None) -> float:
        return 1.0 / math.sqrt(2.5 * hidden_size) if requested is None else requested


@register
class HybridNormStar(HybridNorm):
    name = "hybridnorm_star"
    description = "HybridNorm*: HybridNorm with block 0 Pre-LN (QKV norms kept)"

    def plan(self, layer_number: int) -> LayerPlan:
        if layer_number == 1:
            return LayerPlan(input_norm=True, pre_mlp_norm=True, qkv_norm=True)
        return super().plan(layer_number)
