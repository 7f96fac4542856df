"""Independent plain-PyTorch reference of every placement's block equations.

Written from the equations in docs/placements.md, NOT from megaspan's layer code (nothing from
megaspan.norms is imported). It uses the built Megatron layer only for:
* its parameters (norm gains/biases, QKV/proj weights), read by slot name;
* the attention and MLP/MoE submodules as black boxes - except for HybridNorm, whose Q/K/V
  norms are part of the placement, so its attention is re-implemented here from the weights.

Shapes: ``[s, b, h]`` as in Megatron.
"""

from __future__ import annotations

import math

import torch


def norm(x, module, kind: str, eps: float):
    """LayerNorm / RMSNorm by their definitions, with the module's own gain (and bias)."""
    w = module.weight
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * w + module.bias


def attn(layer, x):
    out, bias = layer.self_attention(x, attention_mask=None)
    return out if bias is None else out + bias


def mlp(layer, x):
    out, bias = layer.mlp(x)
    return out if bias is None else out + bias


def qkv_norm_attention(layer, x, kind: str, eps: float):
    """softmax(N(Q) N(K)^T / sqrt(d)) N(V), causal, from the fused QKV weight (single rank)."""
    sa = layer.self_attention
    cfg = sa.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hn = cfg.kv_channels
    s, b, _ = x.shape
    qkv = x @ sa.linear_qkv.weight.t()  # [s, b, groups * (heads/groups + 2) * hn]
    if sa.linear_qkv.bias is not None:  # model.add_bias_linear=true
        qkv = qkv + sa.linear_qkv.bias
    qkv = qkv.view(s, b, groups, (heads // groups + 2) * hn)
    q, k, v = torch.split(qkv, [heads // groups * hn, hn, hn], dim=-1)
    q = q.reshape(s, b, heads, hn)
    q = norm(q, sa.q_layernorm, kind, eps)
    k = norm(k, sa.k_layernorm, kind, eps)
    v = norm(v, sa.v_layernorm, kind, eps)
    rep = heads // groups
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    # [b, heads, s, hn]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hn)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    ctx = (probs @ v).permute(2, 0, 1, 3).reshape(s, b, heads * hn)
    out = ctx @ sa.linear_proj.weight.t()
    return out if sa.linear_proj.bias is None else out + sa.linear_proj.bias


def block(name: str, layer, x, l: int, L: int, kind: str, eps: float, opts):  # noqa: E741 - the papers write l
    """One block x_l -> x_{l+1} of placement ``name``; ``l`` is the global 1-based index."""
    N = lambda slot, t: norm(t, getattr(layer, slot), kind, eps)  # noqa: E731
    if name == "pre":
        y = x + attn(layer, N("input_layernorm", x))
        return y + mlp(layer, N("pre_mlp_layernorm", y))
    if name == "post":
        y = N("post_attn_norm", x + attn(layer, x))
        return N("post_mlp_norm", y + mlp(layer, y))
    if name == "b2t":
        y = N("post_attn_norm", x + attn(layer, x))
        return N("post_mlp_norm", x + y + mlp(layer, y))
    if name == "spannorm":
        a_in = N("input_layernorm", x) if l == 1 else x
        a = attn(layer, a_in)
        alpha = opts.span_residual_alpha
        y = N("post_attn_norm", alpha * x + a)
        skip = alpha * x
        if opts.span_include_y_term:
            skip = skip + y
        if opts.span_include_attn_term:
            skip = skip + a
        return N("post_mlp_norm", skip + mlp(layer, y))
    if name == "deepnorm":
        alpha = (2 * L) ** 0.25
        y = N("post_attn_norm", alpha * x + attn(layer, x))
        return N("post_mlp_norm", alpha * y + mlp(layer, y))
    if name == "mixln":
        return block(
            "post" if l <= math.floor(opts.mixln_alpha * L) else "pre", layer, x, l, L, kind, eps, opts
        )
    if name == "peri":
        y = x + N("attn_out_norm", attn(layer, N("input_layernorm", x)))
        return y + N("mlp_out_norm", mlp(layer, N("pre_mlp_layernorm", y)))
    if name == "lns":
        s = 1.0 / math.sqrt(l)
        y = x + attn(layer, N("input_layernorm", x) * s)
        return y + mlp(layer, N("pre_mlp_layernorm", y) * s)
    if name in ("hybridnorm", "hybridnorm_star"):
        if name == "hybridnorm_star" and l == 1:
            y = x + qkv_norm_attention(layer, N("input_layernorm", x), kind, eps)
            return y + mlp(layer, N("pre_mlp_layernorm", y))
        y = x + qkv_norm_attention(layer, x, kind, eps)
        z = N("pre_mlp_layernorm", y)
        return z + mlp(layer, z)
    raise KeyError(name)


# Final norm before the LM head, per docs/placements.md (summary table).
FINAL_NORM = {
    "pre": True,
    "lns": True,
    "mixln": True,
    "peri": True,
    "hybridnorm": True,
    "hybridnorm_star": True,
    "post": False,
    "deepnorm": False,
    "b2t": False,
    "spannorm": False,
}


def stack(name: str, decoder, x, L: int, kind: str, eps: float, opts):
    for layer in decoder.layers:
        x = block(name, layer, x, layer.layer_number, L, kind, eps, opts)
    if FINAL_NORM[name]:
        x = norm(x, decoder.final_layernorm, kind, eps)
    return x
