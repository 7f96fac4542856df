"""Transformer Engine's FP8 GEMM shape rules, checked on the config before anything is built.

TE quantizes the inputs of every linear layer inside ``fp8_autocast`` and refuses a GEMM whose
input (and weight) does not meet the FP8 tensor cores' alignment: the last dimension divisible by
16 and the product of the leading dimensions by 8 (TE ``pytorch/utils.py``:
``assert_dim_for_fp8_exec``, called from ``Linear``, ``LayerNormLinear`` and ``GroupedLinear``
forward). Violations surface as a ``ValueError`` deep inside the first FP8 forward, after data
preprocessing and model construction; here they are one line each, naming the key and the fix.

Which GEMMs run in FP8 (``[s, b, h]`` activations, local shapes per rank; TP = tensor parallel,
ETP = expert tensor parallel, CP = context parallel, SP = sequence parallel):

============  ===========================  ==================================
GEMM          input last dim               weight ``[out, in]`` out dim
============  ===========================  ==================================
linear_qkv    h                            (q heads + 2 kv groups) x d / TP
linear_proj   heads x d / TP               h
linear_fc1    h                            (2 x) ffn / TP
linear_fc2    ffn / TP                     h
experts fc1   h                            (2 x) expert ffn / ETP
experts fc2   expert ffn / ETP             h
============  ===========================  ==================================

The leading dimensions are the tokens a rank feeds: micro x seq / CP, divided by TP where SP
splits the sequence. MoE experts see a routed, variable token count: Megatron-Core pads it for
FP8 itself (``SequentialMLP``/``TEGroupedMLP`` quantization padding), so only the dense token
count is checked. The output layer and embeddings are not TE modules and never run in FP8.
"""

from __future__ import annotations

from megaspan.config.derived import ffn_hidden_size
from megaspan.config.schema import MegaspanConfig
from megaspan.errors import ConfigError

FP8_LAST_DIM = 16
"""TE: an FP8 GEMM operand's last dimension must be a multiple of 16."""
FP8_LEADING_DIMS = 8
"""TE: the product of its leading dimensions must be a multiple of 8."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def check_fp8_shapes(cfg: MegaspanConfig) -> None:
    """With ``precision.fp8`` set, every FP8 GEMM of the model meets TE's alignment rules."""
    if cfg.precision.fp8 is None:
        return
    m, par, tr = cfg.model, cfg.parallel, cfg.training
    tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
    head_dim = m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    ffn = ffn_hidden_size(m)
    last_dims = [
        ("model.hidden_size", m.hidden_size, f"model.hidden_size={m.hidden_size}", 1),
        (
            "the attention width per TP rank (model.hidden_size / parallel.tensor_model_parallel_size)",
            m.hidden_size // tp,
            f"{m.hidden_size}/{tp}",
            tp,
        ),
        (
            "the FFN width per TP rank (model.ffn_hidden_size / parallel.tensor_model_parallel_size)",
            ffn // tp,
            f"{ffn}/{tp}",
            tp,
        ),
    ]
    if m.moe.num_experts:
        etp = par.expert_tensor_parallel_size or tp
        expert_ffn = m.moe.ffn_hidden_size or ffn
        last_dims.append(
            (
                "the expert FFN width per expert-TP rank (model.moe.ffn_hidden_size / "
                "parallel.expert_tensor_parallel_size)",
                expert_ffn // etp,
                f"{expert_ffn}/{etp}",
                etp,
            )
        )
    for what, value, shown, split in last_dims:
        if value % FP8_LAST_DIM:
            raise ConfigError(
                f"precision.fp8 needs {what} divisible by {FP8_LAST_DIM} (Transformer Engine's FP8 GEMM "
                f"rule), got {shown} = {value}: use a size that is a multiple of {FP8_LAST_DIM * split} "
                f"(e.g. {_round_up(value * split, FP8_LAST_DIM * split)}) or set precision.fp8=null"
            )
    qkv_rows = (m.num_attention_heads + 2 * groups) * head_dim // tp
    if qkv_rows % FP8_LEADING_DIMS:
        raise ConfigError(
            f"precision.fp8 needs the fused QKV rows per TP rank, (heads + 2 x query groups) x head dim / TP "
            f"= {qkv_rows}, divisible by {FP8_LEADING_DIMS}: use a head dim (model.hidden_size / "
            "model.num_attention_heads) that is a multiple of 8"
        )
    tokens = tr.micro_batch_size * m.seq_length // cp
    shown = f"training.micro_batch_size x model.seq_length / parallel.context_parallel_size = {tokens}"
    if par.sequence_parallel:
        tokens //= tp
        shown = f"{shown[: shown.rindex(' =')]} / parallel.tensor_model_parallel_size (SP) = {tokens}"
    if tokens % FP8_LEADING_DIMS:
        raise ConfigError(
            f"precision.fp8 needs the tokens each rank feeds a GEMM divisible by {FP8_LEADING_DIMS} "
            f"(Transformer Engine's FP8 GEMM rule), got {shown}: choose a sequence length or micro-batch "
            f"size that makes it a multiple of {FP8_LEADING_DIMS}"
        )
