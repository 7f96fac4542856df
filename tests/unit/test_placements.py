"""Every placement x {dense, MoE} x {LayerNorm, RMSNorm}: the Megatron-Core layer stack's output
and gradients equal the independent reference in tests/unit/reference.py on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from megaspan.models import build_model
from megaspan.norms import available
from tests.helpers.models import stack_cfg as make_cfg
from tests.helpers.placements import PLACEMENTS, assert_matches_reference, decoder_of
from tests.unit import reference


def check_against_reference(cfg):
    decoder = decoder_of(cfg)
    assert_matches_reference(cfg, decoder)
    return decoder


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_matches_reference(mcore, placement, moe, norm):
    decoder = check_against_reference(make_cfg(placement, moe, norm))
    assert (decoder.final_layernorm is not None) == reference.FINAL_NORM[placement]


@pytest.mark.parametrize(
    "switches",
    [
        ("model.norm.span_include_attn_term=true",),
        ("model.norm.span_include_y_term=true",),
        ("model.norm.span_residual_alpha=1.7",),
        (
            "model.norm.span_include_attn_term=true",
            "model.norm.span_include_y_term=true",
            "model.norm.span_residual_alpha=0.5",
        ),
    ],
)
def test_spannorm_switches_match_reference(mcore, switches):
    check_against_reference(make_cfg("spannorm", extra=switches))


def test_mixln_alpha_switch(mcore):
    # alpha=0.75 with L=4: layers 1-3 Post-LN, layer 4 Pre-LN.
    decoder = check_against_reference(make_cfg("mixln", extra=("model.norm.mixln_alpha=0.75",)))
    kinds = ["post" if layer.plan.post_attn_norm else "pre" for layer in decoder.layers]
    assert kinds == ["post", "post", "post", "pre"]


def test_final_norm_override(mcore):
    built = build_model(make_cfg("spannorm", extra=("model.norm.final_norm=true",)), vocab_size=64)
    assert built.chunks[0].decoder.final_layernorm is not None


def test_dropout_runs_through_fused_bda(mcore):
    """With dropout on, outputs differ between two train-mode calls but not in eval mode."""
    cfg = make_cfg("b2t", extra=("model.hidden_dropout=0.5",))
    decoder = build_model(cfg, vocab_size=64).chunks[0].decoder
    x = torch.randn(8, 2, 64)
    decoder.train()
    a, b = decoder(hidden_states=x, attention_mask=None), decoder(hidden_states=x, attention_mask=None)
    assert not torch.equal(a, b)
    decoder.eval()
    with torch.no_grad():
        c, d = decoder(hidden_states=x, attention_mask=None), decoder(hidden_states=x, attention_mask=None)
    assert torch.equal(c, d)
    assert math.isfinite(c.sum().item())


def test_every_placement_module_registers_a_placement():
    """Discovery: each file in megaspan/norms/placements registers at least one placement."""
    import pkgutil

    from megaspan.norms import placements

    modules = {info.name for info in pkgutil.iter_modules(placements.__path__)}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in available().values()} == modules


def test_slot_table_drives_submodules_and_layer(mcore):
    """Every row of SLOTS is a submodule field and a layer attribute (peri uses four of them)."""
    import dataclasses

    from megaspan.norms import SLOTS
    from megaspan.norms.layer import NormPlacementSubmodules

    assert {s.module for s in SLOTS} <= {f.name for f in dataclasses.fields(NormPlacementSubmodules)}
    layer = build_model(make_cfg("peri"), vocab_size=64).chunks[0].decoder.layers[0]
    for slot in SLOTS:
        on = getattr(layer.plan, slot.flag)
        assert (type(getattr(layer, slot.module)).__name__ == "SPNorm") == on, slot.module
