"""Every check that needs no data: one-line errors that name the key and the fix.

:func:`validate` runs before anything touches data, the run directory or a process group, for
``megaspan train`` and ``megaspan plan`` alike, so a bad config fails in milliseconds instead of
after corpus preprocessing or as a Megatron assertion deep inside model construction. Each topic
is one small function below; checks that need data (tokenizer vocabulary, resume path) live in
their own layers and raise :class:`~megaspan.errors.UserError` subclasses there.

Torch-free: what the machine can do arrives as a :class:`~megaspan.config.Capabilities` value
(``megaspan.models.detect_capabilities()`` builds it). ``capabilities=None`` means "machine
unknown": the checks that depend on it (TE, CUDA, FP8) are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

from megaspan.config.capabilities import Capabilities
from megaspan.config.derived import decay_steps, ffn_hidden_size
from megaspan.config.fp8 import check_fp8_shapes
from megaspan.config.layout import ParallelLayout
from megaspan.config.loader import norm_options
from megaspan.config.ranges import check_ranges
from megaspan.config.schema import MegaspanConfig
from megaspan.errors import BackendError, ConfigError


def validate(
    cfg: MegaspanConfig, world_size: int = 1, capabilities: Capabilities | None = None
) -> ParallelLayout:
    """Raise a :class:`~megaspan.errors.UserError` for the first inconsistency; return the layout."""
    for check in _CONFIG_CHECKS:
        check(cfg)
    if capabilities is not None:
        for machine_check in _MACHINE_CHECKS:
            machine_check(cfg, capabilities)
    return check_world(cfg, world_size)


# ---- model ----------------------------------------------------------------------------------


def check_placement(cfg: MegaspanConfig) -> None:
    """The placement exists and ``model.norm.*`` are its options (resolved by the loader)."""
    norm_options(cfg)


def _or_one(value: int | None) -> int:
    """An optional size: None means 'unset' (valid), but an explicit 0 must still be rejected."""
    return 1 if value is None else value


def check_sizes(cfg: MegaspanConfig) -> None:
    m, par, tr = cfg.model, cfg.parallel, cfg.training
    for key, value in (
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.seq_length", m.seq_length),
        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
        ("parallel.tensor_model_parallel_size", par.tensor_model_parallel_size),
        ("parallel.pipeline_model_parallel_size", par.pipeline_model_parallel_size),
        ("parallel.expert_model_parallel_size", par.expert_model_parallel_size),
        ("parallel.context_parallel_size", par.context_parallel_size),
        ("parallel.expert_tensor_parallel_size", _or_one(par.expert_tensor_parallel_size)),
        ("parallel.virtual_pipeline_model_parallel_size", _or_one(par.virtual_pipeline_model_parallel_size)),
        ("parallel.num_layers_in_first_pipeline_stage", _or_one(par.num_layers_in_first_pipeline_stage)),
        ("parallel.num_layers_in_last_pipeline_stage", _or_one(par.num_layers_in_last_pipeline_stage)),
        ("model.moe.num_experts", _or_one(m.moe.num_experts)),
        ("model.moe.router_topk", m.moe.router_topk),
        ("training.micro_batch_size", tr.micro_batch_size),
        ("training.global_batch_size", tr.global_batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def check_attention_and_tp(cfg: MegaspanConfig) -> None:
    """Heads, query groups, sequence parallelism and the FFN against the TP size."""
    m, par = cfg.model, cfg.parallel
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    tp = par.tensor_model_parallel_size
    if m.hidden_size % heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={heads}"
        )
    if heads % groups:
        raise ConfigError(
            f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}"
        )
    if heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={heads} is not divisible by parallel.tensor_model_parallel_size={tp}: "
            f"choose a TP size that divides the head count"
        )
    if groups % tp and tp % groups:
        raise ConfigError(
            f"model.num_query_groups={groups} and parallel.tensor_model_parallel_size={tp} must divide one another"
        )
    if par.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    if par.sequence_parallel and m.seq_length % tp:
        raise ConfigError(
            f"model.seq_length={m.seq_length} is not divisible by parallel.tensor_model_parallel_size={tp}: "
            "sequence parallelism splits the sequence across TP ranks"
        )
    ffn = ffn_hidden_size(m)
    if ffn % tp:
        raise ConfigError(
            f"the FFN hidden size {ffn} (model.ffn_hidden_size) is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}"
        )


def check_moe(cfg: MegaspanConfig) -> None:
    m, par = cfg.model, cfg.parallel
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    if not m.moe.num_experts:
        if ep > 1:
            raise ConfigError(
                "parallel.expert_model_parallel_size > 1 needs an MoE model (set model.moe.num_experts)"
            )
        if par.expert_tensor_parallel_size is not None:
            raise ConfigError(
                "parallel.expert_tensor_parallel_size needs an MoE model (set model.moe.num_experts)"
            )
        return
    if m.moe.num_experts % ep:
        raise ConfigError(
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by "
            f"parallel.expert_model_parallel_size={ep}"
        )
    if m.moe.router_topk > m.moe.num_experts:
        raise ConfigError(
            f"model.moe.router_topk={m.moe.router_topk} > model.moe.num_experts={m.moe.num_experts}"
        )
    if m.add_bias_linear and not m.moe.grouped_gemm:
        # SequentialMLP adds each expert's fc2 bias in place on an autograd view: backward raises.
        raise ConfigError(
            "model.add_bias_linear=true with MoE fails in Megatron's SequentialMLP (bias added in place); "
            "set model.add_bias_linear=false or model.moe.grouped_gemm=true (GPU)"
        )
    if tp > 1 and not par.sequence_parallel:
        raise ConfigError(
            "MoE with parallel.tensor_model_parallel_size > 1 needs parallel.sequence_parallel=true "
            "(Megatron-Core refuses MoE+TP without SP)"
        )
    etp = par.expert_tensor_parallel_size or tp
    expert_ffn = m.moe.ffn_hidden_size or ffn_hidden_size(m)
    if expert_ffn % etp:
        raise ConfigError(
            f"the expert FFN size {expert_ffn} (model.moe.ffn_hidden_size) is not divisible by the "
            f"expert tensor-parallel size {etp} (parallel.expert_tensor_parallel_size, default = TP)"
        )


def check_positions(cfg: MegaspanConfig) -> None:
    m, cp = cfg.model, cfg.parallel.context_parallel_size
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"model.seq_length={m.seq_length} > model.max_position_embeddings={m.max_position_embeddings}: "
            "raise max_position_embeddings or shorten seq_length"
        )
    if cp > 1 and m.seq_length % (2 * cp):
        # Load-balanced CP gives each rank two chunks of the sequence (one early, one late).
        raise ConfigError(
            f"model.seq_length={m.seq_length} is not divisible by 2 x parallel.context_parallel_size = {2 * cp}"
        )


# ---- parallelism ----------------------------------------------------------------------------
def check_pipeline(cfg: MegaspanConfig) -> None:
    par, layers = cfg.parallel, cfg.model.num_layers
    pp, vp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    if vp is not None and pp == 1:
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1"
        )
    if pp == 1:
        if first is not None or last is not None:
            raise ConfigError("num_layers_in_first/last_pipeline_stage need pipeline_model_parallel_size > 1")
        return
    middle_layers = layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers):
        raise ConfigError(
            f"model.num_layers={layers} does not split into {pp} pipeline stages with "
            f"first={first}, last={last}"
        )
    chunks = middle_stages * (vp or 1)
    if middle_stages and middle_layers % chunks:
        raise ConfigError(
            f"model.num_layers={layers} is not divisible into {pp} pipeline stages"
            f"{f' x {vp} virtual stages' if vp else ''}: adjust num_layers or "
            "parallel.num_layers_in_first/last_pipeline_stage"
        )
    for name, value in (("first", first), ("last", last)):
        if value is not None and vp and value % vp:
            raise ConfigError(
                f"parallel.num_layers_in_{name}_pipeline_stage={value} is not divisible by "
                f"virtual_pipeline_model_parallel_size={vp}"
            )


def check_parallel_options(cfg: MegaspanConfig) -> None:
    """Recompute and overlap switches (Megatron's TransformerConfig and arguments.py rules)."""
    par = cfg.parallel
    granularity, method = par.recompute_granularity, par.recompute_method
    if granularity == "full" and (method is None or par.recompute_num_layers is None):
        raise ConfigError(
            "parallel.recompute_granularity=full needs parallel.recompute_method (uniform or block) "
            "and parallel.recompute_num_layers"
        )
    if granularity != "full" and (method is not None or par.recompute_num_layers is not None):
        raise ConfigError(
            "parallel.recompute_method/recompute_num_layers only apply to parallel.recompute_granularity=full"
        )
    if par.recompute_num_layers is not None and par.recompute_num_layers < 1:
        raise ConfigError(f"parallel.recompute_num_layers must be >= 1, got {par.recompute_num_layers}")
    if par.overlap_param_gather and not (par.use_distributed_optimizer and par.overlap_grad_reduce):
        raise ConfigError(
            "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true "
            "and parallel.overlap_grad_reduce=true"
        )


def check_hybrid(cfg: MegaspanConfig) -> None:
    """model.arch=hybrid runs a block as two layers; a block-spanning placement (SpanNorm, B2T)
    hands the block input from the attention layer to the MLP layer, so both must run in one
    recompute chunk. recompute_method=block checkpoints every hybrid layer on its own."""
    from megaspan.norms.registry import get_placement_class  # torch-free; resolved at call time

    par = cfg.parallel
    if cfg.model.arch != "hybrid" or par.recompute_granularity != "full" or par.recompute_method != "block":
        return
    if get_placement_class(cfg.model.norm_placement).block_spanning:
        raise ConfigError(
            f"model.arch=hybrid with model.norm_placement={cfg.model.norm_placement} cannot use "
            "parallel.recompute_method=block (it recomputes a block's MLP layer without its attention "
            "layer, which holds the block input): use parallel.recompute_method=uniform or model.arch=gpt"
        )


def check_world(cfg: MegaspanConfig, world_size: int) -> ParallelLayout:
    """The layout divides the world size and the batch; returns it."""
    if world_size < 1:
        raise ConfigError(f"the world size must be >= 1, got {world_size}")
    m, par, tr = cfg.model, cfg.parallel, cfg.training
    tp, pp, cp, ep = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
        par.expert_model_parallel_size,
    )
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}"
        )
    layout = ParallelLayout.of(cfg, world_size)
    if m.moe.num_experts and world_size % (ep * layout.etp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by EP*ETP*PP for expert parallelism "
            f"(EP={ep}, ETP={layout.etp}, PP={pp})"
        )
    if tr.global_batch_size % layout.samples_per_microbatch_step:
        raise ConfigError(
            f"training.global_batch_size={tr.global_batch_size} is not divisible by "
            f"training.micro_batch_size x data-parallel size = {tr.micro_batch_size} x {layout.dp}"
        )
    if layout.vpp and layout.num_microbatches % pp:
        # The interleaved schedule runs micro-batches in groups of PP per virtual stage.
        raise ConfigError(
            f"the interleaved pipeline schedule needs the number of micro-batches per step "
            f"({layout.num_microbatches} = global_batch_size / (micro_batch_size x DP {layout.dp})) to be a "
            f"multiple of parallel.pipeline_model_parallel_size={pp}"
        )
    return layout


