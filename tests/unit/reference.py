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


def causal_attention(layer, x, kind: str, eps: float, *, qk_norm: bool, v_norm: bool = False, stats=False):
    """softmax(Q K^T / sqrt(d)) V, causal, from the fused QKV weight (single rank); with
    ``qk_norm`` Q and K are normalised per head first (QK-norm: Dehghani et al. 2023; Megatron's
    ``qk_layernorm``), with ``v_norm`` V too (HybridNorm). ``stats``: also the logits (masked
    entries -inf) and the probabilities, [b, heads, s, s]."""
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
    if qk_norm:
        q = norm(q, sa.q_layernorm, kind, eps)
        k = norm(k, sa.k_layernorm, kind, eps)
    if v_norm:
        v = norm(v, sa.v_layernorm, kind, eps)
    rep = heads // groups
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    # [b, heads, s, hn]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hn)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    logits = scores.masked_fill(mask, float("-inf"))
    probs = logits.softmax(-1)
    ctx = (probs @ v).permute(2, 0, 1, 3).reshape(s, b, heads * hn)
    out = ctx @ sa.linear_proj.weight.t()
    out = out if sa.linear_proj.bias is None else out + sa.linear_proj.bias
    return (out, logits, probs) if stats else out


def qkv_norm_attention(layer, x, kind: str, eps: float):
    """softmax(N(Q) N(K)^T / sqrt(d)) N(V), causal (HybridNorm's attention)."""
    return causal_attention(layer, x, kind, eps, qk_norm=True, v_norm=True)


def attention_max_logit_and_entropy(logits, probs) -> tuple[float, float]:
    """Max over heads and allowed (query, key) pairs of the logit; mean over batch, heads and
    queries of -sum_k p log p (nats). [b, heads, s, s] each, masked logits -inf."""
    entropy = -(probs * torch.where(probs > 0, probs.log(), torch.zeros_like(probs))).sum(-1)
    return float(logits.max()), float(entropy.mean())


def log_z(logits):
    """log Z = logsumexp over the vocabulary (last dim), per token."""
    return torch.logsumexp(logits.double(), dim=-1)


def z_loss(logits, loss_mask, coeff: float):
    """PaLM's auxiliary z-loss: coeff * log(Z)^2 per token, averaged over the loss-masked tokens
    like the cross entropy. ``logits`` [b, s, V], ``loss_mask`` [b, s]."""
    mask = loss_mask.double()
    return coeff * (log_z(logits).pow(2) * mask).sum() / mask.sum()


def relative_update(f_t, f_0) -> float:
    """DeepNet's model update ||f(x; theta_t) - f(x; theta_0)|| / ||f(x; theta_0)|| (Frobenius)."""
    return float((f_t.double() - f_0.double()).norm() / f_0.double().norm())


def block(name: str, layer, x, l: int, L: int, kind: str, eps: float, opts, qk_norm: bool = False):  # noqa: E741 - the papers write l
    """One block x_l -> x_{l+1} of placement ``name``; ``l`` is the global 1-based index.
    ``qk_norm`` (``model.qk_layernorm``): every attention normalises Q and K per head; HybridNorm's
    attention already does (and V too), so there it changes nothing."""
    N = lambda slot, t: norm(t, getattr(layer, slot), kind, eps)  # noqa: E731

    def att(layer, t):
        return causal_attention(layer, t, kind, eps, qk_norm=True) if qk_norm else attn(layer, t)

    if name == "pre":
        y = x + att(layer, N("input_layernorm", x))
        return y + mlp(layer, N("pre_mlp_layernorm", y))
    if name == "post":
        y = N("post_attn_norm", x + att(layer, x))
        return N("post_mlp_norm", y + mlp(layer, y))
    if name == "b2t":
        y = N("post_attn_norm", x + att(layer, x))
        return N("post_mlp_norm", x + y + mlp(layer, y))
    if name == "spannorm":
        a_in = N("input_layernorm", x) if l == 1 else x
        a = att(layer, a_in)
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
        y = N("post_attn_norm", alpha * x + att(layer, x))
        return N("post_mlp_norm", alpha * y + mlp(layer, y))
    if name == "mixln":
        return block(
            "post" if l <= math.floor(opts.mixln_alpha * L) else "pre",
            layer,
            x,
            l,
            L,
            kind,
            eps,
            opts,
            qk_norm,
        )
    if name == "peri":
        y = x + N("attn_out_norm", att(layer, N("input_layernorm", x)))
        return y + N("mlp_out_norm", mlp(layer, N("pre_mlp_layernorm", y)))
    if name == "lns":
        s = 1.0 / math.sqrt(l)
        y = x + att(layer, N("input_layernorm", x) * s)
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


def stack(name: str, decoder, x, L: int, kind: str, eps: float, opts, qk_norm: bool = False):
    for layer in decoder.layers:
        x = block(name, layer, x, layer.layer_number, L, kind, eps, opts, qk_norm)
    if FINAL_NORM[name]:
        x = norm(x, decoder.final_layernorm, kind, eps)
    return x
