"""``megaspan export``: a checkpoint as a Hugging Face ``transformers`` folder.

The folder holds ``model.safetensors`` (megaspan's state dict under Megatron-Core's names,
fp32), ``config.json`` (a :class:`modeling_megaspan.MegaspanConfig` with ``auto_map``),
``modeling_megaspan.py`` (the one self-contained modeling file, every placement, dense and MoE) and the
sentencepiece ``tokenizer.model`` with its ``tokenizers`` equivalent (``tokenizer.json``,
``AutoTokenizer``). ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` loads it offline.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from megaspan.errors import ConfigError, UserError

MODELING_FILE = Path(__file__).with_name("modeling_megaspan.py")

# The Megatron-Core router and MoE settings the modeling file's ``MoE`` computes (megaspan's
# config sets none of these, so every megaspan MoE checkpoint has them): softmax over the top-k
# logits, no score scaling or expert bias, no group-limited routing, no capacity (no token
# dropped), no input jitter (applied at inference too), no shared-expert gate, no latent projection.
MOE_ROUTING = {
    "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_force_load_balancing": False,
    "moe_expert_capacity_factor": None,
    "moe_input_jitter_eps": None,
    "moe_apply_probs_on_input": False,
    "moe_shared_expert_gate": False,
    "moe_latent_size": None,
}
# Load-balancing types that only add a training loss; sinkhorn and quantile balancing also route.
LOSS_ONLY_BALANCING = {"aux_loss", "seq_aux_loss", "global_aux_loss", "none"}


def moe_routing_problems(t) -> list[str]:
    """What a Megatron ``TransformerConfig`` sets that the modeling file's router does not compute."""
    problems = [f"{k}={getattr(t, k, v)}" for k, v in MOE_ROUTING.items() if getattr(t, k, v) != v]
    balancing = t.moe_router_load_balancing_type
    if not set([balancing] if isinstance(balancing, str) else balancing) <= LOSS_ONLY_BALANCING:
        problems.append(f"moe_router_load_balancing_type={balancing}")
    return problems


def hf_config(model, state: dict) -> dict:
    """config.json for a loaded model (a :class:`~megaspan.evaluate.model.LoadedModel`)."""
    cfg, t = model.cfg, model.model.config
    m = cfg.model
    activation = getattr(t.activation_func, "__name__", str(t.activation_func))
    if activation not in ("silu", "gelu"):
        raise ConfigError(f"model activation {activation} has no equivalent in the exported modeling file")
    if t.num_moe_experts and (problems := moe_routing_problems(t)):
        raise ConfigError(
            f"{model.checkpoint}: its MoE layers route with {', '.join(problems)}, which the exported "
            "modeling file does not compute (it routes as megaspan trains: softmax over the top-k "
            "logits, no capacity); score it with megaspan eval instead"
        )
    # Which blocks hold an MoE (the weights say; the hybrid arch's own TransformerConfig counts
    # each block's halves as layers and places its MoE halves by pattern, not moe_layer_freq).
    moe_layers = [f"decoder.layers.{i}.mlp.router.weight" in state for i in range(m.num_layers)]
    return {
        "architectures": ["MegaspanForCausalLM"],
        "model_type": "megaspan",
        "auto_map": {
            "AutoConfig": "modeling_megaspan.MegaspanConfig",
            "AutoModelForCausalLM": "modeling_megaspan.MegaspanForCausalLM",
        },
        "vocab_size": state["embedding.word_embeddings.weight"].shape[0],
        "hidden_size": t.hidden_size,
        # Not t.num_layers: the hybrid stack counts each block's two halves as layers.
        "num_layers": m.num_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_query_groups": t.num_query_groups or t.num_attention_heads,
        "kv_channels": t.kv_channels,
        "ffn_hidden_size": t.ffn_hidden_size,
        "max_position_embeddings": model.max_length,
        "position_embedding_type": m.position_embedding_type,
        "rotary_base": m.rotary_base,
        "normalization": t.normalization,
        "layernorm_epsilon": t.layernorm_epsilon,
        "gated_linear_unit": t.gated_linear_unit,
        "activation": activation,
        "add_bias_linear": t.add_bias_linear,
        "norm_placement": m.norm_placement,
        "norm_options": dataclasses.asdict(m.norm),
        "final_norm": "decoder.final_layernorm.weight" in state,
        # Per-head Q/K norms on every placement (HybridNorm's own Q/K/V norms come with it).
        "qk_layernorm": m.qk_layernorm,
        "num_moe_experts": t.num_moe_experts if any(moe_layers) else None,
        "moe_router_topk": t.moe_router_topk,
        "moe_ffn_hidden_size": t.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": t.moe_shared_expert_intermediate_size,
        "moe_layers": moe_layers,
        "moe_router_dtype": t.moe_router_dtype,
        # The head is saved as its own tensor (a copy when megaspan ties it): no tying to resolve.
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": model.tokenizer.eod,
        "eos_token_id": model.tokenizer.eod,
        "pad_token_id": model.tokenizer.pad if model.tokenizer.pad >= 0 else None,
    }


