"""Typed configuration schema for megaspan.

Every run is described by one :class:`MegaspanConfig`. YAML recipes (``megaspan/config/recipes``)
and dotted CLI overrides (``model.num_layers=48``) are loaded into it by
:mod:`megaspan.config.loader`, which rejects unknown keys and wrong types. The single mapping
to Megatron-Core's ``TransformerConfig`` lives in :mod:`megaspan.models.mcore_config`.

Field docstrings sit on the line after the field (torchtitan style) and are shown by
``megaspan config --explain``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: Optional[int] = None
    """Number of experts; None = dense model."""
    router_topk: int = 2
    ffn_hidden_size: Optional[int] = None
    """Per-expert FFN size; None = model.ffn_hidden_size."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    aux_loss_coeff: float = 0.01
    z_loss_coeff: Optional[float] = None
    layer_freq: int = 1
    """Every layer_freq-th layer is MoE (1 = all layers)."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    grouped_gemm: bool = False
    """Grouped GEMM experts (GPU/TE only)."""
    permute_fusion: Optional[bool] = None
    """TE's fused token permute/unpermute in the dispatcher; None = on with CUDA + Transformer Engine."""
    router_dtype: Optional[Literal["fp32", "fp64"]] = None
    """Router logits/softmax precision; None = fp32 on GPU (Megatron's advice for bf16, a must with
    many experts), the parameters' dtype on CPU."""


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int = 8
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    """GQA groups; None = num_attention_heads (MHA)."""
    ffn_hidden_size: Optional[int] = None
    """None = 4*hidden (gelu) or 8/3*hidden rounded up to a multiple of 128 (swiglu; FP8-aligned for TP <= 8)."""
    vocab_size: Optional[int] = None
    """None = the tokenizer's vocabulary."""
    make_vocab_size_divisible_by: int = 128
    """The embedding and output rows are padded to a multiple of this (Megatron-LM's
    --make-vocab-size-divisible-by); how TP enters is model.vocab_padding."""
    vocab_padding: Literal["reshardable", "megatron"] = "reshardable"
    """reshardable: a multiple of make_vocab_size_divisible_by whenever TP divides it (else of it x
    TP): the padded vocabulary, and so the checkpoint, is the same at every such TP, and checkpoints
    reshard across TP sizes. megatron: a multiple of make_vocab_size_divisible_by x TP, exactly as
    Megatron-LM pads (the same shapes as a Megatron-LM model of this TP). Its padded size depends on
    TP: weights load into another TP's padding (Megatron-Core lets the vocab rows differ: padding
    rows are cut or added as zeros), the full state (optimizer) does not."""
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None
    """None = seq_length."""
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu", "swiglu"] = "swiglu"
    norm_placement: str = "spannorm"
    """One of: megaspan info lists them (pre, post, spannorm, b2t, hybridnorm, ...)."""
    norm: Any = field(default_factory=dict)
    """Options of the selected placement (model.norm.<option>; e.g. SpanNorm's span_*, Mix-LN's
    mixln_alpha, DeepNorm's deepnorm_alpha/beta; final_norm for all). The loader turns this
    mapping into that placement's Options dataclass; `megaspan info` lists the options."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head before the dot product (QK-norm; Megatron-Core's
    TransformerConfig.qk_layernorm), for every placement: a stability switch independent of the
    placement. HybridNorm/HybridNorm* already normalise Q and K (and V): there the flag adds
    nothing (the same Q/K norms, not a second pair)."""
    init_method_std: Optional[float] = None
    """None = the placement's default (0.02; HybridNorm uses 1/sqrt(2.5*hidden))."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    add_bias_linear: bool = False
    share_embeddings_and_output_weights: bool = True
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """'auto' = TE when it imports and CUDA is present, else the local (CPU-capable) backend."""
    arch: Literal["gpt", "hybrid"] = "gpt"
    """'gpt' = Megatron-Core's GPTModel; 'hybrid' = its HybridModel, each block as an attention
    layer '*' and an MLP/MoE layer '-'/'E' (bitwise equal to gpt on the same weights)."""
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None


@dataclass(kw_only=True)
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto' = bf16 on GPU, fp32 on CPU."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    first_last_layers_bf16: bool = False
    initial_loss_scale: float = 65536.0
    """fp16 only: dynamic loss scaling starts here."""
    loss_scale: Optional[float] = None
    """fp16 only: a fixed loss scale instead of dynamic scaling."""
    grad_reduce_in_fp32: bool = True


@dataclass(kw_only=True)
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Indexed-dataset prefixes (path/to/name without .bin/.idx); empty = embedded stdlib corpus."""
    weights: Optional[list[float]] = None
    """Blend weights, one per path; None = proportional to size."""
    split: str = "98,2,0"
    """train,valid,test split of each dataset (Megatron format)."""
    corpus: Literal["stdlib"] = "stdlib"
    """The embedded corpus used when no paths are given."""
    cache_dir: Optional[str] = None
    """Where preprocessed data and dataset index caches go; None = ~/.cache/megaspan."""
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    valid_sets: dict[str, str] = field(default_factory=dict)
    """Extra validation sets, ``{name: indexed-dataset prefix}``: each is evaluated with the main
    validation loss (``training.eval_steps`` batches) and logged as ``valid/<name>/loss`` and ppl."""