# ---- training -------------------------------------------------------------------------------


def check_schedule(cfg: MegaspanConfig) -> None:
    """Catch what OptimizerParamScheduler would only assert, with a one-line fix."""
    sch, opt = cfg.schedule, cfg.optimizer
    if cfg.training.steps < 1:
        raise ConfigError(f"training.steps must be >= 1, got {cfg.training.steps}")
    if sch.warmup_steps >= decay_steps(cfg):
        raise ConfigError(
            f"schedule.warmup_steps={sch.warmup_steps} must be < the decay steps ({decay_steps(cfg)}): "
            "shorten the warmup or raise schedule.decay_steps/training.steps"
        )
    if opt.min_lr > opt.lr or opt.min_lr < 0:
        raise ConfigError(f"optimizer.min_lr={opt.min_lr} must be in [0, optimizer.lr={opt.lr}]")
    if sch.decay_style == "WSD" and sch.wsd_decay_steps is None:
        raise ConfigError("schedule.decay_style=WSD needs schedule.wsd_decay_steps")
    for key, value in (
        ("training.eval_interval", cfg.training.eval_interval),
        ("logging.log_interval", cfg.logging.log_interval),
        ("checkpoint.save_interval", cfg.checkpoint.save_interval),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("logging.diagnostics_interval", cfg.logging.diagnostics_interval),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def check_checkpoint(cfg: MegaspanConfig) -> None:
    if not cfg.checkpoint.load_optimizer and cfg.checkpoint.resume in ("auto", "none"):
        # With 'auto', every restart of the new run would drop its own optimizer state again.
        raise ConfigError(
            "checkpoint.load_optimizer=false needs checkpoint.resume=<path of the checkpoint to take weights from>"
        )


def check_downstream(cfg: MegaspanConfig) -> None:
    """``eval.downstream``: the settings alone (the task names are checked against lm-eval's task
    list by :func:`megaspan.evaluate.harness.check_downstream_tasks`, which needs the harness)."""
    d = cfg.eval.downstream
    blank = [i for i, task in enumerate(d.tasks) if not task.strip()]
    if blank:
        raise ConfigError(
            f"eval.downstream.tasks[{blank[0]}] is empty: name lm-eval tasks, e.g. "
            "eval.downstream.tasks=[hellaswag,piqa]"
        )
    if not d.tasks:
        for key, value in (
            ("interval", d.interval),
            ("limit", d.limit),
            ("include_path", d.include_path),
            ("num_fewshot", d.num_fewshot),
        ):
            if value is not None:
                raise ConfigError(
                    f"eval.downstream.{key} is set but eval.downstream.tasks is empty: name the tasks, "
                    "e.g. eval.downstream.tasks=[hellaswag,piqa], or drop the setting"
                )
        return
    if cfg.parallel.context_parallel_size > 1:
        raise ConfigError(
            "eval.downstream.tasks with parallel.context_parallel_size > 1 is not supported: score the "
            "run's checkpoints with `megaspan eval` instead"
        )


# ---- the machine: CUDA, Transformer Engine, FP8 ----------------------------------------------

FP8_RECIPE_MIN_TE = {"delayed": None, "tensorwise": "2.2", "blockwise": "2.3", "mxfp8": "2.1"}
"""Transformer Engine versions Megatron-Core (fp8_utils.get_fp8_recipe) needs per FP8 recipe."""

FP8_RECIPE_MIN_CC = {"mxfp8": (10, 0)}
"""GPU compute capability per recipe beyond FP8's own (8.9): MXFP8 block scaling is Blackwell-only."""

FP8_MIN_CC = (8, 9)
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and later."""


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.3.0.dev0+abc' -> (2, 3, 0): the numeric release part (a dev build of 2.3 counts as 2.3,
    as in Megatron's is_te_min_version('2.3.0.dev0'))."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_backend(cfg: MegaspanConfig, caps: Capabilities) -> None:
    """model.transformer_impl=transformer_engine needs TE (and TE needs CUDA)."""
    if cfg.model.transformer_impl != "transformer_engine":
        return
    if not caps.te:
        raise BackendError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not installed: "
            "use the NGC-based image (docker/) or set model.transformer_impl=local"
        )
    if not caps.cuda:
        raise BackendError(
            "model.transformer_impl=transformer_engine needs a CUDA GPU; set model.transformer_impl=local on CPU"
        )


def check_precision(cfg: MegaspanConfig, caps: Capabilities) -> None:
    """FP8: TE present, a GPU with FP8 tensor cores, the recipe's TE version and GPU generation."""
    prec = cfg.precision
    if prec.fp8 is None:
        return
    if not caps.te:
        raise BackendError(
            f"precision.fp8={prec.fp8} needs Transformer Engine: run in the NGC-based image (docker/) "
            "or set precision.fp8=null"
        )
    if not caps.cuda:
        raise BackendError("precision.fp8 needs an H100-class GPU; set precision.fp8=null on CPU")
    if caps.impl(cfg.model.transformer_impl) != "transformer_engine":
        # Megatron-Core's local linears have no FP8 path: fp8_autocast around them runs bf16,
        # which would be trained, benched and labelled as FP8.
        raise ConfigError(
            f"precision.fp8={prec.fp8} runs only on Transformer Engine layers, but model.transformer_impl="
            f"{cfg.model.transformer_impl} resolves to the local backend: set model.transformer_impl="
            "transformer_engine (or auto) or precision.fp8=null"
        )
    recipe = prec.fp8_recipe
    if prec.first_last_layers_bf16 and recipe == "delayed":
        raise ConfigError(
            "precision.first_last_layers_bf16=true does not work with precision.fp8_recipe=delayed "
            "(Megatron-Core refuses it): use fp8_recipe=tensorwise or turn first_last_layers_bf16 off"
        )
    needed = FP8_RECIPE_MIN_TE.get(recipe)
    if needed and caps.te_version and _version_tuple(caps.te_version) < _version_tuple(needed):
        raise BackendError(
            f"precision.fp8_recipe={recipe} needs Transformer Engine >= {needed}, this one is {caps.te_version}: "
            "upgrade TE (the NGC image) or use precision.fp8_recipe=delayed"
        )
    cc = caps.compute_capability
    if cc is None:
        return
    device = caps.device_name or "this GPU"
    if cc < FP8_MIN_CC:
        raise BackendError(
            f"precision.fp8 needs FP8 tensor cores (compute capability >= 8.9, e.g. H100); {device} is "
            f"{cc[0]}.{cc[1]}: set precision.fp8=null"
        )
    min_cc = FP8_RECIPE_MIN_CC.get(recipe)
    if min_cc and cc < min_cc:
        raise BackendError(
            f"precision.fp8_recipe={recipe} needs compute capability >= {min_cc[0]}.{min_cc[1]} (Blackwell); "
            f"{device} is {cc[0]}.{cc[1]}: use precision.fp8_recipe=tensorwise or blockwise"
        )


def check_te_semantics(cfg: MegaspanConfig, caps: Capabilities) -> None:
    """Options whose meaning the TE layers do not honour, refused instead of silently differing."""
    if cfg.data.reset_attention_mask and caps.impl(cfg.model.transformer_impl) == "transformer_engine":
        # The TE layer spec builds causal attention; TE ignores attention_mask for a causal mask
        # type, so document masking would silently be off (while the local backend applies it).
        raise ConfigError(
            "data.reset_attention_mask=true (document masking) is not applied by Transformer Engine "
            "attention (causal mask type): set data.reset_attention_mask=false or model.transformer_impl=local"
        )


def check_gpu_only_features(cfg: MegaspanConfig, caps: Capabilities) -> None:
    """Features Megatron runs only with CUDA kernels (TE attention, grouped GEMM)."""
    te = caps.impl(cfg.model.transformer_impl) == "transformer_engine"
    if cfg.model.moe.num_experts and cfg.model.moe.permute_fusion and not te:
        raise ConfigError(
            "model.moe.permute_fusion=true needs Transformer Engine on a GPU (its fused permute kernels): "
            "set it to null (auto) or false"
        )
    if cfg.parallel.context_parallel_size > 1 and not te:
        raise ConfigError(
            "parallel.context_parallel_size > 1 needs Transformer Engine attention on GPUs: set it to 1, "
            "or model.transformer_impl=transformer_engine (or auto) on a GPU with TE"
        )
    if caps.cuda:
        return
    if cfg.model.moe.num_experts and cfg.model.moe.grouped_gemm:
        raise ConfigError("model.moe.grouped_gemm=true needs a GPU; set it to false on CPU")


_CONFIG_CHECKS: tuple[Callable[[MegaspanConfig], None], ...] = (
    check_placement,
    check_ranges,
    check_sizes,
    check_attention_and_tp,
    check_parallel_options,
    check_hybrid,
    check_moe,
    check_positions,
    check_pipeline,
    check_checkpoint,
    check_schedule,
    check_fp8_shapes,
    check_downstream,
)
"""Checks of the config alone, in the order they run (the first failure is reported)."""

_MACHINE_CHECKS: tuple[Callable[[MegaspanConfig, Capabilities], None], ...] = (
    check_backend,
    check_precision,
    check_te_semantics,
    check_gpu_only_features,
)
"""Checks of the config against the machine (skipped when capabilities are unknown)."""
