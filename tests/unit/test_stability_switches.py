"""The stability switches independent of the placement (issue 18.4) against the reference:
``model.qk_layernorm`` (per-head Q/K norms; tests/unit/reference.py's ``causal_attention``) on every
placement, and ``training.z_loss`` (PaLM's coeff x log(Z)^2, ``reference.z_loss``) through the
trainer's own loss function."""

from __future__ import annotations

import pytest
import torch

from megaspan.models import build_model
from megaspan.training.trainer import loss_func
from megaspan.training.zloss import ZLoss
from tests.helpers.models import stack_cfg
from tests.helpers.placements import PLACEMENTS, assert_matches_reference
from tests.unit import reference

QKV_NORM = ("hybridnorm", "hybridnorm_star")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_qk_layernorm_matches_reference(mcore, placement):
    cfg = stack_cfg(placement, extra=("model.qk_layernorm=true",))
    decoder = build_model(cfg, vocab_size=64).chunks[0].decoder
    g = torch.Generator().manual_seed(3)
    for layer in decoder.layers:
        sa = layer.self_attention
        assert sa.q_layernorm is not None and sa.k_layernorm is not None  # the switch built them
        with torch.no_grad():  # gains away from 1: the reference must apply them, not just normalise
            for norm in (sa.q_layernorm, sa.k_layernorm):
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    assert_matches_reference(cfg, decoder)


@pytest.mark.parametrize("placement", QKV_NORM)
def test_qk_layernorm_composes_with_hybridnorm_as_the_same_norms(mcore, placement):
    """HybridNorm already normalises Q and K (and V): the switch adds no second pair of norms."""
    names = {}
    for flag in ("false", "true"):
        model = build_model(stack_cfg(placement, extra=(f"model.qk_layernorm={flag}",)), vocab_size=64)
        names[flag] = [n for n, _ in model.chunks[0].named_parameters()]
    assert names["true"] == names["false"]
    assert any("q_layernorm" in n for n in names["true"]) and any("v_layernorm" in n for n in names["true"])


def test_qk_layernorm_off_builds_no_qk_norms(mcore):
    model = build_model(stack_cfg("pre"), vocab_size=64)
    assert all(layer.self_attention.q_layernorm is None for layer in model.chunks[0].decoder.layers)


@pytest.mark.parametrize("coeff", [1e-4, 0.1])
def test_z_loss_matches_reference(mcore, coeff):
    """loss_func with the z-loss = sum over masked tokens of CE + coeff * logZ^2 (the reference's
    numbers, in value and in every gradient); the reported loss stays the plain cross entropy."""
    model = build_model(stack_cfg("pre"), vocab_size=64).chunks[0]
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 8), generator=g)
    labels = torch.randint(0, 64, (2, 8), generator=g)
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0  # masked tokens get neither loss
    params = [p for p in model.parameters() if p.requires_grad]

    z = ZLoss([model], coeff)
    z.start()
    loss, count, report = loss_func(mask, model(tokens, pos, None, labels=labels), z_loss=z)
    grads = torch.autograd.grad(loss, params)
    z.remove()

    logits = model(tokens, pos, None)  # [b, s, V], the same weights, no z-loss hook any more
    v = logits.shape[-1]  # the padded vocabulary (128), as the model's cross entropy sees it
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, v).double(), labels.reshape(-1), reduction="none"
    )
    ce_sum = (ce * mask.reshape(-1).double()).sum()
    want = ce_sum + reference.z_loss(logits, mask, coeff) * mask.sum()
    want_grads = torch.autograd.grad(want, params)

    assert int(count) == 13
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(report["lm loss"][0]) == pytest.approx(float(ce_sum), rel=1e-6)  # logged: CE only
    assert float(want - ce_sum) > coeff * 13 * 4.0**2  # log Z ~ log 128 > 4: the term is not ~0
    scale = max(float(w.abs().max()) for w in want_grads)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6 * scale)


def test_z_loss_off_by_default_and_validated():
    from megaspan.config import load_config

    assert load_config(None, []).training.z_loss == 0.0
    assert load_config(None, ["training.z_loss=1e-4"]).training.z_loss == 1e-4
