"""``megaspan plan``: validate a parallel layout and size it per GPU, without GPUs, in seconds.

How the numbers are obtained, and why:

* parameter counts come from the real model, not a formula: for one representative rank of every
  pipeline stage, this process joins a *fake* process group of the full world size (torch's
  ``fake`` backend, as Megatron-LM's ``--fake-process-group``), initializes Megatron's parallel
  state for that rank and builds its ``GPTModel`` chunks on the ``meta`` device (shapes only, no
  memory). Placement-specific norms, tied embeddings, padded vocabularies and Megatron's own
  layer-to-stage assignment (uneven first/last stages, virtual stages) are therefore exactly what
  training would build;
* TP and EP ranks of a stage hold equally shaped shards (Megatron requires the divisibility that
  :func:`megaspan.config.validate.validate` checks); the plan builds the last TP/EP rank of stage
  0 as well and checks that it matches rank 0, so the per-stage totals can be multiplied out;
* the sum over distinct shards is compared with a single-device (TP=PP=EP=1) meta build;
* memory is an estimate: weights, gradients and Adam state from the counts, activations from
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") with
  fused/flash attention, times the micro-batches a 1F1B (or interleaved) stage keeps in flight.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from megaspan.config.loader import ConfigError
from megaspan.config.schema import MegaspanConfig

# torch, Megatron and megaspan.models are imported inside the functions: the CLI
# registers this command on every start, and `megaspan --help` must stay fast.

GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vpp: int | None
    ep: int
    etp: int
    cp: int
    dp: int
    expert_dp: int
    num_microbatches: int


@dataclass
class Shard:
    """Parameters held by one rank (all its virtual-stage chunks)."""

    layers: list[int]  # global layer numbers (1-based)
    dense: int  # non-expert parameters, including embeddings and a tied output copy
    expert: int
    unique: int  # this rank's contribution to the model, times its TP/EP multiplicity

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class StagePlan:
    stage: int
    rank: int  # the representative global rank (TP rank 0, EP rank 0, DP rank 0)
    shard: Shard
    memory: Memory


@dataclass
class Plan:
    layout: Layout
    vocab_size: int  # padded
    stages: list[StagePlan] = field(default_factory=list)
    single_device_params: int = 0

    @property
    def sharded_total(self) -> int:
        return sum(s.shard.unique for s in self.stages)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sharded_total"] = self.sharded_total
        for stage, plan in zip(out["stages"], self.stages):
            stage["shard"]["total"] = plan.shard.total
            stage["memory"]["total"] = plan.memory.total
        return out


# ---- layout ---------------------------------------------------------------------------------


def layout_of(cfg: MegaspanConfig, world_size: int) -> Layout:
    par, tr = cfg.parallel, cfg.training
    tp, pp, cp, ep = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
        par.expert_model_parallel_size,
    )
    etp = par.expert_tensor_parallel_size or tp
    dp = world_size // (tp * pp * cp)
    return Layout(
        world=world_size, tp=tp, pp=pp, vpp=par.virtual_pipeline_model_parallel_size, ep=ep, etp=etp,
        cp=cp, dp=dp, expert_dp=world_size // (etp * ep * pp),
        num_microbatches=tr.global_batch_size // (tr.micro_batch_size * dp),
    )


@contextlib.contextmanager
def fake_rank(cfg: MegaspanConfig, world_size: int, rank: int) -> Iterator[None]:
    """Be ``rank`` of a ``world_size`` fake process group with Megatron's parallel state set."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megaspan.runtime.distributed import parallel_sizes

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        # The fake backend has no gloo counterpart to create.
        ps.initialize_model_parallel(**parallel_sizes(cfg.parallel), create_gloo_process_groups=False)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


# ---- parameter counts -----------------------------------------------------------------------


def _build_meta(cfg: MegaspanConfig, vocab_size: int) -> list:
    """This (fake) rank's model chunks with shapes only."""
    import torch

    from megaspan.models import build_model

    # cuda=False keeps Megatron on its CPU-initialization path, which the meta device turns
    # into shape-only allocations; the counts do not depend on the backend (local and TE specs
    # hold the same parameters).
    with torch.device("meta"):
        return build_model(cfg, vocab_size, init_rules=False, cuda=False).chunks


def _is_tied_copy(chunk, param) -> bool:
    """The last stage's copy of tied word embeddings (counted in memory, not in the model)."""
    return not chunk.pre_process and bool(getattr(param, "shared_embedding", False))


