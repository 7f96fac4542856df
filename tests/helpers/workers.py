"""Per-rank functions for the multi-process tests (module-level so spawned ranks can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaspan.models import build_model
from megaspan.runtime import initialize_model_parallel
from tests.helpers.models import VOCAB, tiny_cfg


def fixed_batch(seq=16, batch=2):
    g = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), position_ids


def full_tensor(name: str, param, tensor, gated: bool):
    """Undo TP sharding of ``tensor`` (a gradient or optimizer moment shaped like ``param``) so it
    can be compared with the TP=1 one. Collective over the parameter's (expert) TP group."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    is_expert = ".experts." in name
    group = ps.get_expert_tensor_parallel_group() if is_expert else ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    dim = param.partition_dim
    if gated and "linear_fc1" in name:
        # Each rank's SwiGLU fc1 shard is [gate_i; up_i]; the full weight is [gate; up].
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def loss_and_grads(rank, world_size, tp: int, cases):
    """Loss and full (un-sharded) gradients of one fwd/bwd per (placement, moe) case."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    results = {}
    for placement, moe in cases:
        extra = [
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
        ]
        cfg = tiny_cfg(placement, moe, extra=extra)
        initialize_model_parallel(cfg.parallel, seed=1234)
        built = build_model(cfg, vocab_size=VOCAB)
        model = DistributedDataParallel(
            config=built.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=built.chunks[0],
        )
        tokens, labels, position_ids = fixed_batch()
        loss = model(tokens, position_ids, None, labels=labels).mean()
        loss.backward()
        model.finish_grad_sync()
        finalize_model_grads([model])
        grads = {
            name: full_tensor(name, p, p.main_grad, built.config.gated_linear_unit)
            for name, p in model.module.named_parameters()
        }
        results[(placement, moe)] = (loss.item(), grads if rank == 0 else None)
    return results


def pipeline_layouts(rank, world_size, cases):
    """{(placement, extra): pipeline_layout(...)} for several cases in one set of processes."""
    return {(placement, extra): pipeline_layout(placement, extra) for placement, extra in cases}


def pipeline_layout(placement, extra):
    """Per local layer: global layer_number, plan, built norm slot types, LNS scale."""
    cfg = tiny_cfg(placement, False, extra=extra)
    initialize_model_parallel(cfg.parallel, seed=1234)
    built = build_model(cfg, vocab_size=VOCAB)
    layers = []
    for chunk in built.chunks:
        for layer in chunk.decoder.layers:
            layers.append(
                dict(
                    number=layer.layer_number,
                    plan=layer.plan,
                    input_norm=type(layer.input_layernorm).__name__,
                    post_attn_norm=type(layer.post_attn_norm).__name__,
                    scale=getattr(layer.input_layernorm, "output_scale", 1.0),
                )
            )
    return layers


def interleaved_ddp_wiring(rank, world_size):
    """PP2 x VPP2 with ``parallel.overlap_grad_reduce``, built by megaspan's own path: per model
    chunk, whether its DDP buckets its gradients, and whether the TransformerConfig hands the
    interleaved schedule the list of every chunk's ``no_sync`` (in chunk order)."""
    from megaspan.config.loader import load_config
    from megaspan.training.setup import build_training_objects
    from tests.helpers.models import tiny_overrides

    cfg = load_config(
        None,
        tiny_overrides(
            extra=(
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "parallel.overlap_grad_reduce=true",
            )
        ),
    )
    initialize_model_parallel(cfg.parallel, seed=1234)
    built = build_training_objects(cfg, VOCAB)
    no_sync = built.config.no_sync_func
    return dict(
        chunks=len(built.model),
        bucketed=[chunk.bucket_size is not None for chunk in built.model],
        no_sync_is_the_chunk_list=isinstance(no_sync, list)
        and len(no_sync) == len(built.model)
        and all(f == chunk.no_sync for f, chunk in zip(no_sync, built.model)),
    )
