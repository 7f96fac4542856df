"""``model.arch=hybrid``: every placement on Megatron-Core's ``HybridModel`` equals the GPT build.

For every placement x {dense, MoE} x {LayerNorm, RMSNorm}: built from the same seed, the hybrid
model's weights are the GPT model's (GPT block i <-> hybrid layers 2i, 2i+1; init rules
included), and logits, loss and every gradient are bitwise equal on the same batch. Plus the
Mix-LN block-number regression, the pattern refusals and the final norm on CPU.
"""

from __future__ import annotations

import pytest
import torch

from megaspan.models import build_model
from megaspan.models.convert import gpt_to_hybrid_state_dict, hybrid_to_gpt_state_dict
from megaspan.models.hybrid import (
    HybridPatternError,
    _BlockView,
    build_hybrid_model,
    check_pattern,
    pattern_for,
)
from megaspan.norms import available
from tests.helpers.models import fresh_model_parallel, tiny_cfg

PLACEMENTS = list(available())
VOCAB = 128


def _build(cfg, hybrid: bool):
    fresh_model_parallel(seed=1234)  # same init stream for both builds
    return (build_hybrid_model if hybrid else build_model)(cfg, VOCAB).chunks[0]


def _run(model, tokens, labels):
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    # Megatron's process-wide MoE aux-loss tracker is sized by the first model's num_layers
    # (L for GPT, 2L for hybrid); one process trains one model, these tests run both.
    destroy_moe_metrics_tracker()
    model.train()
    model.zero_grad()
    logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    loss = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=labels)
    (loss.sum() + 1e-3 * logits.square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def compare(cfg) -> tuple[bool, list[str]]:
    """(weights equal after init, names of outputs/gradients that differ) for GPT vs hybrid."""
    gpt, hybrid = _build(cfg, False), _build(cfg, True)
    gpt_state = gpt_to_hybrid_state_dict(gpt.state_dict())
    hybrid_state = hybrid.state_dict()
    assert set(gpt_state) == set(hybrid_state)
    same_init = all(torch.equal(v, hybrid_state[k]) for k, v in gpt_state.items() if torch.is_tensor(v))
    hybrid.load_state_dict(gpt_state)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, cfg.model.seq_length), generator=g)
    labels = torch.randint(0, VOCAB, (2, cfg.model.seq_length), generator=g)
    g_logits, g_loss, g_grads = _run(gpt, tokens, labels)
    h_logits, h_loss, h_grads = _run(hybrid, tokens, labels)
    g_grads = gpt_to_hybrid_state_dict(g_grads)
    diff = sorted(set(g_grads) ^ set(h_grads))  # a norm that got no gradient in one of them
    diff += [n for n in g_grads if n in h_grads and not torch.equal(g_grads[n], h_grads[n])]
    diff += [
        name
        for name, a, b in (("logits", g_logits, h_logits), ("loss", g_loss, h_loss))
        if not torch.equal(a, b)
    ]
    return same_init, diff


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_hybrid_equals_gpt_bitwise(mcore, placement, moe, norm):
    same_init, diff = compare(tiny_cfg(placement, moe, norm=norm))
    assert same_init, "hybrid init differs from GPT init (init rules or init order)"
    assert diff == []


@pytest.mark.parametrize(
    "extra",
    [
        (
            "model.norm.span_include_attn_term=true",
            "model.norm.span_include_y_term=true",
            "model.norm.span_residual_alpha=0.5",
        ),
        ("model.norm.span_branch_init=b2t",),
    ],
    ids=["switches", "b2t-init"],
)
def test_spannorm_options_hybrid_equals_gpt(mcore, extra):
    same_init, diff = compare(tiny_cfg("spannorm", extra=extra))
    assert same_init and diff == []


def test_moe_layer_freq_and_aux_loss(mcore):
    """Every other block MoE (pattern *-*E...), with the router's aux loss on."""
    cfg = tiny_cfg("pre", moe=True, aux_loss=True, extra=("model.moe.layer_freq=2",))
    hybrid = _build(cfg, True)
    assert [type(layer.mlp).__name__ for layer in hybrid.decoder.layers[1::2]] == ["MoELayer", "MLP"] * 2
    same_init, diff = compare(cfg)
    assert same_init and diff == []


def test_mixln_is_keyed_on_the_block_number(mcore, monkeypatch):
    """Regression: Mix-LN's switch evaluated on the hybrid layer number (2l-1, 2l) instead of the
    block number l puts the MLP half of the last Post-LN block on the Pre-LN equation."""
    cfg = tiny_cfg("mixln", extra=("model.norm.mixln_alpha=0.5",))
    assert compare(cfg) == (True, [])
    real_init = _BlockView.__init__

    def hybrid_numbered(self, layer):
        real_init(self, layer)
        object.__setattr__(self, "layer_number", layer.layer_number)  # the bug

    monkeypatch.setattr(_BlockView, "__init__", hybrid_numbered)
    same_init, diff = compare(cfg)
    assert "loss" in diff and "logits" in diff