def export_hf(checkpoint: str, output: str, tokenizer: str | None = None, fmt: str = "hf") -> Path:
    """``fmt="hf"``: any placement, dense or MoE, with the shipped modeling file; ``fmt="llama"``: a
    dense ``pre`` model as a stock ``LlamaForCausalLM``; ``fmt="mixtral"``: a ``pre`` model with
    experts in every block as a stock ``MixtralForCausalLM`` (both refused in one line when the
    config differs)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(
            "megaspan export needs safetensors and transformers: pip install 'megaspan[eval]'"
        ) from None
    from megaspan.evaluate.model import load_model
    from megaspan.models.convert import hybrid_to_gpt_state_dict

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} exists and is not empty: name a new directory")
    from megaspan.evaluate.model import resolve_checkpoint, saved_config

    path = resolve_checkpoint(checkpoint)
    experts = (saved_config(path).get("model", {}).get("moe") or {}).get("num_experts")
    # Before loading: no weight is read for a model the stock class cannot hold.
    if experts and fmt == "llama":
        raise ConfigError(
            f"{path} is a mixture-of-experts model (model.moe.num_experts={experts}) and a stock Llama "
            "has no experts: export it with --format mixtral (pre, experts in every block) or --format hf"
        )
    if not experts and fmt == "mixtral":
        raise ConfigError(
            f"{path} is a dense model and a stock Mixtral has experts in every block: export it with "
            "--format llama (pre) or --format hf"
        )
    model = load_model(path, tokenizer=tokenizer)
    state = {
        k: v.detach().float().cpu().contiguous()
        for k, v in model.model.state_dict().items()
        if not k.endswith("_extra_state")
    }
    if model.cfg.model.arch == "hybrid":
        state = hybrid_to_gpt_state_dict(state)
    if "output_layer.weight" not in state:
        state["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
    if fmt in STOCK_FOLDERS:
        out.mkdir(parents=True, exist_ok=True)
        try:
            STOCK_FOLDERS[fmt](model, state, out)
        except ConfigError:
            shutil.rmtree(out, ignore_errors=True)
            raise
    else:
        config = hf_config(model, state)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
    shutil.copy(model.tokenizer.path, out / "tokenizer.model")
    hf_tokenizer(model.tokenizer.path).save_pretrained(str(out))
    return out


def hf_tokenizer(path):
    """The sentencepiece model as a ``PreTrainedTokenizerFast`` that encodes like it.

    transformers' own converter builds the ``tokenizers`` pipeline from the model's settings
    (identity normalization, no dummy prefix, byte fallback, BPE merges ranked by piece score);
    no special token is added when encoding, as megaspan's preprocessing adds none before a text.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if backend is None:
        raise ConfigError(f"{path}: this sentencepiece model type has no Hugging Face tokenizer equivalent")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
    )


def _stock_differences(model, state: dict) -> list[str]:
    """What keeps a model from being a stock Llama/Mixtral: RMSNorm, SwiGLU, RoPE, Pre-LN, no
    biases, no QK-norm, a final norm."""
    m, t = model.cfg.model, model.model.config
    why = []
    if m.norm_placement != "pre":
        why.append(f"model.norm_placement={m.norm_placement} (Llama and Mixtral are Pre-LN)")
    if t.normalization != "RMSNorm":
        why.append(f"model.normalization={t.normalization}")
    if not t.gated_linear_unit or getattr(t.activation_func, "__name__", "") != "silu":
        why.append("an MLP other than SwiGLU")
    if m.position_embedding_type != "rope":
        why.append(f"model.position_embedding_type={m.position_embedding_type}")
    if t.add_bias_linear:
        why.append("linear biases")
    if "decoder.final_layernorm.weight" not in state:
        why.append("no final norm")
    if m.qk_layernorm:
        why.append("QK-norm (model.qk_layernorm)")
    return why


