"""Weight selection and rescaling for placements' init rules.

Names cover the local backend, TE (fused LN-linear, whose norm gain is ``layer_norm_weight`` and
must never be rescaled) and MoE experts (SequentialMLP ``local_experts.N.linear_fc*``,
TEGroupedMLP ``linear_fc*.weightN``, GroupedMLP ``weight1/2``).

torch is imported inside the functions: placement files import these helpers, and the placement
registry must stay torch-free (config validation reads it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_KIND_PATTERNS = {
    "qkv": re.compile(r"self_attention\.linear_qkv\.weight$"),
    "proj": re.compile(r"self_attention\.linear_proj\.weight$"),
    "fc1": re.compile(r"mlp\..*(linear_fc1\.weight\d*|weight1)$"),
    "fc2": re.compile(r"mlp\..*(linear_fc2\.weight\d*|weight2)$"),
}

ALL_BLOCK_WEIGHTS = ("qkv", "proj", "fc1", "fc2")
"""Every block weight (q/k/v, out proj, fc1, fc2; experts included; norms, biases, router not)."""


def block_weights(layer, kind: str) -> Iterator:
    """Parameters of ``layer`` of one kind: 'qkv', 'proj', 'fc1' or 'fc2' (dense, shared or experts)."""
    pattern = _KIND_PATTERNS[kind]
    for name, param in layer.named_parameters():
        if pattern.search(name):
            yield param


def scale_weights(layer, kinds: tuple[str, ...], factor: float) -> None:
    import torch

    with torch.no_grad():
        for kind in kinds:
            for param in block_weights(layer, kind):
                param.mul_(factor)


def qkv_value_rows(layer) -> tuple[int, int, int]:
    """(groups on this rank, rows per group, head dim) of the fused QKV weight.

    Megatron interleaves the fused QKV output per query group: each group holds its
    ``np/ng`` query heads, then one key head, then one value head, each ``hn`` rows; TP splits
    whole groups across ranks, so the local shard has the same structure.
    """
    attn = layer.self_attention
    groups = attn.num_query_groups_per_partition
    hn = attn.hidden_size_per_attention_head
    per_group = (attn.num_attention_heads_per_partition // groups + 2) * hn
    return groups, per_group, hn


def scale_value_rows(layer, factor: float) -> None:
    """Multiply only the V rows of the fused QKV weight by ``factor``.

    A layer without attention (a hybrid model's MLP-only ``-``/``E`` layer) has no V rows."""
    import torch

    params = list(block_weights(layer, "qkv"))
    if not params:
        return
    groups, per_group, hn = qkv_value_rows(layer)
    with torch.no_grad():
        for param in params:
            view = param.view(groups, per_group, -1)
            view[:, per_group - hn :, :].mul_(factor)
