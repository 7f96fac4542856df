"""Placement behaviour under model options the reference tests leave at their defaults.

* ``model.add_bias_linear=true``: the linear layers' biases (zero at init, so set to random values
  here) reach the residual stream exactly as in the reference, for every placement; a placement
  that drops the bias of ``(out, bias)`` (as Peri-LN and SpanNorm handle it themselves) fails.
* Activation recompute (full/uniform, full/block, selective) changes neither outputs nor
  gradients of any placement.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megaspan.norms import available
from tests.helpers.models import tiny_cfg
from tests.helpers.placements import assert_matches_reference, decoder_of

PLACEMENTS = list(available())


def _randomize_linear_biases(decoder, seed: int = 1) -> int:
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith(".bias") and "linear" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
                count += 1
    return count


# Dense only: with MoE, Megatron-Core 0.19.2's SequentialMLP expert bias path raises on CPU
# ("Output 0 of _ReduceFromModelParallelRegion is a view and is being modified inplace").
# SpanNorm's switches add terms that carry a bias of their own (the attention output term):
# every switch combination, as in test_placements.py's switch test.
SPAN_SWITCHES = {
    "spannorm-attn": ("model.norm.span_include_attn_term=true",),
    "spannorm-y": ("model.norm.span_include_y_term=true",),
    "spannorm-attn-y-alpha": (
        "model.norm.span_include_attn_term=true",
        "model.norm.span_include_y_term=true",
        "model.norm.span_residual_alpha=0.5",
    ),
}
BIAS_CASES = [(p, ()) for p in PLACEMENTS] + [("spannorm", s) for s in SPAN_SWITCHES.values()]


@pytest.mark.parametrize("placement,switches", BIAS_CASES, ids=PLACEMENTS + list(SPAN_SWITCHES))
def test_linear_biases_match_reference(mcore, placement, switches):
    cfg = tiny_cfg(placement, seq_length=8, extra=("model.add_bias_linear=true", *switches))
    decoder = decoder_of(cfg)
    # Every layer has QKV, output-projection and two FFN biases.
    assert _randomize_linear_biases(decoder) == 4 * len(decoder.layers)
    assert_matches_reference(cfg, decoder)


RECOMPUTE = {
    "full-uniform": (
        "parallel.recompute_granularity=full",
        "parallel.recompute_method=uniform",
        "parallel.recompute_num_layers=1",
    ),
    "full-block": (
        "parallel.recompute_granularity=full",
        "parallel.recompute_method=block",
        "parallel.recompute_num_layers=2",
    ),
    "selective": ("parallel.recompute_granularity=selective",),
}


# Forward calls per layer during one forward + backward (4 layers), as the switch promises:
# full/uniform x1 recomputes every layer, full/block x2 the first two of the stage, selective
# only the core attention (counted on core_attention instead of the layer).
RECOMPUTED_CALLS = {
    "full-uniform": [2, 2, 2, 2],
    "full-block": [2, 2, 1, 1],
    "selective": [2, 2, 2, 2],
}


@contextlib.contextmanager
def _count_calls(decoder):
    """Forward calls of each layer (full recompute) or each layer's core attention (selective)."""
    selective = decoder.config.recompute_granularity == "selective"
    modules = [layer.self_attention.core_attention if selective else layer for layer in decoder.layers]
    calls = [0] * len(modules)

    def counter(i):
        def hook(module, args, output):
            calls[i] += 1

        return hook

    handles = [m.register_forward_hook(counter(i)) for i, m in enumerate(modules)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _output_and_grads(decoder):
    """Output and parameter gradients through ``.backward()`` (checkpointing refuses ``.grad()``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 64, generator=g, requires_grad=True)  # [s, b, h]
    probe = torch.randn(8, 2, 64, generator=g)
    out = decoder(hidden_states=x, attention_mask=None)
    (out * probe).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in decoder.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_recompute_changes_nothing(mcore, placement, recompute):
    plain = decoder_of(tiny_cfg(placement, seq_length=8)).train()
    recomputed = decoder_of(tiny_cfg(placement, seq_length=8, extra=RECOMPUTE[recompute])).train()
    recomputed.load_state_dict(plain.state_dict())
    out, x_grad, grads = _output_and_grads(plain)
    # Not vacuous: the recomputed modules really run twice (forward, then again in backward).
    with _count_calls(recomputed) as calls:
        out_r, x_grad_r, grads_r = _output_and_grads(recomputed)
    assert calls == RECOMPUTED_CALLS[recompute], calls
    torch.testing.assert_close(out_r, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_grad_r, x_grad, rtol=1e-5, atol=1e-6)
    assert grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (grads_r[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-6, msg=name)