def _stock_attention(model, state: dict) -> dict:
    """The Llama/Mixtral names of everything but the MLPs: embedding, head, final norm, and per
    layer the two norms and Megatron's per-group fused QKV split into q/k/v projections."""
    m, t = model.cfg.model, model.model.config
    heads, groups, hn = t.num_attention_heads, t.num_query_groups or t.num_attention_heads, t.kv_channels
    rep = heads // groups
    tensors = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["output_layer.weight"],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].view(groups, (rep + 2) * hn, -1)
        q, k, v = torch_split(qkv, [rep * hn, hn, hn])
        tensors |= {
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q.reshape(heads * hn, -1),
            dst + "self_attn.k_proj.weight": k.reshape(groups * hn, -1),
            dst + "self_attn.v_proj.weight": v.reshape(groups * hn, -1),
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
        }
    return tensors


def _stock_config(model, state: dict) -> dict:
    m, t = model.cfg.model, model.model.config
    return {
        "vocab_size": state["embedding.word_embeddings.weight"].shape[0],
        "hidden_size": t.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_query_groups or t.num_attention_heads,
        "head_dim": t.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_length,
        "rms_norm_eps": t.layernorm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": model.tokenizer.eod,
        "eos_token_id": model.tokenizer.eod,
        "pad_token_id": model.tokenizer.pad if model.tokenizer.pad >= 0 else None,
    }


def _save_stock(tensors: dict, config: dict, out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def llama_folder(model, state: dict, out: Path) -> None:
    """A ``pre`` model as a stock ``LlamaForCausalLM`` (no remote code): RMSNorm, SwiGLU, RoPE, no
    biases, final norm. Megatron's per-group fused QKV is split into q/k/v projections and the
    fused SwiGLU ``linear_fc1`` into gate (its activated first half) and up."""
    why = _stock_differences(model, state)
    if why:
        raise ConfigError(
            f"{model.checkpoint} has no stock Llama equivalent ({'; '.join(why)}): export it with --format hf"
        )
    tensors = _stock_attention(model, state)
    for i in range(model.cfg.model.num_layers):
        src, dst = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
        gate, up = state[src + "linear_fc1.weight"].chunk(2, dim=0)
        tensors |= {
            dst + "gate_proj.weight": gate,
            dst + "up_proj.weight": up,
            dst + "down_proj.weight": state[src + "linear_fc2.weight"],
        }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_stock_config(model, state),
        "intermediate_size": model.model.config.ffn_hidden_size,
        "attention_bias": False,
        "mlp_bias": False,
    }
    _save_stock(tensors, config, out)


def mixtral_folder(model, state: dict, out: Path) -> None:
    """A ``pre`` MoE model with experts in every block as a stock ``MixtralForCausalLM`` (no
    remote code), in the Hub's Mixtral layout: the router as ``block_sparse_moe.gate``, expert E's
    fused SwiGLU ``linear_fc1`` as ``w1`` (its activated first half) and ``w3``, its ``linear_fc2``
    as ``w2``. Mixtral's router (softmax over all logits, top-k, renormalized) equals Megatron's
    softmax over the top-k logits."""
    m, t = model.cfg.model, model.model.config
    why = _stock_differences(model, state)
    moe = [f"decoder.layers.{i}.mlp.router.weight" in state for i in range(m.num_layers)]
    if not all(moe):
        why.append(f"dense blocks between the MoE ones (model.moe.layer_freq={m.moe.layer_freq})")
    if t.moe_shared_expert_intermediate_size:
        why.append("a shared expert")
    why += moe_routing_problems(t)
    if why:
        raise ConfigError(
            f"{model.checkpoint} has no stock Mixtral equivalent ({'; '.join(why)}): export it with --format hf"
        )
    tensors = _stock_attention(model, state)
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        tensors[dst + "gate.weight"] = state[src + "router.weight"]
        for e in range(t.num_moe_experts):
            expert = f"{src}experts.local_experts.{e}."
            w1, w3 = state[expert + "linear_fc1.weight"].chunk(2, dim=0)
            tensors |= {
                f"{dst}experts.{e}.w1.weight": w1,
                f"{dst}experts.{e}.w3.weight": w3,
                f"{dst}experts.{e}.w2.weight": state[expert + "linear_fc2.weight"],
            }
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_stock_config(model, state),
        "intermediate_size": t.moe_ffn_hidden_size,
        "num_local_experts": t.num_moe_experts,
        "num_experts_per_tok": t.moe_router_topk,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }
    _save_stock(tensors, config, out)


STOCK_FOLDERS = {"llama": llama_folder, "mixtral": mixtral_folder}


def torch_split(qkv, sizes: list[int]):
    import torch

    return torch.split(qkv, sizes, dim=1)