def count_shard(chunks: list, layout: Layout) -> Shard:
    dense = expert = unique = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            n = param.numel()
            is_expert = ".experts." in name
            split = getattr(param, "tensor_model_parallel", False)
            if is_expert:
                expert += n
                multiplicity = layout.ep * (layout.etp if split else 1)
            else:
                dense += n
                multiplicity = layout.tp if split else 1
            if not _is_tied_copy(chunk, param):
                unique += n * multiplicity
    layers = [layer.layer_number for chunk in chunks for layer in chunk.decoder.layers]
    return Shard(layers=layers, dense=dense, expert=expert, unique=unique)


def _shard_at(cfg: MegaspanConfig, vocab: int, layout: Layout, rank: int) -> Shard:
    from megatron.core import parallel_state as ps

    with fake_rank(cfg, layout.world, rank):
        # Megatron orders ranks tp-cp-(ep-)dp-pp: pipeline stages are the outermost blocks.
        stage = ps.get_pipeline_model_parallel_rank()
        assert stage == rank // (layout.world // layout.pp), (rank, stage)
        return count_shard(_build_meta(cfg, vocab), layout)


def _check_symmetric(cfg: MegaspanConfig, vocab: int, layout: Layout, first: Shard) -> None:
    """The last rank of stage 0 (last TP, EP and DP rank) holds as many parameters as rank 0."""
    if layout.tp == 1 and layout.ep == 1:
        return
    last = _shard_at(cfg, vocab, layout, layout.world // layout.pp - 1)
    if (last.dense, last.expert, last.unique) != (first.dense, first.expert, first.unique):
        raise ConfigError(
            f"ranks 0 and {layout.world // layout.pp - 1} of pipeline stage 0 hold different shard sizes "
            f"({first.total} vs {last.total}); the layout does not split the model evenly"
        )


def single_device_count(cfg: MegaspanConfig, vocab_size: int) -> int:
    """Parameters of the same model at TP=PP=EP=1 (a one-rank meta build)."""
    import copy

    single = copy.deepcopy(cfg)
    single.parallel = type(cfg.parallel)()
    with fake_rank(single, 1, 0):
        return sum(p.numel() for chunk in _build_meta(single, vocab_size) for p in chunk.parameters())


# ---- memory ---------------------------------------------------------------------------------


def _activation_bytes_per_layer(cfg: MegaspanConfig, layout: Layout) -> float:
    """Korthikanti et al. 2022, eq. 1-5, with 2-byte activations and fused attention (no s^2 term).

    Dense layer: s*b*h*34, split over TP except 10*sbh without sequence parallelism; MoE layers
    scale the MLP's 19*sbh by top-k and the expert FFN size relative to 4h.
    """
    from megaspan.config.derived import ffn_hidden_size

    m, par = cfg.model, cfg.parallel
    sbh = (m.seq_length / layout.cp) * cfg.training.micro_batch_size * m.hidden_size
    mlp = 19.0
    if m.moe.num_experts:
        mlp *= m.moe.router_topk * (m.moe.ffn_hidden_size or ffn_hidden_size(m)) / (4 * m.hidden_size)
    other = 15.0  # attention (11) + norms (4)
    if par.recompute_granularity == "full":
        return 2.0 * sbh / (layout.tp if par.sequence_parallel else 1)
    if par.sequence_parallel:
        return sbh * (other + mlp) / layout.tp
    return sbh * (10.0 + (other - 10.0 + mlp) / layout.tp)


def _layers_in_flight(layout: Layout, stage: int, layers_on_rank: int) -> float:
    """Layer-activations a pipeline stage keeps at its peak (1F1B warm-up depth)."""
    if layout.pp == 1:
        return layers_on_rank
    if layout.vpp:
        # Interleaved warm-up: (pp - stage - 1) * 2 + (vpp - 1) * pp + 1 chunk-micro-batches.
        chunks = min((layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp + 1, layout.num_microbatches * layout.vpp)
        return chunks * layers_on_rank / layout.vpp
    return min(layout.pp - stage, layout.num_microbatches) * layers_on_rank


def estimate_memory(cfg: MegaspanConfig, layout: Layout, shard: Shard, stage: int, vocab: int) -> Memory:
    import torch

    from megaspan.models.mcore_config import resolve_dtype

    dtype = resolve_dtype(cfg.precision, cuda=True)
    weight_bytes = torch.finfo(dtype).bits // 8
    grad_bytes = 4 if cfg.precision.grad_reduce_in_fp32 else weight_bytes
    # Adam: two fp32 moments, plus an fp32 master copy when the weights are 16-bit.
    optim_bytes = 8 + (4 if weight_bytes < 4 else 0)
    dense_optim, expert_optim = shard.dense * optim_bytes, shard.expert * optim_bytes
    if cfg.parallel.use_distributed_optimizer:
        dense_optim /= layout.dp * layout.cp
        expert_optim /= layout.expert_dp
    activations = _activation_bytes_per_layer(cfg, layout) * _layers_in_flight(layout, stage, len(shard.layers))
    if stage == layout.pp - 1:
        # fp32 logits of one micro-batch for the cross entropy.
        tokens = cfg.model.seq_length / layout.cp * cfg.training.micro_batch_size
        activations += 4.0 * tokens * vocab / layout.tp
    return Memory(
        weights=float(shard.total * weight_bytes),
        grads=float(shard.total * grad_bytes),
        optimizer=float(dense_optim + expert_optim),
        activations=float(activations),
    )


# ---- plan -----------------------------------------------------------------------------------


def plan(cfg: MegaspanConfig, world_size: int) -> Plan:
    """Validate ``cfg`` for ``world_size`` GPUs and size every pipeline stage.

    Must run in a process without a live process group (it creates fake ones).
    """
    from megaspan.config.validate import validate
    from megaspan.runtime import cpu_compat

    # The layout is meant for GPUs: judge it by GPU rules (CP, grouped GEMM) even on a laptop.
    validate(cfg, world_size, cuda=True)
    cpu_compat.apply()
    with _quiet_megatron():
        return _plan(cfg, world_size)


@contextlib.contextmanager
def _quiet_megatron() -> Iterator[None]:
    """Megatron logs a deprecation notice per GPTModel and warns about config defaults; one per
    built rank would bury the plan."""
    import logging
    import warnings

    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _plan(cfg: MegaspanConfig, world_size: int) -> Plan:
    from megaspan.models.mcore_config import padded_vocab_size

    layout = layout_of(cfg, world_size)
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    result = Plan(layout=layout, vocab_size=padded_vocab_size(vocab, layout.tp))
    for stage in range(layout.pp):
        rank = stage * (world_size // layout.pp)  # TP, CP, EP and DP rank 0 of the stage
        shard = _shard_at(cfg, vocab, layout, rank)
        if stage == 0:
            _check_symmetric(cfg, vocab, layout, shard)
        result.stages.append(StagePlan(stage, rank, shard, estimate_memory(cfg, layout, shard, stage, result.vocab_size)))
    result.single_device_params = single_device_count(cfg, vocab)
    return result


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return "-"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [math.inf]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(runs)


def format_plan(p: Plan) -> str:
    lay = p.layout
    vpp = f" x VPP{lay.vpp}" if lay.vpp else ""
    lines = [
        f"layout: {lay.world} GPUs = TP{lay.tp} x PP{lay.pp}{vpp} x CP{lay.cp} x DP{lay.dp}; "
        f"experts: EP{lay.ep} x ETP{lay.etp} x expert-DP{lay.expert_dp}; "
        f"{lay.num_microbatches} micro-batches per step per DP rank; padded vocab {p.vocab_size}",
        "per GPU (every TP rank and EP rank of a stage holds the same counts):",
        f"{'stage':>5} {'rank':>6} {'layers':>14} {'params':>9} {'dense':>9} {'expert':>9} "
        f"{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total GiB':>9}",
    ]
    for s in p.stages:
        mem = s.memory
        lines.append(
            f"{s.stage:>5} {s.rank:>6} {_layer_range(s.shard.layers):>14} {_fmt_count(s.shard.total):>9} "
            f"{_fmt_count(s.shard.dense):>9} {_fmt_count(s.shard.expert):>9} "
            + " ".join(f"{v / GIB:>8.2f}" for v in (mem.weights, mem.grads, mem.optimizer, mem.activations))
            + f" {mem.total / GIB:>9.2f}"
        )
    verdict = "==" if p.sharded_total == p.single_device_params else "!="
    lines.append(
        f"model parameters: sum over distinct shards {p.sharded_total:,} {verdict} "
        f"single-device build {p.single_device_params:,}"
    )
    lines.append(
        "memory is an estimate: weights/grads/Adam from the counts, activations after Korthikanti et al. "
        "2022 (fused attention, peak 1F1B depth); allocator overhead and buffers are not included"
    )
    return "\n".join(lines)