def test_half_layers_and_final_norm(mcore):
    hybrid = _build(tiny_cfg("pre"), True)
    layers = hybrid.decoder.layers
    assert [layer.layer_number for layer in layers] == list(range(1, 9))
    assert [layer.block_number for layer in layers] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [layer.half for layer in layers] == ["attention", "mlp"] * 4
    # The two halves of a block share one carry; blocks do not.
    assert layers[0].carry is layers[1].carry and layers[1].carry is not layers[2].carry
    # megaspan's final norm (Megatron's hybrid stack would build TE's TENorm, unavailable on CPU).
    assert type(hybrid.decoder.final_norm).__name__ == "SPNorm"
    assert not hasattr(_build(tiny_cfg("spannorm"), True).decoder, "final_norm")


def test_deepnorm_v_rows_skip_mlp_only_layers(mcore):
    """DeepNorm scales V rows of QKV, out-proj, fc1, fc2: the MLP half has no QKV weight."""
    gpt, hybrid = _build(tiny_cfg("deepnorm"), False), _build(tiny_cfg("deepnorm"), True)
    g = gpt.decoder.layers[0].self_attention.linear_qkv.weight
    h = hybrid.decoder.layers[0].self_attention.linear_qkv.weight
    assert torch.equal(g, h)
    assert not any("linear_qkv" in n for n, _ in hybrid.decoder.layers[1].named_parameters())


def test_state_dict_names_round_trip(mcore):
    gpt = _build(tiny_cfg("hybridnorm_star", moe=True), False)
    names = list(gpt.state_dict())
    assert list(hybrid_to_gpt_state_dict(gpt_to_hybrid_state_dict(dict.fromkeys(names)))) == names


# ---- patterns --------------------------------------------------------------------------------


def test_pattern_for_matches_gpt_stage_split():
    from dataclasses import replace

    from megaspan.models.build import placement_for
    from megaspan.models.mcore_config import transformer_config

    cfg = tiny_cfg("pre", moe=True, extra=("model.moe.layer_freq=2",))
    config = transformer_config(cfg, placement_for(cfg), cuda=False)
    assert pattern_for(config) == "*E*-*E*-"
    assert pattern_for(replace(config, pipeline_model_parallel_size=2)) == "*E*-|*E*-"
    assert (
        pattern_for(replace(config, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))
        == "*E|*-|*E|*-"
    )
    assert (
        pattern_for(replace(config, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=3))
        == "*E*-*E|*-"
    )


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("*-M*-", "'M' (Mamba)"),
        ("*-G-", "'G' (gated delta-net)"),
        ("*-D-", "'D' (DeepSeek sparse attention)"),
        ("*-*|-", "splits a block"),
        ("-*", "splits a block"),
        ("*-*-/*-", "multi-token prediction"),
    ],
)
def test_pattern_refusals_are_one_line(pattern, words):
    with pytest.raises(HybridPatternError) as err:
        check_pattern(pattern)
    message = str(err.value)
    assert words in message and "\n" not in message


def test_pattern_accepts_blocks():
    assert check_pattern("*-*E|*-*-") == ["*-*E", "*-*-"]


# ---- config ----------------------------------------------------------------------------------


def test_arch_defaults_to_gpt_and_dispatches(mcore):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    assert tiny_cfg("pre").model.arch == "gpt"
    assert isinstance(build_model(tiny_cfg("pre"), VOCAB).chunks[0], GPTModel)
    built = build_model(tiny_cfg("pre", extra=("model.arch=hybrid",)), VOCAB)
    assert isinstance(built.chunks[0], HybridModel) and built.config.num_layers == 8


@pytest.mark.parametrize("placement", ["spannorm", "b2t"])
def test_block_recompute_refused_for_block_spanning_placements(placement):
    from megaspan.config import validate
    from megaspan.errors import ConfigError

    recompute = (
        "parallel.recompute_granularity=full",
        "parallel.recompute_method=block",
        "parallel.recompute_num_layers=1",
    )
    with pytest.raises(ConfigError) as err:
        validate(tiny_cfg(placement, extra=("model.arch=hybrid", *recompute)))
    assert "recompute_method=uniform" in str(err.value) and "\n" not in str(err.value)
    validate(tiny_cfg(placement, extra=recompute))  # gpt: one layer per block, fine
    validate(tiny_cfg("pre", extra=("model.arch=hybrid", *recompute)))  # halves independent


def test_uniform_recompute_equals_gpt(mcore):
    """Full recompute in chunks of whole blocks (recompute_num_layers counts blocks)."""
    extra = (
        "parallel.recompute_granularity=full",
        "parallel.recompute_method=uniform",
        "parallel.recompute_num_layers=1",
    )
    same_init, diff = compare(tiny_cfg("spannorm", extra=extra))
    assert same_init and diff == []


@pytest.mark.integration
def test_plan_accepts_hybrid():
    """`megaspan plan` with model.arch=hybrid: same per-stage counts as gpt, stages list blocks."""
    from tests.helpers.cli import plan_json
    from tests.helpers.models import SMALL_MOE

    layout = [
        "model.norm_placement=spannorm",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "parallel.expert_model_parallel_size=2",
    ]
    gpt = plan_json(4, SMALL_MOE + layout)
    hybrid = plan_json(4, SMALL_MOE + layout + ["model.arch=hybrid"])
    assert hybrid["sharded_total"] == gpt["sharded_total"] == gpt["single_device_params"]
    assert [s["shard"]["layers"] for s in hybrid["stages"]] == [s["shard"]["layers"] for s in gpt["stages"]]
