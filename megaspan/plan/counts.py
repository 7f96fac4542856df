"""Parameter counts per rank from real meta-device builds in a fake process group.

For one representative rank of every pipeline stage, this process joins a *fake* process group of
the full world size (torch's ``fake`` backend, as Megatron-LM's ``--fake-process-group``),
initializes Megatron's parallel state for that rank and builds its ``GPTModel`` chunks on the
``meta`` device (shapes only, no memory). torch and Megatron are imported inside the functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from megaspan.config import ParallelLayout
from megaspan.config.schema import MegaspanConfig
from megaspan.errors import ConfigError


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


def count_shard(chunks: list, layout: ParallelLayout) -> Shard:
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
    # Blocks, also for model.arch=hybrid, whose two layers per block carry the block's number.
    layers = list(
        dict.fromkeys(
            getattr(layer, "block_number", layer.layer_number)
            for chunk in chunks
            for layer in chunk.decoder.layers
        )
    )
    return Shard(layers=layers, dense=dense, expert=expert, unique=unique)


def shard_at(cfg: MegaspanConfig, vocab: int, layout: ParallelLayout, rank: int) -> Shard:
    from megatron.core import parallel_state as ps

    with fake_rank(cfg, layout.world_size, rank):
        # Megatron orders ranks tp-cp-(ep-)dp-pp: pipeline stages are the outermost blocks.
        stage = ps.get_pipeline_model_parallel_rank()
        assert stage == rank // (layout.ranks_per_stage), (rank, stage)
        return count_shard(_build_meta(cfg, vocab), layout)


def check_symmetric(cfg: MegaspanConfig, vocab: int, layout: ParallelLayout, first: Shard) -> None:
    """The last rank of stage 0 (last TP, EP and DP rank) holds as many parameters as rank 0."""
    if layout.tp == 1 and layout.ep == 1:
        return
    last = shard_at(cfg, vocab, layout, layout.ranks_per_stage - 1)
    if (last.dense, last.expert, last.unique) != (first.dense, first.expert, first.unique):
        raise ConfigError(
            f"ranks 0 and {layout.ranks_per_stage - 1} of pipeline stage 0 hold different shard sizes "
            f"({first.total} vs {last.total}); the layout does not split the model evenly"
        )


def single_device_count(cfg: MegaspanConfig, vocab_size: int) -> int:
    """Parameters of the same model at TP=PP=EP=1 (a one-rank meta build)."""
    import copy

    single = copy.deepcopy(cfg)
    single.parallel = type(cfg.parallel)()
    with fake_rank(single, 1, 0):
        return sum(p.numel() for chunk in _build_meta(single, vocab_size) for p in chunk.parameters())
