"""Hugging Face ``transformers`` model for megaspan checkpoints: every norm placement.

This file is shipped inside each ``megaspan export`` folder and loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; it imports only torch and
transformers. Parameter names are Megatron-Core's (``decoder.layers.N.self_attention.linear_qkv``
...), so the exported weights are megaspan's state dict as it is.

One block, ``x -> x'``, per ``config.norm_placement`` (N = the norm in the named slot,
A = attention, F = MLP, l = 1-based layer index, L = num_layers):

    pre              y = x + A(N_in x);                 x' = y + F(N_mlp y)
    post             y = N_pa(x + A x);                 x' = N_pm(y + F y)
    b2t              y = N_pa(x + A x);                 x' = N_pm(x + y + F y)
    spannorm         a = A(l == 1 ? N_in x : x); y = N_pa(s x + a);
                     x' = N_pm(s x [+ y] [+ a] + F y)   s = span_residual_alpha
    deepnorm         y = N_pa(a x + A x);               x' = N_pm(a y + F y), a = (2L)^(1/4)
    mixln            post for l <= floor(mixln_alpha L), pre after
    peri             y = x + N_ao(A(N_in x));           x' = y + N_mo(F(N_mlp y))
    lns              y = x + A(N_in(x) / sqrt l);       x' = y + F(N_mlp(y) / sqrt l)
    hybridnorm       y = x + A_qkvnorm(x);              z = N_mlp y; x' = z + F z
    hybridnorm_star  as hybridnorm, but block 1 is pre with A_qkvnorm

A_qkvnorm normalizes Q, K and V per head (before RoPE); ``qk_layernorm`` adds per-head Q and K
norms to every placement's attention. A final norm runs before the LM head when the checkpoint has
one (``decoder.final_layernorm``).

Mixture of experts (``num_moe_experts``): in the blocks ``moe_layers`` marks, F is Megatron-Core's
``MoELayer`` as megaspan trains it. The router scores the token, ``logits = W_r x (+ b_r)``; the top
``moe_router_topk`` logits are softmaxed among themselves into weights p_e, and

    F(x) = sum over the chosen experts e of p_e * E_e(x)  [+ S(x), the shared expert]

where every expert E_e (and S) is an MLP like the dense one. No expert capacity: no token is
dropped, so each token's output depends on that token only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class MegaspanConfig(PretrainedConfig):
    model_type = "megaspan"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_attention_heads: int = 4,
        num_query_groups: int | None = None,
        kv_channels: int | None = None,
        ffn_hidden_size: int = 256,
        max_position_embeddings: int = 2048,
        position_embedding_type: str = "rope",
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        normalization: str = "RMSNorm",
        layernorm_epsilon: float = 1e-5,
        gated_linear_unit: bool = True,
        activation: str = "silu",
        add_bias_linear: bool = False,
        norm_placement: str = "pre",
        norm_options: dict | None = None,
        final_norm: bool = True,
        tie_word_embeddings: bool = True,
        qk_layernorm: bool = False,
        num_moe_experts: int | None = None,
        moe_router_topk: int = 2,
        moe_ffn_hidden_size: int | None = None,
        moe_shared_expert_intermediate_size: int | None = None,
        moe_layers: list[bool] | None = None,
        moe_router_dtype: str | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_hidden_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.num_query_groups = num_query_groups or num_attention_heads
        self.kv_channels = kv_channels or hidden_size // num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.normalization = normalization
        self.layernorm_epsilon = layernorm_epsilon
        self.gated_linear_unit = gated_linear_unit
        self.activation = activation
        self.add_bias_linear = add_bias_linear
        self.norm_placement = norm_placement
        self.norm_options = dict(norm_options or {})
        self.final_norm = final_norm
        self.qk_layernorm = qk_layernorm
        self.num_moe_experts = num_moe_experts
        self.moe_router_topk = moe_router_topk
        self.moe_ffn_hidden_size = moe_ffn_hidden_size or ffn_hidden_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        # Which blocks are MoE (the rest are dense); None = all of them when there are experts.
        self.moe_layers = list(moe_layers) if moe_layers is not None else [bool(num_moe_experts)] * num_layers
        # The router's precision: "fp32"/"fp64", or None for the model's dtype.
        self.moe_router_dtype = moe_router_dtype
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _norm(config: MegaspanConfig, size: int) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(size, eps=config.layernorm_epsilon)


# Which norm slots each placement's block l (1-based) owns.
def _slots(config: MegaspanConfig, layer: int) -> tuple[str, ...]:
    name, opts, L = config.norm_placement, config.norm_options, config.num_layers
    if name == "mixln":
        name = "post" if layer <= math.floor(opts.get("mixln_alpha", 0.25) * L) else "pre"
    return {
        "pre": ("input_layernorm", "pre_mlp_layernorm"),
        "lns": ("input_layernorm", "pre_mlp_layernorm"),
        "post": ("post_attn_norm", "post_mlp_norm"),
        "b2t": ("post_attn_norm", "post_mlp_norm"),
        "deepnorm": ("post_attn_norm", "post_mlp_norm"),
        "spannorm": (("input_layernorm",) if layer == 1 else ()) + ("post_attn_norm", "post_mlp_norm"),
        "peri": ("input_layernorm", "attn_out_norm", "pre_mlp_layernorm", "mlp_out_norm"),
        "hybridnorm": ("pre_mlp_layernorm",),
        "hybridnorm_star": (("input_layernorm",) if layer == 1 else ()) + ("pre_mlp_layernorm",),
    }[name]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SelfAttention(nn.Module):
    """Megatron's fused QKV: per query group, [its heads' Q rows; K rows; V rows]. Per-head norms:
    Q, K and V with ``qkv_norm`` (HybridNorm), Q and K with ``config.qk_layernorm``."""

    def __init__(self, config: MegaspanConfig, qkv_norm: bool) -> None:
        super().__init__()
        self.heads, self.groups, self.hn = (
            config.num_attention_heads,
            config.num_query_groups,
            config.kv_channels,
        )
        qkv_rows = self.groups * (self.heads // self.groups + 2) * self.hn
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_rows, bias=config.add_bias_linear)
        self.linear_proj = nn.Linear(self.heads * self.hn, config.hidden_size, bias=config.add_bias_linear)
        self.qk_norm = qkv_norm or config.qk_layernorm
        if self.qk_norm:
            self.q_layernorm = _norm(config, self.hn)
            self.k_layernorm = _norm(config, self.hn)
        if qkv_norm:
            self.v_layernorm = _norm(config, self.hn)
        self.qkv_norm = qkv_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        rep = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, (rep + 2) * self.hn)
        q, k, v = torch.split(qkv, [rep * self.hn, self.hn, self.hn], dim=-1)
        q = q.reshape(b, s, self.heads, self.hn)
        if self.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.qkv_norm:
            v = self.v_layernorm(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads or groups, s, hn]
        if rope is not None:
            cos, sin = rope
            rot = cos.shape[-1]
            q = torch.cat((q[..., :rot] * cos + _rotate_half(q[..., :rot]) * sin, q[..., rot:]), dim=-1)
            k = torch.cat((k[..., :rot] * cos + _rotate_half(k[..., :rot]) * sin, k[..., rot:]), dim=-1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.hn))
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.hn))


class MLP(nn.Module):
    """The dense MLP, and each expert of an MoE block with ``ffn_hidden_size`` = its width."""

    def __init__(self, config: MegaspanConfig, ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        ffn = ffn_hidden_size or config.ffn_hidden_size
        rows = ffn * (2 if config.gated_linear_unit else 1)
        self.linear_fc1 = nn.Linear(config.hidden_size, rows, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=config.add_bias_linear)
        self.gated = config.gated_linear_unit
        self.act = {"silu": F.silu, "gelu": F.gelu}[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:  # Megatron's glu: act(first half) * second half
            a, g = h.chunk(2, dim=-1)
            return self.linear_fc2(self.act(a) * g)
        return self.linear_fc2(self.act(h))


class Router(nn.Module):
    """Megatron-Core's ``TopKRouter`` at inference, as megaspan configures it: softmax scores taken
    after the top-k (the chosen logits are softmaxed among themselves, so the weights sum to 1), no
    expert bias, no score scaling, no capacity (no token is dropped)."""

    def __init__(self, config: MegaspanConfig) -> None:
        super().__init__()
        self.topk = config.moe_router_topk
        self.logit_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(config.moe_router_dtype)
        self.weight = nn.Parameter(torch.empty(config.num_moe_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_moe_experts)) if config.add_bias_linear else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [tokens, hidden] -> (weights, experts), both [tokens, topk]."""
        dtype = self.logit_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        logits = F.linear(x.to(dtype), self.weight.to(dtype), bias)
        top, experts = logits.topk(self.topk, dim=-1)
        return torch.softmax(top, dim=-1, dtype=torch.float32).to(dtype), experts


