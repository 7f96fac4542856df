"""Training FLOPs per step and the peak throughput table used for MFU.

FLOPs per training step (``step_flops``), as Megatron-LM's ``num_floating_point_operations``
(megatron/training/training.py) counts them for a GPT with MHA/GQA attention: matmuls and the
attention score/value products only (norms, activations, softmax and the optimizer are not
counted). With ``B`` sequences of length ``s`` per step, ``L`` layers, hidden ``h``, query
projection ``q = kv_channels * heads``, key/value projections ``k = v = kv_channels * groups``,
FFN size ``f`` (per expert for MoE, with top-``k`` experts per token, plus a shared expert of
size ``f_sh``), ``g = 3`` for SwiGLU (else 2) and padded vocabulary ``V``:

    per layer, per token:  3 * 2 * [ h*(q + k + v) + q*h        (QKV and output projections)
                                      + q * s/2 * 2               (QK^T and AV, causal half)
                                      + g * h * (f*topk + f_sh) ] (FFN)
    logits, per token:     3 * 2 * h * V
    step_flops = B * s * (L * per_layer + logits)

The factor 3 is forward + the two backward GEMMs (dgrad, wgrad); 2 is multiply + add.
"""

from __future__ import annotations

# Dense (no sparsity) peak TFLOP/s per device type and compute dtype, from NVIDIA's data
# sheets. Keys are matched as substrings of torch.cuda.get_device_name(), first match wins, so
# the more specific names come first. fp32 matmuls on these parts run as TF32.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"fp32": 378.0, "bf16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"fp32": 417.0, "bf16": 835.0, "fp8": 1671.0},
    "H100": {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},  # SXM
    "H200": {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},
    "GH200": {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},
    "B200": {"fp32": 1100.0, "bf16": 2250.0, "fp8": 4500.0},
    "A100": {"fp32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 183.0, "bf16": 362.0, "fp8": 733.0},
}


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Peak for ``precision`` ('fp32', 'bf16', 'fp8-*') on the named device; None if unknown."""
    if not device_name:
        return None
    kind = "fp8" if precision.startswith("fp8") else precision
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return peaks.get(kind)
    return None


def step_flops(
    *,
    sequences: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None,
    kv_channels: int | None,
    ffn_hidden_size: int,
    swiglu: bool,
    padded_vocab_size: int,
    moe_topk: int | None = None,
    moe_ffn_hidden_size: int | None = None,
    shared_expert_ffn_hidden_size: int | None = None,
) -> float:
    """Training FLOPs of one optimizer step over ``sequences`` sequences (formula above)."""
    kv = kv_channels or hidden_size // num_attention_heads
    groups = num_query_groups or num_attention_heads
    q = kv * num_attention_heads
    k = v = kv * groups
    g = 3 if swiglu else 2
    attn = hidden_size * (q + k + v) + q * hidden_size + q * seq_length / 2 * 2
    if moe_topk:
        ffn = (moe_ffn_hidden_size or ffn_hidden_size) * moe_topk + (shared_expert_ffn_hidden_size or 0)
    else:
        ffn = ffn_hidden_size
    per_layer = 3 * 2 * (attn + g * hidden_size * ffn)
    logits = 3 * 2 * hidden_size * padded_vocab_size
    return float(sequences * seq_length * (num_layers * per_layer + logits))


def config_step_flops(cfg, padded_vocab_size: int) -> float:
    """``step_flops`` for a :class:`megaspan.config.schema.MegaspanConfig` (one global batch)."""
    from megaspan.config.derived import ffn_hidden_size

    m = cfg.model
    moe = m.moe
    return step_flops(
        sequences=cfg.training.global_batch_size,
        seq_length=m.seq_length,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=None,
        ffn_hidden_size=ffn_hidden_size(m),
        swiglu=m.activation == "swiglu",
        padded_vocab_size=padded_vocab_size,
        moe_topk=moe.router_topk if moe.num_experts else None,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        shared_expert_ffn_hidden_size=moe.shared_expert_ffn_hidden_size,
    )
