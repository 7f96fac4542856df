"""Weight selection and rescaling for placements' init rules.

A weight's kind is keyed on the module that owns it, never on a parameter-name suffix: the
parameters named ``weight`` or ``weight<N>`` held directly by a ``linear_qkv`` / ``linear_proj``
(under ``self_attention``) or ``linear_fc1`` / ``linear_fc2`` (under ``mlp``) module. That covers
the local backend, TE (fused LN-linear, whose norm gain ``layer_norm_weight`` is never selected)
and MoE experts (SequentialMLP ``local_experts.N.linear_fc*.weight``, TEGroupedMLP's grouped
``linear_fc*.weight<N>``, one ``[out, in]`` weight per local expert). Megatron-Core 0.19 has no
legacy ``GroupedMLP`` (``experts.weight1/2``); a suffix rule for it used to match TEGroupedMLP's
``linear_fc2.weight1`` as an fc1 weight (expert 1 scaled twice, or by columns).

torch is imported inside the functions: placement files import these helpers, and the placement
registry must stay torch-free (config validation reads it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_KIND_MODULES = {
    "qkv": re.compile(r"(^|\.)self_attention\.linear_qkv$"),
    "proj": re.compile(r"(^|\.)self_attention\.linear_proj$"),
    "fc1": re.compile(r"(^|\.)mlp\.(.+\.)?linear_fc1$"),
    "fc2": re.compile(r"(^|\.)mlp\.(.+\.)?linear_fc2$"),
}
"""Kind -> the qualified names of the modules that own that kind's weights."""

_WEIGHT = re.compile(r"weight\d*$")
"""A linear's own weight: ``weight`` (one GEMM) or ``weight<N>`` (expert N of a grouped linear)."""

ALL_BLOCK_WEIGHTS = ("qkv", "proj", "fc1", "fc2")
"""Every block weight (q/k/v, out proj, fc1, fc2; experts included; norms, biases, router not)."""


def block_weights(layer, kind: str) -> Iterator:
    """Parameters of ``layer`` of one kind: 'qkv', 'proj', 'fc1' or 'fc2' (dense, shared or experts)."""
    owner = _KIND_MODULES[kind]
    for module_name, module in layer.named_modules():
        if not owner.search(module_name):
            continue
        for name, param in module.named_parameters(recurse=False):
            if _WEIGHT.fullmatch(name):
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
