"""The parallel layout of a run as one frozen value: the only place the dp / micro-batch
arithmetic is written. :func:`megaspan.config.validate` returns it after checking that it is
consistent; ``megaspan plan`` and the trainer read it."""

from __future__ import annotations

from dataclasses import dataclass

from megaspan.config.schema import MegaspanConfig


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    vpp: int | None
    """Virtual pipeline stages per rank (None = not interleaved)."""
    cp: int
    """Context-parallel size."""
    ep: int
    """Expert-parallel size."""
    etp: int
    """Expert tensor-parallel size (defaults to TP)."""
    dp: int
    """Data-parallel size of the dense part: world / (TP x PP x CP)."""
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    """Micro-batches per optimizer step on each DP rank: global / (micro x DP)."""

    @classmethod
    def of(cls, cfg: MegaspanConfig, world_size: int) -> ParallelLayout:
        """The layout ``cfg`` asks for on ``world_size`` ranks. No checks: use
        :func:`megaspan.config.validate`, which refuses layouts where the divisions are not exact."""
        par, tr = cfg.parallel, cfg.training
        tp, pp, cp = (
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.context_parallel_size,
        )
        dp = max(world_size // (tp * pp * cp), 1)
        return cls(
            world_size=world_size,
            tp=tp,
            pp=pp,
            vpp=par.virtual_pipeline_model_parallel_size,
            cp=cp,
            ep=par.expert_model_parallel_size,
            etp=par.expert_tensor_parallel_size or tp,
            dp=dp,
            micro_batch_size=tr.micro_batch_size,
            global_batch_size=tr.global_batch_size,
            num_microbatches=max(tr.global_batch_size // (tr.micro_batch_size * dp), 1),
        )

    @property
    def model_parallel(self) -> int:
        """Ranks holding one copy of the dense model: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights: world / (ETP x EP x PP)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def ranks_per_stage(self) -> int:
        """Ranks in one pipeline stage (Megatron orders ranks tp-cp-(ep-)dp-pp: stages are outermost)."""
        return self.world_size // self.pp

    @property
    def samples_per_microbatch_step(self) -> int:
        """Samples one micro-batch step consumes over all DP ranks: micro x DP."""
        return self.micro_batch_size * self.dp
