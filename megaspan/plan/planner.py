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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from megaspan.config import Capabilities, ParallelLayout, validate
from megaspan.config.schema import MegaspanConfig
from megaspan.plan.counts import Shard, check_symmetric, shard_at, single_device_count
from megaspan.plan.memory import Memory, estimate_memory

# torch, Megatron and megaspan.models are imported inside the functions: `megaspan --help` must
# stay fast.

GIB = 1024**3


@dataclass
class StagePlan:
    stage: int
    rank: int  # the representative global rank (TP rank 0, EP rank 0, DP rank 0)
    shard: Shard
    memory: Memory


@dataclass
class Plan:
    layout: ParallelLayout
    vocab_size: int  # padded
    stages: list[StagePlan] = field(default_factory=list)
    single_device_params: int = 0

    @property
    def sharded_total(self) -> int:
        return sum(s.shard.unique for s in self.stages)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sharded_total"] = self.sharded_total
        out["layout"]["expert_dp"] = self.layout.expert_dp
        for stage, plan in zip(out["stages"], self.stages):
            stage["shard"]["total"] = plan.shard.total
            stage["memory"]["total"] = plan.memory.total
        return out


def plan(cfg: MegaspanConfig, world_size: int) -> Plan:
    """Validate ``cfg`` for ``world_size`` GPUs and size every pipeline stage.

    Must run in a process without a live process group (it creates fake ones). On a machine
    without CUDA the caller switches on the CPU emulation first (``megaspan.runtime.setup_cpu()``,
    as ``megaspan plan`` does): entry points decide it, not library calls.
    """
    # The layout is meant for GPUs: judge it by GPU rules (CP, grouped GEMM, a TE backend) even on
    # a laptop. validate() also runs the schedule checks, so `plan` refuses what `train` refuses.
    layout = validate(cfg, world_size, Capabilities.gpu())
    with _quiet_megatron():
        return _plan(cfg, layout)


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


def _plan(cfg: MegaspanConfig, layout: ParallelLayout) -> Plan:
    from megaspan.models.mcore_config import model_vocab_size

    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    result = Plan(layout=layout, vocab_size=model_vocab_size(cfg, vocab, layout.tp))
    for stage in range(layout.pp):
        rank = stage * layout.ranks_per_stage  # TP, CP, EP and DP rank 0 of the stage
        shard = shard_at(cfg, vocab, layout, rank)
        if stage == 0:
            check_symmetric(cfg, vocab, layout, shard)
        result.stages.append(
            StagePlan(stage, rank, shard, estimate_memory(cfg, layout, shard, stage, result.vocab_size))
        )
    result.single_device_params = single_device_count(cfg, vocab)
    return result