@dataclass(kw_only=True)
class TokenizerConfig:
    model: Optional[str] = None
    """An existing tokenizer: a sentencepiece .model, a Hugging Face tokenizer.json, or a local HF
    tokenizer directory; None = train a sentencepiece model on the corpus (cached by hash)."""
    type: Optional[Literal["sentencepiece", "huggingface"]] = None
    """None = from tokenizer.model: a .json file or a directory is huggingface, else sentencepiece."""
    eod_token: Optional[str] = None
    """Hugging Face only: the token appended after each document; None = the tokenizer's EOS."""
    bos_token: Optional[str] = None
    """Hugging Face only: the BOS token; None = the tokenizer's own, if any."""
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram"] = "bpe"
    max_train_sentences: int = 200000


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adam"] = "adam"
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(kw_only=True)
class ScheduleConfig:
    warmup_steps: int = 20
    decay_style: Literal["cosine", "linear", "constant", "WSD"] = "cosine"
    decay_steps: Optional[int] = None
    """None = training.steps."""
    wsd_decay_steps: Optional[int] = None
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"


@dataclass(kw_only=True)
class GuardConfig:
    """Divergence guard: non-finite loss or gradient norm, and loss spikes (loss above
    ``spike_factor`` x the median of the last ``window`` losses, after ``warmup_steps``)."""

    policy: Optional[Literal["stop", "skip", "rollback"]] = None
    """None = off (the checkpoint safety floor still holds); stop = end the run, status diverged,
    exit code 3; skip = drop that update and train on; rollback = reload the last good checkpoint,
    skip the data window that caused the event, scale the LR by ``rollback_lr_factor``."""
    spike_factor: float = 3.0
    window: int = 50
    warmup_steps: int = 20
    max_retries: int = 3
    """Rollbacks (or skips in a row) before the run stops as diverged."""
    rollback_lr_factor: float = 1.0


@dataclass(kw_only=True)
class TrainingConfig:
    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seed: int = 1234
    eval_interval: int = 50
    eval_steps: int = 8
    run_dir: str = "runs/default"
    exit_on_signal: bool = True
    """Save a checkpoint and exit 0 on SIGTERM/SIGUSR1 (what Slurm sends before preemption)."""
    deterministic: Optional[bool] = None
    """Deterministic kernels (torch.use_deterministic_algorithms) for bitwise-repeatable runs;
    None = on for CPU runs, off on GPU, where it costs speed (the mode is recorded in summary.json)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    z_loss: float = 0.0
    """PaLM's output z-loss coefficient: adds z_loss x log(Z)^2 per token (Z = sum of exp of the
    LM head's logits) to the training loss, averaged over the loss-masked tokens like the cross
    entropy; the logged loss stays the cross entropy. 0 = off (PaLM used 1e-4)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    save_interval: Optional[int] = None
    """Save every N steps; None = only at the end and on signals."""
    dir: Optional[str] = None
    """None = <run_dir>/checkpoints."""
    resume: str = "auto"
    """'auto' = the latest valid checkpoint in dir if any; 'none'; or a checkpoint path."""
    keep_last: Optional[int] = 3
    """Delete older checkpoints beyond this many; None keeps all."""
    save_at_end: bool = True
    async_save: bool = False
    """Write the periodic (save_interval) checkpoints from a background thread: training waits only
    while the state is copied to CPU memory, and the checkpoint is committed (renamed, ``latest``,
    pruned) at the first step boundary after every rank has written it. The save at the end and
    on a stop signal stays synchronous (the process exits after it), and waits for one in flight
    first. Costs one copy of the model and optimizer state in host memory while a write runs."""
    load_optimizer: bool = True
    """False: take only the model weights from checkpoint.resume=<path>; optimizer, LR schedule and
    step start fresh (fine-tuning, or moving to a layout or optimizer type whose state you drop)."""
    allow_data_change: bool = False
    """Resume on data that differs from the checkpoint's record (data.paths, their sizes or .idx
    content, data.weights, data.split); False refuses it in one line."""


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases logging (pip install 'megaspan[wandb]'), written by rank 0 beside TensorBoard."""

    project: Optional[str] = None
    """None = W&B off."""
    entity: Optional[str] = None
    name: Optional[str] = None
    """None = the run dir's name."""
    group: Optional[str] = None
    """`megaspan sweep` sets it to the sweep's name."""
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline: write <dir>/wandb/offline-run-* to upload later with `wandb sync`; the WANDB_MODE
    environment variable, when set, wins."""
    dir: Optional[str] = None
    """Where W&B writes its files (a wandb/ folder inside); None = the run dir."""


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    diagnostics_interval: Optional[int] = None
    """Per-layer stability diagnostics every N steps; None = off."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(kw_only=True)
class DownstreamConfig:
    """In-loop downstream evaluation: lm-evaluation-harness tasks scored on the live model under
    the run's layout (docs/evaluate.md). Needs ``pip install 'megaspan[eval]'``."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names, e.g. [hellaswag, piqa, arc_easy]; empty = off."""
    interval: Optional[int] = None
    """Score every N steps; None = only once, at the end of training."""
    limit: Optional[int] = None
    """At most N examples per task; None = every example (the whole task set, each time)."""
    include_path: Optional[str] = None
    """A directory of extra task YAMLs (your own or offline tasks), as lm-eval's --include_path."""
    batch_size: int = 8
    """Sequences per forward pass of the scoring (each as long as the longest in its batch)."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; None = each task's own default (0 unless its YAML sets one)."""


@dataclass(kw_only=True)
class EvalConfig:
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


@dataclass(kw_only=True)
class MegaspanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
