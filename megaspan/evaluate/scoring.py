"""Per-token target scores from (vocab-parallel) logits: the one piece of arithmetic every
log-likelihood of :class:`~megaspan.evaluate.harness.MegaspanLM` rests on.

``megaspan eval`` calls it on a one-process model's full logits; the in-loop downstream hook
(:class:`~megaspan.evaluate.live.LiveModel`) calls it on the last pipeline stage of the live model,
where each tensor-parallel rank holds a slice of the (padded) vocabulary. The math is that of
Megatron's ``vocab_parallel_cross_entropy`` (max-shifted, the shard sums added over the TP group),
written out here because that function turns its input into softmax in place and the greedy check
needs the logits and their maximum as well.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def target_scores(
    logits: torch.Tensor, targets: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), target is a greedy choice)`` per position, both shaped like ``targets``.

    ``logits``: ``[..., V / TP]``, this rank's contiguous slice of the vocabulary (rank ``r`` of
    ``group`` holds ids ``r * V/TP`` to ``(r + 1) * V/TP - 1``, Megatron's vocab-parallel split);
    ``group`` None (or of size 1): the whole vocabulary. The softmax runs over every row of the
    padded vocabulary, as training's loss does. Greedy means the target's logit is the maximum
    (an exact tie counts as greedy). Two all-reduces over ``group``; no gradient.
    """
    with torch.no_grad():
        logits = logits.float()
        part = logits.shape[-1]
        size = 1 if group is None else dist.get_world_size(group)
        start = 0 if size == 1 else dist.get_rank(group) * part
        local = targets.to(logits.device) - start
        inside = (local >= 0) & (local < part)
        picked = logits.gather(-1, local.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(inside, picked, torch.zeros_like(picked))
        top = logits.max(dim=-1).values
        if size > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (logits - top.unsqueeze(-1)).exp().sum(dim=-1)
        if size > 1:
            both = torch.stack([picked, sum_exp])
            dist.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]
        return picked - top - sum_exp.log(), picked >= top
