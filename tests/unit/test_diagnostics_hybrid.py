"""Diagnostics on ``model.arch=hybrid``: one row per GPT block, keyed on the block number.

A block is two hybrid layers (attention half ``*``, MLP/MoE half ``-``/``E``); built from the same
seed, the hybrid model equals the GPT model bit for bit (tests/unit/test_hybrid.py), so its rows
must be the GPT model's rows: stream statistics from the block's input (attention half's input)
to its output (MLP half's output), attention gradients and weights from the attention half, MLP /
MoE ones and the router from the MLP half.
"""

from __future__ import annotations

import pytest
import torch

from megaspan.config.schema import ParallelConfig
from megaspan.models import build_model
from megaspan.models.hybrid import build_hybrid_model
from megaspan.runtime import device, initialize_model_parallel
from megaspan.training.diagnostics import LayerDiagnostics, block_number
from tests.helpers.models import NUM_LAYERS as L
from tests.helpers.models import VOCAB, tiny_cfg


def _diagnose(cfg, hybrid: bool):
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()  # sized by the first model's layer count (L vs 2L)
    initialize_model_parallel(ParallelConfig(), seed=1234)  # same init stream for both builds
    chunks = (build_hybrid_model if hybrid else build_model)(cfg, VOCAB).chunks
    diag = LayerDiagnostics(chunks, L, interval=1)
    assert diag.arm(1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, cfg.model.seq_length), generator=g)
    model = chunks[0]
    model.train()
    position = torch.arange(tokens.shape[1]).expand_as(tokens)
    model(tokens, position, None, labels=tokens).mean().backward()
    values = diag.collect(device())
    diag.snapshot_weights()
    with torch.no_grad():  # an "optimizer step" that depends on the block: ratio = block / 100
        for layer in diag.layers:
            for p in layer.parameters():
                p.mul_(1.0 + block_number(layer) / 100.0)
    values.update(diag.update_ratios(device()))
    return values, diag.record, diag


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_hybrid_rows_equal_gpt_rows(mcore, moe):
    cfg = tiny_cfg("spannorm", moe)
    gpt_values, gpt_rows, _ = _diagnose(cfg, hybrid=False)
    values, rows, diag = _diagnose(cfg, hybrid=True)
    assert len(diag.layers) == 2 * L and sorted({block_number(x) for x in diag.layers}) == list(
        range(1, L + 1)
    )
    assert sorted(rows) == sorted(gpt_rows) == list(range(1, L + 1))
    assert sorted(values) == sorted(gpt_values)
    for block, row in gpt_rows.items():
        assert sorted(rows[block]) == sorted(row), block
        for key, value in row.items():
            assert rows[block][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (block, key)
        assert rows[block]["attn_update_ratio"] == pytest.approx(block / 100, rel=1e-5)
        assert rows[block]["mlp_grad_norm"] > 0 and rows[block]["attn_grad_norm"] > 0
        assert 0 < rows[block]["angular_distance"] < 1  # from the block input, not the MLP half's
    if moe:
        assert all(sum(rows[b]["moe_tokens_per_expert"]) == 2 * cfg.model.seq_length * 2 for b in rows)
