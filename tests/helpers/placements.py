"""Compare a built decoder stack with the independent reference (tests/unit/reference.py)."""

from __future__ import annotations

import torch

from megaspan.models import build_model
from megaspan.norms import available
from tests.helpers.models import NUM_LAYERS
from tests.unit import reference

HIDDEN = 64
PLACEMENTS = list(available())


def _grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)


def decoder_of(cfg):
    return build_model(cfg, vocab_size=64).chunks[0].decoder


def run(decoder, seed: int = 0):
    """Output and gradients (input first, then every trainable parameter) of ``decoder``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 2, HIDDEN, generator=g, requires_grad=True)  # [s, b, h]
    probe = torch.randn(8, 2, HIDDEN, generator=g)
    params = [p for p in decoder.parameters() if p.requires_grad]
    out = decoder(hidden_states=x, attention_mask=None)
    return x, probe, params, out, _grads(out, [x, *params], probe)


def assert_matches_reference(cfg, decoder) -> None:
    """Output and all gradients of ``decoder`` equal the reference stack's on the same weights."""
    decoder.train()
    x, probe, params, out, grads = run(decoder)
    m = cfg.model
    ref = reference.stack(
        m.norm_placement, decoder, x, NUM_LAYERS, m.normalization, m.layernorm_epsilon, m.norm, m.qk_layernorm
    )
    ref_grads = _grads(ref, [x, *params], probe)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    names = ["input"] + [n for n, p in decoder.named_parameters() if p.requires_grad]
    # Some gradients are mathematically zero (e.g. a key-norm bias: softmax is shift-invariant),
    # so the absolute tolerance is relative to the largest gradient, not to each tensor's own.
    scale = max(b.abs().max().item() for b in ref_grads if b is not None)
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=name)
