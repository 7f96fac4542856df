"""Init rules per placement, checked on the built model against rules written here from the doc."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megaspan.models import apply_init_rules, build_model
from tests.helpers.models import NUM_LAYERS as L
from tests.helpers.models import stack_cfg as make_cfg
from tests.helpers.placements import PLACEMENTS

HEADS, GROUPS, HIDDEN = 4, 2, 64
HN = HIDDEN // HEADS

# Every registered placement is checked; these sets are the papers' rules (docs), the exceptions
# to "no rescaling after Megatron's init" and "Megatron's sigma/sqrt(2L) on output projections".
RESCALES = {"b2t", "deepnorm"}
"""Placements whose default options rescale weights after Megatron's init (tested one by one below)."""
NO_MEGATRON_SCALING = {"b2t", "deepnorm", "lns", "mixln"}
"""Placements that drop Megatron's output-projection scaling (own depth scaling, or none for LNS;
Mix-LN's post_pre code uses plain N(0, 0.02) everywhere)."""


def snapshot(chunks):
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}


def build_pair(placement, moe=False, extra=()):
    """(weights before the placement's init rule, weights after), same Megatron init."""
    built = build_model(make_cfg(placement, moe, extra=extra), vocab_size=64, init_rules=False)
    before = snapshot(built.chunks)
    apply_init_rules(built.chunks, built.placement)
    return before, snapshot(built.chunks)


# Written independently of megaspan.norms.base's patterns: Megatron's parameter names.
BLOCK_WEIGHT = re.compile(
    r"decoder\.layers\.\d+\.(self_attention\.linear_(qkv|proj)\.weight|mlp\.(.*\.)?linear_fc[12]\.weight)$"
)


def ratios(before, after):
    out = {}
    for name, b in before.items():
        a = after[name]
        mask = b.abs() > 1e-12
        out[name] = (a[mask] / b[mask]) if mask.any() else torch.ones(1)
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_b2t_scales_every_block_weight(mcore, moe):
    before, after = build_pair("b2t", moe)
    scaled = 0
    for name, r in ratios(before, after).items():
        expected = L**-0.5 if BLOCK_WEIGHT.search(name) else 1.0
        scaled += expected != 1.0
        torch.testing.assert_close(r, torch.full_like(r, expected), msg=name)
    # qkv, proj, fc1, fc2 per layer; MoE: 4 experts x (fc1, fc2) instead of one MLP.
    assert scaled == L * (2 + (8 if moe else 2))


def test_spannorm_b2t_branch_init(mcore):
    before, after = build_pair("spannorm", extra=("model.norm.span_branch_init=b2t",))
    for name, r in ratios(before, after).items():
        expected = L**-0.5 if BLOCK_WEIGHT.search(name) else 1.0
        torch.testing.assert_close(r, torch.full_like(r, expected), msg=name)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_deepnorm_beta_hits_exactly_v_rows(mcore, moe):
    _check_deepnorm_v_rows(*build_pair("deepnorm", moe), HEADS, GROUPS)


# Other group shapes: 8 heads in 2 groups (4 query heads a group), and plain multi-head attention.
# With the default 4 heads / 2 groups, heads // groups == heads - groups: a wrong formula passed.
@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 4)], ids=["gqa-8-2", "mha-4"])
def test_deepnorm_v_rows_for_other_group_shapes(mcore, heads, groups):
    extra = (f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}")
    _check_deepnorm_v_rows(*build_pair("deepnorm", extra=extra), heads, groups)


def _check_deepnorm_v_rows(before, after, heads: int, groups: int) -> None:
    hn = HIDDEN // heads  # the head dim of this shape
    beta = (8 * L) ** -0.25
    per_group = (heads // groups + 2) * hn
    for name, b in before.items():
        a = after[name]
        if name.endswith("linear_qkv.weight"):
            rows = torch.arange(b.shape[0])
            is_v = (rows % per_group) >= per_group - hn  # [q q | k | v] per query group
            torch.testing.assert_close(a[is_v], b[is_v] * beta, msg=name)
            torch.testing.assert_close(a[~is_v], b[~is_v], msg=name)
            assert int(is_v.sum()) == groups * hn
        elif re.search(r"linear_fc1\.weight$", name):
            # SwiGLU: [activated; linear] rows. torchscale's GLU scales fc1 (activated), not the gate.
            half = b.shape[0] // 2
            torch.testing.assert_close(a[:half], b[:half] * beta, msg=name)
            torch.testing.assert_close(a[half:], b[half:], msg=name)
        elif re.search(r"(linear_proj|linear_fc2)\.weight$", name):
            torch.testing.assert_close(a, b * beta, msg=name)
        else:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    "extra", [("model.norm.deepnorm_glu_scale=both",), ("model.activation=gelu",)], ids=["glu-both", "gelu"]
)
def test_deepnorm_fc1_fully_scaled_when_asked_or_not_gated(mcore, extra):
    before, after = build_pair("deepnorm", extra=extra)
    beta = (8 * L) ** -0.25
    fc1 = [n for n in before if n.endswith("linear_fc1.weight")]
    assert len(fc1) == L
    for name in fc1:
        torch.testing.assert_close(after[name], before[name] * beta, msg=name)


