"""Per-layer diagnostics on real models: the numbers reflect each placement's stream."""

from __future__ import annotations

import pytest
import torch

from megaspan.models import build_model
from megaspan.runtime import device
from megaspan.training.diagnostics import LayerDiagnostics, token_cosine
from tests.unit.test_placements import L, make_cfg


def run_step(placement, armed_step=10, interval=5, extra=()):
    built = build_model(make_cfg(placement, extra=extra), vocab_size=64)
    model = built.chunks[0]
    diag = LayerDiagnostics(built.chunks, L, interval)
    assert diag.arm(armed_step)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    model.train()
    model(tokens, pos, None, labels=tokens).mean().backward()
    return diag.collect(device()), diag


def test_keys_and_grad_norms(mcore):
    values, _ = run_step("pre")
    assert len(values) == 4 * L
    for l in range(1, L + 1):
        assert values[f"diag/grad_attn/layer_{l:03d}"] > 0
        assert values[f"diag/grad_mlp/layer_{l:03d}"] > 0
        assert -1.0 <= values[f"diag/token_cos/layer_{l:03d}"] <= 1.0


@pytest.mark.parametrize("placement", ["post", "b2t", "spannorm", "deepnorm"])
def test_post_norm_stream_has_unit_rms(mcore, placement):
    """RMSNorm with unit gain at init: every layer's output has RMS 1 (exactly, once eps cannot
    matter: SpanNorm's block 0 normalizes the small raw embedding plus a small branch)."""
    values, _ = run_step(placement, extra=("model.layernorm_epsilon=1e-12",))
    for l in range(1, L + 1):
        assert values[f"diag/rms/layer_{l:03d}"] == pytest.approx(1.0, rel=1e-4)


def test_pre_norm_stream_is_not_normalized(mcore):
    values, _ = run_step("pre")
    assert all(abs(values[f"diag/rms/layer_{l:03d}"] - 1.0) > 1e-2 for l in range(1, L + 1))


def test_not_armed_records_nothing(mcore):
    built = build_model(make_cfg("pre"), vocab_size=64)
    diag = LayerDiagnostics(built.chunks, L, interval=5)
    assert not diag.arm(3)
    tokens = torch.zeros(2, 8, dtype=torch.long)
    built.chunks[0](tokens, torch.arange(8).unsqueeze(0).expand(2, -1), None)
    assert diag._acts == {}


def test_token_cosine_extremes():
    same = torch.ones(16, 1, 8)
    assert token_cosine(same) == pytest.approx(1.0)
    ortho = torch.eye(8).unsqueeze(1)
    assert token_cosine(ortho) == pytest.approx(0.0, abs=1e-6)
