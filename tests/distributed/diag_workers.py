"""Rank functions for the PP2 diagnostics test (module-level: spawned ranks import them)."""

from __future__ import annotations

import torch

from megaspan.models import build_model
from megaspan.runtime import device, initialize_model_parallel
from megaspan.training.diagnostics import LayerDiagnostics
from tests.helpers.models import VOCAB, tiny_cfg


def pp2_diagnostics(rank, world_size):
    """Each stage sets every gradient of its layers to the layer's GLOBAL number and scales its
    weights by (1 + number/100) as the "optimizer step"; returns the collected values and, per
    local layer, the attention/MLP parameter and weight-matrix sizes the test needs."""
    cfg = tiny_cfg("pre", False, extra=("parallel.pipeline_model_parallel_size=2",))
    initialize_model_parallel(cfg.parallel, seed=1234)
    built = build_model(cfg, vocab_size=VOCAB)
    diag = LayerDiagnostics(built.chunks, cfg.model.num_layers, 1)
    assert diag.arm(1)
    sizes = {}
    for layer in diag.layers:
        n = layer.layer_number
        attn = mlp = 0
        for name, p in layer.named_parameters():
            p.grad = torch.full_like(p, float(n))
            if name.startswith("self_attention."):
                attn += p.numel()
            elif name.startswith("mlp."):
                mlp += p.numel()
        sizes[n] = (attn, mlp)
    values = diag.collect(device())
    diag.snapshot_weights()
    with torch.no_grad():
        for layer in diag.layers:
            for p in layer.parameters():
                p.mul_(1.0 + layer.layer_number / 100.0)
    values.update(diag.update_ratios(device()))
    return {"values": values, "sizes": sizes, "num_layers": cfg.model.num_layers}
