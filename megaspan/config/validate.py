"""Cross-field validation: one-line errors that name the key and the fix.

Runs before any process group or model exists, so a bad layout fails in milliseconds instead of
as a Megatron assertion deep inside model construction.
"""

from __future__ import annotations

from megaspan.config.loader import ConfigError
from megaspan.config.schema import MegaspanConfig
from megaspan.config.derived import ffn_hidden_size


def validate(cfg: MegaspanConfig, world_size: int | None = None, cuda: bool | None = None) -> None:
    """Raise :class:`ConfigError` for the first inconsistency found."""
    import torch

    from megaspan.norms import UnknownPlacementError, get_placement_class

    if cuda is None:
        cuda = torch.cuda.is_available()
    m, par, prec, tr = cfg.model, cfg.parallel, cfg.precision, cfg.training
    try:
        get_placement_class(m.norm_placement)
    except UnknownPlacementError as exc:
        raise ConfigError(str(exc)) from None

    for key, value in (
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.seq_length", m.seq_length),
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

    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    tp, pp, ep, cp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.expert_model_parallel_size,
        par.context_parallel_size,
    )
    if m.hidden_size % heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={heads}"
        )
    if heads % groups:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}")
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
    _validate_parallel_options(cfg)
    if m.moe.num_experts:
        if m.moe.num_experts % ep:
            raise ConfigError(
                f"model.moe.num_experts={m.moe.num_experts} is not divisible by "
                f"parallel.expert_model_parallel_size={ep}"
            )
        if m.moe.router_topk > m.moe.num_experts:
            raise ConfigError(f"model.moe.router_topk={m.moe.router_topk} > model.moe.num_experts={m.moe.num_experts}")
        if tp > 1 and not par.sequence_parallel:
            raise ConfigError(
                "MoE with parallel.tensor_model_parallel_size > 1 needs parallel.sequence_parallel=true "
                "(Megatron-Core refuses MoE+TP without SP)"
            )
        etp = par.expert_tensor_parallel_size or tp
        expert_ffn = m.moe.ffn_hidden_size or ffn
        if expert_ffn % etp:
            raise ConfigError(
                f"the expert FFN size {expert_ffn} (model.moe.ffn_hidden_size) is not divisible by the "
                f"expert tensor-parallel size {etp} (parallel.expert_tensor_parallel_size, default = TP)"
            )
        if m.moe.grouped_gemm and not cuda:
            raise ConfigError("model.moe.grouped_gemm=true needs a GPU; set it to false on CPU")
    elif ep > 1:
        raise ConfigError("parallel.expert_model_parallel_size > 1 needs an MoE model (set model.moe.num_experts)")
    elif par.expert_tensor_parallel_size is not None:
        raise ConfigError("parallel.expert_tensor_parallel_size needs an MoE model (set model.moe.num_experts)")
    if cp > 1 and not cuda:
        raise ConfigError(
            "parallel.context_parallel_size > 1 needs Transformer Engine attention on GPUs; set it to 1 on CPU"
        )
    if cp > 1 and m.seq_length % (2 * cp):
        # Load-balanced CP gives each rank two chunks of the sequence (one early, one late).
        raise ConfigError(
            f"model.seq_length={m.seq_length} is not divisible by 2 x parallel.context_parallel_size = {2 * cp}"
        )
    if prec.fp8 is not None:
        from megaspan.models.backend import te_available

        if not te_available():
            raise ConfigError(
                f"precision.fp8={prec.fp8} needs Transformer Engine: run in the NGC-based image (docker/) "
                "or set precision.fp8=null"
            )
        if not cuda:
            raise ConfigError("precision.fp8 needs an H100-class GPU; set precision.fp8=null on CPU")
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"model.seq_length={m.seq_length} > model.max_position_embeddings={m.max_position_embeddings}: "
            "raise max_position_embeddings or shorten seq_length"
        )
    _validate_pipeline(cfg)
    if not cfg.checkpoint.load_optimizer and cfg.checkpoint.resume in ("auto", "none"):
        # With 'auto', every restart of the new run would drop its own optimizer state again.
        raise ConfigError(
            "checkpoint.load_optimizer=false needs checkpoint.resume=<path of the checkpoint to take weights from>"
        )
    if world_size is not None:
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {model_parallel}"
            )
        dp = world_size // model_parallel
        if m.moe.num_experts and (world_size % (ep * (par.expert_tensor_parallel_size or tp) * pp)):
            raise ConfigError(
                f"world size {world_size} is not divisible by EP*ETP*PP for expert parallelism "
                f"(EP={ep}, ETP={par.expert_tensor_parallel_size or tp}, PP={pp})"
            )
        if tr.global_batch_size % (tr.micro_batch_size * dp):
            raise ConfigError(
                f"training.global_batch_size={tr.global_batch_size} is not divisible by "
                f"training.micro_batch_size x data-parallel size = {tr.micro_batch_size} x {dp}"
            )
        microbatches = tr.global_batch_size // (tr.micro_batch_size * dp)
        if par.virtual_pipeline_model_parallel_size and microbatches % pp:
            # The interleaved schedule runs micro-batches in groups of PP per virtual stage.
            raise ConfigError(
                f"the interleaved pipeline schedule needs the number of micro-batches per step "
                f"({microbatches} = global_batch_size / (micro_batch_size x DP {dp})) to be a multiple of "
                f"parallel.pipeline_model_parallel_size={pp}"
            )


def _or_one(value: int | None) -> int:
    """An optional size: None means 'unset' (valid), but an explicit 0 must still be rejected."""
    return 1 if value is None else value


def _validate_pipeline(cfg: MegaspanConfig) -> None:
    par, layers = cfg.parallel, cfg.model.num_layers
    pp, vp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    if vp is not None and pp == 1:
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
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


def _validate_parallel_options(cfg: MegaspanConfig) -> None:
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
