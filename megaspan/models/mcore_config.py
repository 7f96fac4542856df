"""The one mapping from megaspan's config to Megatron-Core's ``TransformerConfig``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaspan.config.derived import ffn_hidden_size
from megaspan.config.schema import MegaspanConfig


def resolve_dtype(precision, cuda: bool | None = None) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and gain nothing)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    name = precision.dtype
    if name == "auto":
        name = "bf16" if cuda else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128, rule: str = "reshardable") -> int:
    """Pad the embedding so every TP shard is equal and GEMM-friendly.

    ``rule="megatron"``: Megatron-LM's padding, a multiple of ``divisible_by * tp``, which makes
    the padded vocabulary (and so the checkpoint) depend on the TP size. ``"reshardable"``
    (megaspan's default): a multiple of ``divisible_by`` whenever TP divides it, which keeps
    checkpoints reshardable across TP sizes and TP runs numerically equal to TP=1.
    """
    multiple = divisible_by if rule == "reshardable" and divisible_by % tp == 0 else divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_vocab_size(cfg, vocab_size: int, tp: int | None = None) -> int:
    """The padded vocabulary of ``cfg``'s model (``model.make_vocab_size_divisible_by``,
    ``model.vocab_padding``) at ``tp`` (default: ``parallel.tensor_model_parallel_size``)."""
    tp = cfg.parallel.tensor_model_parallel_size if tp is None else tp
    return padded_vocab_size(vocab_size, tp, cfg.model.make_vocab_size_divisible_by, cfg.model.vocab_padding)


FUSED_SOFTMAX_KERNELS = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")
"""Megatron's fused-softmax CUDA extensions (Apex / Megatron-LM's fused kernels), imported by
``FusedScaleMaskSoftmax`` whenever ``masked_softmax_fusion`` is on and the shape qualifies."""
GRAD_ACCUM_KERNEL = "fused_weight_gradient_mlp_cuda"
"""Apex's wgrad-into-main_grad kernel: ``ColumnParallelLinear`` (the output layer, a local module
even in TE specs) refuses ``gradient_accumulation_fusion`` without it."""


def fusion_flags(cuda: bool, impl: str, kernels: dict[str, bool]) -> dict:
    """Megatron-Core's kernel-fusion switches, on exactly where their kernels exist.

    ``kernels``: module name -> installed (:func:`megaspan.models.backend.kernel_available`). CPU
    runs get no fusions (no CUDA kernels; the local backend's CPU numerics stay bitwise those of
    the reference). On a GPU: RoPE fusion and bias-activation fusion with Transformer Engine
    (mcore's fused RoPE is TE's kernel); the fused softmax only where its extension is installed
    (the local backend's attention; TE attention does not use it); gradient-accumulation fusion
    with TE plus Apex's kernel (TE linears accumulate into ``main_grad`` directly, the output layer
    needs Apex).
    """
    te = cuda and impl == "transformer_engine"
    return dict(
        bias_activation_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=cuda and all(kernels.get(k, False) for k in FUSED_SOFTMAX_KERNELS),
        gradient_accumulation_fusion=te and kernels.get(GRAD_ACCUM_KERNEL, False),
    )


def transformer_config(cfg: MegaspanConfig, placement, cuda: bool | None = None, impl: str | None = None):
    """Build the ``TransformerConfig`` for ``cfg`` with ``placement`` (a built Placement).

    ``impl``: the resolved layer backend (``megaspan.models.resolve_impl``); None resolves it here."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import init_method_normal

    from megaspan.models.backend import kernel_available, resolve_impl

    if cuda is None:
        cuda = torch.cuda.is_available()
    if impl is None:
        impl = resolve_impl(cfg.model.transformer_impl)
    te = cuda and impl == "transformer_engine"
    fusions = fusion_flags(
        cuda,
        impl,
        {k: kernel_available(k) for k in (*FUSED_SOFTMAX_KERNELS, GRAD_ACCUM_KERNEL)} if cuda else {},
    )
    m, par, prec = cfg.model, cfg.parallel, cfg.precision
    dtype = resolve_dtype(prec, cuda)
    std = placement.init_std(m.hidden_size, m.init_method_std)
    moe = m.moe
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=ffn_hidden_size(m),
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=m.add_bias_linear,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        init_method_std=std,
        # HybridNorm's Q/K(/V) norms are QK-norm already: the switch composes as OR (the same
        # norms, never a second pair; specs._attention_spec builds them once).
        qk_layernorm=placement.qkv_norm or m.qk_layernorm,
        # Parallelism.
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=par.num_layers_in_last_pipeline_stage,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        context_parallel_size=par.context_parallel_size,
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
        # Megatron-LM's defaults: the interleaved schedule overlaps (unbatched) p2p; batched p2p
        # with PP=2 posts two sends to the same peer per batch, which gloo/NCCL can pair with
        # the wrong receives (megatron/training/arguments.py asserts against it).
        overlap_p2p_comm=par.virtual_pipeline_model_parallel_size is not None,
        batch_p2p_comm=par.virtual_pipeline_model_parallel_size is None,
        # Precision.
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=prec.fp8,
        fp8_recipe=prec.fp8_recipe,
        first_last_layers_bf16=prec.first_last_layers_bf16,
        # CPU runs: initialize on CPU so TP/EP shards equal the single-device weights
        # bit-for-bit (used by the layout-equivalence tests).
        use_cpu_initialization=not cuda,
        **fusions,
        persist_layer_norm=False,
        # MoE.
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=(moe.ffn_hidden_size or ffn_hidden_size(m)) if moe.num_experts else None,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_layer_freq=moe.layer_freq,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_grouped_gemm=moe.grouped_gemm,
        moe_permute_fusion=bool(moe.num_experts)
        and (te if moe.permute_fusion is None else moe.permute_fusion),
        moe_router_dtype=moe.router_dtype or ("fp32" if cuda and moe.num_experts else None),
    )
    if placement.layer_dependent_slots:
        # Megatron stacks each per-layer tensor along a global layer axis in checkpoints, which
        # dist_checkpointing rejects when a norm exists in only some layers (SpanNorm's block-0
        # N0, Mix-LN's switch, HybridNorm*'s block 0): give every layer its own keys instead.
        kwargs["hetereogenous_dist_checkpoint"] = True
    if not placement.scaled_init:
        # TransformerConfig defaults output projections to sigma/sqrt(2L); these placements
        # define their own depth scaling (or none) and must not stack Megatron's on top.
        kwargs["output_layer_init_method"] = init_method_normal(std)
    return TransformerConfig(**kwargs)