def test_mixln_megatron_init_option(mcore):
    built = build_model(
        make_cfg("mixln", extra=("model.hidden_size=256", "model.norm.mixln_init=megatron")),
        vocab_size=64,
        init_rules=False,
    )
    model = built.chunks[0]
    ratio = _std(model, r"linear_proj\.weight$") / _std(model, r"linear_qkv\.weight$")
    assert abs(ratio - 1 / math.sqrt(2 * L)) < 0.1 / math.sqrt(2 * L)


def test_mixln_below_four_layers_warns_once():
    from megaspan.norms.placements import mixln
    from megaspan.norms.registry import build_placement

    mixln._warned.clear()
    with pytest.warns(UserWarning, match=r"floor\(0.25\*3\) = 0 Post-LN layers: it is plain Pre-LN"):
        assert build_placement("mixln", None, 3).num_post == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_placement("mixln", None, 3)  # the same model again: no second warning
        assert build_placement("mixln", None, 4).num_post == 1


@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p not in RESCALES])
def test_placements_without_rescaling_leave_weights(mcore, placement):
    before, after = build_pair(placement)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _std(model, pattern):
    ws = [p for n, p in model.named_parameters() if re.search(pattern, n)]
    return torch.cat([w.flatten() for w in ws]).std().item()


SCALED_OUTPUT_CASES = [(p, (), p not in NO_MEGATRON_SCALING) for p in PLACEMENTS] + [
    # SpanNorm's b2t branch init is L^-1/2 *instead of* Megatron's sigma/sqrt(2L): never both
    ("spannorm", ("model.norm.span_branch_init=b2t",), False),
]


@pytest.mark.parametrize(
    "placement,extra,scaled",
    SCALED_OUTPUT_CASES,
    ids=[p + "".join(f"-{e.split('=')[1]}" for e in x) for p, x, _ in SCALED_OUTPUT_CASES],
)
def test_megatron_scaled_output_init(mcore, placement, extra, scaled):
    """Megatron's sigma/sqrt(2L) on linear_proj/fc2 only where the paper uses it (LNS drops it).
    Built without init rules: this is Megatron's init as the placement configures it."""
    built = build_model(
        make_cfg(placement, extra=("model.hidden_size=256", "model.num_attention_heads=4", *extra)),
        vocab_size=64,
        init_rules=False,
    )
    model = built.chunks[0]
    qkv = _std(model, r"linear_qkv\.weight$")
    proj = _std(model, r"linear_proj\.weight$")
    ratio = proj / qkv
    expected = 1 / math.sqrt(2 * L) if scaled else 1.0
    assert abs(ratio - expected) < 0.1 * expected, (placement, ratio, expected)


def test_hybridnorm_megatron_init_std(mcore):
    built = build_model(make_cfg("hybridnorm", extra=("model.hidden_size=256",)), vocab_size=64)
    std = _std(built.chunks[0], r"linear_qkv\.weight$")
    assert abs(std - 1 / math.sqrt(2.5 * 256)) < 0.05 / math.sqrt(2.5 * 256)


def test_lns_scale_uses_global_layer_number(mcore):
    built = build_model(make_cfg("lns"), vocab_size=64)
    for layer in built.chunks[0].decoder.layers:
        assert getattr(layer.input_layernorm, "output_scale", 1.0) == pytest.approx(
            1 / math.sqrt(layer.layer_number)
        )
        assert getattr(layer.pre_mlp_layernorm, "output_scale", 1.0) == pytest.approx(
            1 / math.sqrt(layer.layer_number)
        )
