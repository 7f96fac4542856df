"""Context parallelism feeds each CP rank its own part of every sequence (2 real gloo ranks).

CP attention itself needs Transformer Engine on GPUs (tools/gpu_check.sh trains CP2 against one
GPU's losses); what a CPU can check is everything around it: the feeder's split, done by
Megatron-Core's ``get_batch_on_this_cp_rank`` on the real CP group, against the load-balanced
layout written out here by hand, and the loss report that must count every CP rank's tokens.
Before the fix every CP rank trained on the whole sequence, and only CP rank 0's loss was reported.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

SEQ, MICRO, SAMPLES = 16, 2, 4


class Samples:
    """A map-style dataset of GPTDataset-shaped samples whose values name their position."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = torch.arange(SEQ) + 100 * i
        return {
            "tokens": tokens,
            "labels": tokens + 1,
            "loss_mask": torch.ones(SEQ),
            "position_ids": torch.arange(SEQ),
        }


def expected_part(full: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Chunks ``rank`` and ``2 cp - 1 - rank`` of the sequence dimension (dim 1), concatenated."""
    chunks = full.chunk(2 * cp, dim=1)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=1)


def cp_worker(rank: int, world_size: int) -> dict:
    from megaspan import runtime
    from megaspan.config import load_config
    from megaspan.training.batches import micro_batches
    from megaspan.training.build import rank_position
    from megaspan.training.trainer import _reduce_reported

    cfg = load_config(None, ["parallel.context_parallel_size=2", f"training.micro_batch_size={MICRO}"])
    runtime.initialize_model_parallel(cfg.parallel, seed=1)
    try:
        batches = micro_batches(Samples(), 0, MICRO, 0, 1, torch.device("cpu"), prefetch=0)
        got = [next(batches) for _ in range(SAMPLES // MICRO)]
        position = rank_position(cfg)
        # Each CP rank reports its own token loss sum and count: the reduced pair covers the whole
        # sequence (SEQ tokens x MICRO samples), not just CP rank 0's half.
        losses = [
            {"lm loss": torch.tensor([float(b["loss_mask"].sum()), float(b["loss_mask"].numel())])}
            for b in got
        ]
        total = _reduce_reported(losses, position, torch.device("cpu"))
        return {"batches": got, "reports": position.reports_loss, "total": total}
    finally:
        runtime.destroy_model_parallel()


def test_each_cp_rank_gets_its_load_balanced_chunks(dist_pool):
    results = dist_pool(2).run(cp_worker, timeout=120)
    data = Samples()
    for cp_rank, result in enumerate(results):
        assert result["reports"], f"CP rank {cp_rank} does not report its loss"
        for step, batch in enumerate(result["batches"]):
            full = {k: torch.stack([data[step * MICRO + j][k] for j in range(MICRO)]) for k in data[0]}
            for key in full:
                torch.testing.assert_close(batch[key], expected_part(full[key], 2, cp_rank), rtol=0, atol=0)
            assert batch["tokens"].shape == (MICRO, SEQ // 2)
        # Two steps of MICRO x SEQ/2 tokens on each of the 2 CP ranks.
        assert result["total"][1].item() == 2 * 2 * MICRO * SEQ / 2
    # The two ranks' parts are disjoint and cover the sequence.
    tokens = torch.cat([r["batches"][0]["tokens"] for r in results], dim=1).sort(dim=1).values
    torch.testing.assert_close(tokens, torch.stack([data[j]["tokens"] for j in range(MICRO)]))
