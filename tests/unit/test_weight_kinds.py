"""Init rules on TEGroupedMLP's parameter names and shapes (MoE + grouped GEMM, a GPU-only build).

TE's ``GroupedLinear`` names expert i's weight ``weight{i}`` (one ``[out, in]`` tensor per local
expert) and megatron-core 0.19's ``TEGroupedMLP`` holds two of them, ``linear_fc1`` and
``linear_fc2``. That module cannot be built without a GPU, so this test lays out a layer whose
parameters carry exactly those qualified names and shapes (plain ``nn.Parameter``s: what is under
test is megaspan's name/shape handling, not a TE kernel) and checks what the init rules touch.
A rule keyed on the suffix ``weight1`` (meant for mcore's long-gone legacy GroupedMLP) scaled
expert 1's fc1 by columns instead of rows and counted ``linear_fc2.weight1`` as an fc1 weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megaspan.norms.placements.deepnorm import scale_activated_fc1_rows
from megaspan.norms.weights import ALL_BLOCK_WEIGHTS, block_weights, scale_weights

H, FFN, EXPERTS, HEADS = 8, 6, 3, 2


def _node(**params: torch.Tensor) -> nn.Module:
    module = nn.Module()
    for name, value in params.items():
        module.register_parameter(name, nn.Parameter(value.clone()))
    return module


def grouped_moe_layer() -> nn.Module:
    """A layer with the qualified names and shapes of a TE MoE layer with grouped GEMM experts."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.self_attention = nn.Module()
    # TELayerNormColumnParallelLinear: the fused norm's gain lives on the QKV module.
    layer.self_attention.linear_qkv = _node(
        weight=torch.randn(3 * H, H), layer_norm_weight=torch.ones(H), layer_norm_bias=torch.zeros(H)
    )
    layer.self_attention.linear_proj = _node(weight=torch.randn(H, H))
    layer.mlp = nn.Module()
    layer.mlp.router = _node(weight=torch.randn(EXPERTS, H))
    layer.mlp.experts = nn.Module()
    layer.mlp.experts.num_local_experts = EXPERTS
    # TEColumnParallelGroupedLinear / TERowParallelGroupedLinear: weight{i} is expert i, [out, in].
    layer.mlp.experts.linear_fc1 = _node(**{f"weight{i}": torch.randn(2 * FFN, H) for i in range(EXPERTS)})
    layer.mlp.experts.linear_fc2 = _node(**{f"weight{i}": torch.randn(H, FFN) for i in range(EXPERTS)})
    return layer


def names_of(layer: nn.Module, kind: str) -> set[str]:
    ids = {id(p) for p in block_weights(layer, kind)}
    return {n for n, p in layer.named_parameters() if id(p) in ids}


def test_each_grouped_expert_weight_has_exactly_one_kind():
    layer = grouped_moe_layer()
    kinds = {kind: names_of(layer, kind) for kind in ALL_BLOCK_WEIGHTS}
    assert kinds["qkv"] == {"self_attention.linear_qkv.weight"}
    assert kinds["proj"] == {"self_attention.linear_proj.weight"}
    assert kinds["fc1"] == {f"mlp.experts.linear_fc1.weight{i}" for i in range(EXPERTS)}
    assert kinds["fc2"] == {f"mlp.experts.linear_fc2.weight{i}" for i in range(EXPERTS)}


def test_scale_weights_scales_every_expert_once():
    layer = grouped_moe_layer()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    scale_weights(layer, ALL_BLOCK_WEIGHTS, 0.5)
    for name, param in layer.named_parameters():
        expected = 0.5 if "linear_" in name and name.split(".")[-1].startswith("weight") else 1.0
        torch.testing.assert_close(param, before[name] * expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("expert", range(EXPERTS))
def test_deepnorm_scales_activated_rows_of_every_expert(expert):
    """DeepNorm + SwiGLU: rows [:ffn] of each expert's fc1 (the activated half) times beta, the
    gate's rows and every other weight unchanged."""
    layer = grouped_moe_layer()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    scale_activated_fc1_rows(layer, 0.25)
    name = f"mlp.experts.linear_fc1.weight{expert}"
    after = dict(layer.named_parameters())[name]
    torch.testing.assert_close(after[:FFN], before[name][:FFN] * 0.25, rtol=0, atol=0)
    torch.testing.assert_close(after[FFN:], before[name][FFN:], rtol=0, atol=0)
    for other, param in layer.named_parameters():
        if not other.startswith("mlp.experts.linear_fc1."):
            torch.testing.assert_close(param, before[other], rtol=0, atol=0, msg=other)
