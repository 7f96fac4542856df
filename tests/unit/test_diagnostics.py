"""Per-layer diagnostics on real models: the numbers reflect each placement's stream."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megaspan.models import build_model
from megaspan.runtime import device
from megaspan.training.diagnostics import LayerDiagnostics, angular_distance, token_cosine, write_record
from tests.helpers.models import NUM_LAYERS as L
from tests.helpers.models import stack_cfg as make_cfg


def run_step(placement, armed_step=10, interval=5, extra=(), moe=False, capture=None):
    built = build_model(make_cfg(placement, moe=moe, extra=extra), vocab_size=64)
    model = built.chunks[0]
    diag = LayerDiagnostics(built.chunks, L, interval)
    if capture is not None:
        capture["model"] = model

        def keep(mod, args, kwargs, out) -> None:  # returns None: the output is left alone
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            y = out[0] if isinstance(out, tuple) else out
            capture.setdefault(mod.layer_number, (x_in.detach().clone(), y.detach().clone()))

        for layer in diag.layers:
            # Registered after the diagnostics' own hooks: sees the same (first) forward.
            layer.register_forward_hook(keep, with_kwargs=True)
    assert diag.arm(armed_step)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    model.train()
    model(tokens, pos, None, labels=tokens).mean().backward()
    return diag.collect(device()), diag


def test_keys_and_grad_norms(mcore):
    values, _ = run_step("pre")
    # rms, token_cos, angular_distance, max_abs, grad_attn, grad_mlp, attn_max_logit, attn_entropy
    # per layer, and the model's lm_head_log_z
    assert len(values) == 8 * L + 1
    for layer in range(1, L + 1):
        assert values[f"diag/grad_attn/layer_{layer:03d}"] > 0
        assert values[f"diag/grad_mlp/layer_{layer:03d}"] > 0
        assert -1.0 <= values[f"diag/token_cos/layer_{layer:03d}"] <= 1.0


@pytest.mark.parametrize("placement", ["post", "b2t", "spannorm", "deepnorm"])
def test_post_norm_stream_has_unit_rms(mcore, placement):
    """RMSNorm with unit gain at init: every layer's output has RMS 1 (exactly, once eps cannot
    matter: SpanNorm's block 0 normalizes the small raw embedding plus a small branch)."""
    values, _ = run_step(placement, extra=("model.layernorm_epsilon=1e-12",))
    for layer in range(1, L + 1):
        assert values[f"diag/rms/layer_{layer:03d}"] == pytest.approx(1.0, rel=1e-4)


def test_pre_norm_stream_is_not_normalized(mcore):
    values, _ = run_step("pre")
    assert all(abs(values[f"diag/rms/layer_{layer:03d}"] - 1.0) > 1e-2 for layer in range(1, L + 1))


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


def _direct_angle(x, y):
    """Hand computation, token by token: arccos of the cosine, over pi, averaged."""
    angles = []
    for t in range(x.shape[0]):
        for b in range(x.shape[1]):
            u, v = x[t, b].double(), y[t, b].double()
            cos = float(u @ v / (u.norm() * v.norm()))
            angles.append(math.acos(max(-1.0, min(1.0, cos))) / math.pi)
    return sum(angles) / len(angles)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_angular_distance_max_abs_and_grads_match_direct_computation(mcore, placement):
    capture = {}
    values, diag = run_step(placement, capture=capture)
    for layer in diag.layers:
        n_ = layer.layer_number
        x, y = capture[n_]
        assert values[f"diag/angular_distance/layer_{n_:03d}"] == pytest.approx(_direct_angle(x, y), abs=1e-5)
        assert values[f"diag/max_abs/layer_{n_:03d}"] == pytest.approx(float(y.abs().max()), rel=1e-6)
        assert values[f"diag/rms/layer_{n_:03d}"] == pytest.approx(float(y.pow(2).mean().sqrt()), rel=1e-6)
        attn = sum(
            float(p.grad.pow(2).sum())
            for n, p in layer.named_parameters()
            if n.startswith("self_attention.") and p.grad is not None
        )
        mlp = sum(
            float(p.grad.pow(2).sum())
            for n, p in layer.named_parameters()
            if n.startswith("mlp.") and p.grad is not None
        )
        assert values[f"diag/grad_attn/layer_{n_:03d}"] == pytest.approx(math.sqrt(attn), rel=1e-6)
        assert values[f"diag/grad_mlp/layer_{n_:03d}"] == pytest.approx(math.sqrt(mlp), rel=1e-6)
        row = diag.record[n_]
        assert row["angular_distance"] == values[f"diag/angular_distance/layer_{n_:03d}"]
        assert row["attn_grad_norm"] == values[f"diag/grad_attn/layer_{n_:03d}"]
    assert 0.0 <= min(diag.record[n_]["angular_distance"] for n_ in diag.record) <= 1.0