class Experts(nn.Module):
    """Megatron's ``SequentialMLP`` layout: ``local_experts.N`` is expert N."""

    def __init__(self, config: MegaspanConfig) -> None:
        super().__init__()
        self.local_experts = nn.ModuleList(
            MLP(config, config.moe_ffn_hidden_size) for _ in range(config.num_moe_experts)
        )


class MoE(nn.Module):
    """Megatron-Core's ``MoELayer``: each token's output is the router-weighted sum of its top-k
    experts' outputs, plus the shared expert's (``shared_experts``, when configured)."""

    def __init__(self, config: MegaspanConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = MLP(config, config.moe_shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # tokens are routed one by one
        weights, chosen = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts.local_experts):
            token, k = torch.where(chosen == e)  # the tokens that chose expert e, as their k-th
            if len(token):
                out.index_add_(0, token, (weights[token, k, None] * expert(x[token])).to(x.dtype))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, config: MegaspanConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.placement = config.norm_placement
        if self.placement == "mixln":
            post = layer <= math.floor(config.norm_options.get("mixln_alpha", 0.25) * config.num_layers)
            self.placement = "post" if post else "pre"
        self.self_attention = SelfAttention(config, self.placement.startswith("hybridnorm"))
        self.mlp = MoE(config) if config.moe_layers[layer - 1] else MLP(config)
        for slot in _slots(config, layer):
            setattr(self, slot, _norm(config, config.hidden_size))

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        name, opts, l = self.placement, self.config.norm_options, self.layer  # noqa: E741 - the papers' l
        A = lambda t: self.self_attention(t, rope)  # noqa: E731
        if name == "pre":
            y = x + A(self.input_layernorm(x))
            return y + self.mlp(self.pre_mlp_layernorm(y))
        if name == "lns":
            s = 1.0 / math.sqrt(l)
            y = x + A(self.input_layernorm(x) * s)
            return y + self.mlp(self.pre_mlp_layernorm(y) * s)
        if name == "post":
            y = self.post_attn_norm(x + A(x))
            return self.post_mlp_norm(y + self.mlp(y))
        if name == "b2t":
            y = self.post_attn_norm(x + A(x))
            return self.post_mlp_norm(x + y + self.mlp(y))
        if name == "deepnorm":
            alpha = opts.get("deepnorm_alpha") or (2.0 * self.config.num_layers) ** 0.25
            y = self.post_attn_norm(alpha * x + A(x))
            return self.post_mlp_norm(alpha * y + self.mlp(y))
        if name == "spannorm":
            alpha = opts.get("span_residual_alpha", 1.0)
            a = A(self.input_layernorm(x) if l == 1 else x)
            y = self.post_attn_norm(alpha * x + a)
            skip = alpha * x
            if opts.get("span_include_y_term"):
                skip = skip + y
            if opts.get("span_include_attn_term"):
                skip = skip + a
            return self.post_mlp_norm(skip + self.mlp(y))
        if name == "peri":
            y = x + self.attn_out_norm(A(self.input_layernorm(x)))
            return y + self.mlp_out_norm(self.mlp(self.pre_mlp_layernorm(y)))
        if name == "hybridnorm_star" and l == 1:
            y = x + A(self.input_layernorm(x))
            return y + self.mlp(self.pre_mlp_layernorm(y))
        if name in ("hybridnorm", "hybridnorm_star"):
            y = x + A(x)
            z = self.pre_mlp_layernorm(y)
            return z + self.mlp(z)
        raise ValueError(f"unknown norm placement {name}")


class Embedding(nn.Module):
    def __init__(self, config: MegaspanConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1], device=input_ids.device))
        return x


class Decoder(nn.Module):
    def __init__(self, config: MegaspanConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(config, i + 1) for i in range(config.num_layers))
        if config.final_norm:
            self.final_layernorm = _norm(config, config.hidden_size)


class MegaspanForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegaspanConfig
    base_model_prefix = ""
    _tied_weights_keys = {"output_layer.weight": "embedding.word_embeddings.weight"}

    def __init__(self, config: MegaspanConfig) -> None:
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    def _rope(self, s: int, device, dtype):
        c = self.config
        if c.position_embedding_type != "rope":
            return None
        dim = int(c.kv_channels * c.rotary_percent)
        inv_freq = 1.0 / (
            c.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        )
        freqs = torch.outer(torch.arange(s, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> CausalLMOutput:
        x = self.embedding(input_ids)
        rope = self._rope(input_ids.shape[1], x.device, x.dtype)
        for block in self.decoder.layers:
            x = block(x, rope)
        if self.config.final_norm:
            x = self.decoder.final_layernorm(x)
        logits = self.output_layer(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # No KV cache: every step runs the whole sequence (see the module doc of megaspan.evaluate.generate).
        return {"input_ids": input_ids}
