"""Per-GPU memory estimate: weights, gradients and Adam state from the parameter counts,
activations after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models") with fused/flash attention, times the micro-batches a 1F1B (or interleaved) stage keeps in
flight."""

from __future__ import annotations

from dataclasses import dataclass

from megaspan.config import ParallelLayout, ffn_hidden_size
from megaspan.config.schema import MegaspanConfig
from megaspan.plan.counts import Shard


@dataclass
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def _activation_bytes_per_layer(cfg: MegaspanConfig, layout: ParallelLayout) -> float:
    """Korthikanti et al. 2022, eq. 1-5, with 2-byte activations and fused attention (no s^2 term).

    Dense layer: s*b*h*34, split over TP except 10*sbh without sequence parallelism; MoE layers
    scale the MLP's 19*sbh by top-k and the expert FFN size relative to 4h.
    """
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


def _layers_in_flight(layout: ParallelLayout, stage: int, layers_on_rank: int) -> float:
    """Layer-activations a pipeline stage keeps at its peak (1F1B warm-up depth)."""
    if layout.pp == 1:
        return layers_on_rank
    if layout.vpp:
        # Interleaved warm-up: (pp - stage - 1) * 2 + (vpp - 1) * pp + 1 chunk-micro-batches.
        chunks = min(
            (layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp + 1,
            layout.num_microbatches * layout.vpp,
        )
        return chunks * layers_on_rank / layout.vpp
    return min(layout.pp - stage, layout.num_microbatches) * layers_on_rank


def estimate_memory(
    cfg: MegaspanConfig, layout: ParallelLayout, shard: Shard, stage: int, vocab: int
) -> Memory:
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
    activations = _activation_bytes_per_layer(cfg, layout) * _layers_in_flight(
        layout, stage, len(shard.layers)
    )
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