def test_angular_distance_extremes():
    x = torch.randn(4, 2, 8)
    assert angular_distance(x, 3.0 * x) == pytest.approx(0.0, abs=1e-3)
    assert angular_distance(x, -x) == pytest.approx(1.0, abs=1e-3)


def test_update_ratio_matches_direct_computation(mcore):
    _, diag = run_step("spannorm")
    diag.snapshot_weights()
    before, changed = {}, {}
    g = torch.Generator().manual_seed(1)
    for layer in diag.layers:
        for name, p in layer.named_parameters():
            before[(layer.layer_number, name)] = p.detach().clone()
            with torch.no_grad():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))  # an "optimizer step"
            changed[(layer.layer_number, name)] = p.detach().clone()
    values = diag.update_ratios(device())
    for layer in diag.layers:
        n_ = layer.layer_number
        for prefix, tag in (("self_attention.", "update_attn"), ("mlp.", "update_mlp")):
            keys = [(n_, n) for n, p in layer.named_parameters() if n.startswith(prefix) and p.dim() >= 2]
            delta = math.sqrt(sum(float((changed[k] - before[k]).pow(2).sum()) for k in keys))
            weight = math.sqrt(sum(float(before[k].pow(2).sum()) for k in keys))
            assert values[f"diag/{tag}/layer_{n_:03d}"] == pytest.approx(delta / weight, rel=1e-5)
        assert diag.record[n_]["attn_update_ratio"] == values[f"diag/update_attn/layer_{n_:03d}"]


def test_moe_load_cv_and_router_entropy(mcore):
    routers = {}
    values, diag = run_step("pre", moe=True)
    # Direct: re-run the routers on their recorded inputs.
    built_layers = diag.layers
    for layer in built_layers:
        for module in layer.modules():
            if type(module).__name__.endswith("Router"):
                routers[layer.layer_number] = module
    assert diag.num_experts == 4 and set(routers) == set(range(1, L + 1))
    tokens = 2 * 8
    for n_ in range(1, L + 1):
        row = diag.record[n_]
        load = row["moe_tokens_per_expert"]
        assert len(load) == 4 and sum(load) == tokens * 2  # top-2: every token counted twice
        mean = sum(load) / 4
        cv = math.sqrt(sum((x - mean) ** 2 for x in load) / 4) / mean
        assert row["moe_load_cv"] == pytest.approx(cv)
        assert 0.0 < row["moe_router_entropy"] <= math.log(4) + 1e-6
        assert values[f"diag/moe_load_cv/layer_{n_:03d}"] == row["moe_load_cv"]


def test_moe_router_entropy_direct(mcore):
    built = build_model(make_cfg("pre", moe=True), vocab_size=64)
    diag = LayerDiagnostics(built.chunks, L, 1)
    seen = {}

    def keep(n):
        def hook(mod, args, out) -> None:  # returns None: the routing is left alone
            seen.setdefault(n, (args[0].detach(), out))

        return hook

    for layer in diag.layers:
        for module in layer.modules():
            if type(module).__name__.endswith("Router"):
                module.register_forward_hook(keep(layer.layer_number))
    diag.arm(1)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model = built.chunks[0]
    model.train()
    model(tokens, torch.arange(8).unsqueeze(0).expand(2, -1), None, labels=tokens).mean().backward()
    diag.collect(device())
    for layer in diag.layers:
        n_ = layer.layer_number
        x, (probs, routing_map) = seen[n_]
        router = next(m for m in layer.modules() if type(m).__name__.endswith("Router"))
        logits = x.reshape(-1, x.shape[-1]).double() @ router.weight.double().t()
        p = torch.softmax(logits, -1)
        entropy = float(-(p * p.log()).sum(-1).mean())
        assert diag.record[n_]["moe_router_entropy"] == pytest.approx(entropy, rel=1e-5)
        assert diag.record[n_]["moe_tokens_per_expert"] == [float(v) for v in routing_map.sum(0)]


def test_jsonl_record(tmp_path):
    write_record(tmp_path, 5, {1: {"rms": 1.0, "angular_distance": float("nan")}, 2: {"rms": 2.0}})
    write_record(tmp_path, 10, {1: {"rms": 1.5, "moe_tokens_per_expert": [1.0, float("inf")]}})
    lines = (tmp_path / "diagnostics.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first == {"step": 5, "layers": {"1": {"rms": 1.0, "angular_distance": None}, "2": {"rms": 2.0}}}
    assert second["layers"]["1"]["moe_tokens_per_expert"] == [1.0, None]
