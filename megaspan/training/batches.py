"""Deterministic, resumable, data-parallel micro-batch iteration over a map-style dataset.

Megatron's ``MegatronPretrainingSampler`` lives in ``megatron.training`` (GPU-only code), so this
is the same sampling rule written small: the global sample order is the dataset's own index order
(``GPTDataset`` already shuffles deterministically from the seed), each step consumes one global
batch of ``micro_batch_size * dp_size * num_microbatches`` consecutive indices, and data-parallel
rank ``r`` takes slice ``r`` of every ``micro_batch_size * dp_size`` block. The position is a
single integer (``consumed_samples``), which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def micro_batch_indices(
    consumed_samples: int, total_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[range]:
    """Index ranges of this rank's micro-batches, starting at ``consumed_samples``.

    Stops before a block that does not fit completely, so every rank yields the same number of
    micro-batches (a ragged tail would hang the data-parallel gradient reduction).
    """
    block = micro_batch_size * dp_size
    start = consumed_samples
    while start + block <= total_samples:
        first = start + dp_rank * micro_batch_size
        yield range(first, first + micro_batch_size)
        start += block


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Stack per-sample tensors (GPTDataset yields torch tensors or numpy arrays) into a batch."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def micro_batches(
    dataset: Any,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
) -> Iterator[Batch]:
    """This rank's micro-batches from ``consumed_samples`` on, as tensors on ``device``."""
    for indices in micro_batch_indices(
        consumed_samples, len(dataset), micro_batch_size, dp_rank, dp_size
    ):
        batch = collate([dataset[i] for i in indices])
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}
