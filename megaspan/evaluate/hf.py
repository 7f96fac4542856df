"""``megaspan export``: a checkpoint as a Hugging Face ``transformers`` folder.

The folder holds ``model.safetensors`` (megaspan's state dict under Megatron-Core's names,
fp32), ``config.json`` (a :class:`modeling_megaspan.MegaspanConfig` with ``auto_map``),
``modeling_megaspan.py`` (the one self-contained modeling file, every placement) and the
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


def hf_config(model, state: dict) -> dict:
    """config.json for a loaded model (a :class:`~megaspan.evaluate.model.LoadedModel`)."""
    cfg, t = model.cfg, model.model.config
    m = cfg.model
    activation = getattr(t.activation_func, "__name__", str(t.activation_func))
    if activation not in ("silu", "gelu"):
        raise ConfigError(f"model activation {activation} has no equivalent in the exported modeling file")
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
        # The head is saved as its own tensor (a copy when megaspan ties it): no tying to resolve.
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": model.tokenizer.eod,
        "eos_token_id": model.tokenizer.eod,
        "pad_token_id": model.tokenizer.pad if model.tokenizer.pad >= 0 else None,
    }


def export_hf(checkpoint: str, output: str, tokenizer: str | None = None) -> Path:
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
    if experts:  # before loading: nothing is read for a model that cannot be exported
        raise ConfigError(
            f"{path} is a mixture-of-experts model (model.moe.num_experts={experts}): megaspan export "
            "writes dense models only so far; score it with megaspan eval instead"
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
