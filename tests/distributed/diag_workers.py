"""Rank functions for the diagnostics tests under parallel layouts (module-level: spawned ranks
import them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megaspan.models import build_model
from megaspan.runtime import device, initialize_model_parallel
from megaspan.training.diagnostics import JSONL, LayerDiagnostics
from megaspan.training.hooks import Hook
from tests.helpers.models import VOCAB, tiny_cfg


def pp2_diagnostics(rank, world_size, arch: str = "gpt"):
    """Each stage sets every gradient of its layers to the layer's GLOBAL row (the block number
    for a hybrid half) and scales its weights by (1 + row/100) as the "optimizer step"; returns
    the collected values and, per local row, the attention/MLP parameter sizes the test needs."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from megaspan.models.hybrid import build_hybrid_model
    from megaspan.training.diagnostics import block_number

    destroy_moe_metrics_tracker()  # one pool runs GPT (L layers) and hybrid (2L) models
    cfg = tiny_cfg("pre", False, extra=("parallel.pipeline_model_parallel_size=2", f"model.arch={arch}"))
    initialize_model_parallel(cfg.parallel, seed=1234)
    built = (build_hybrid_model if arch == "hybrid" else build_model)(cfg, vocab_size=VOCAB)
    diag = LayerDiagnostics(built.chunks, cfg.model.num_layers, 1)
    assert diag.arm(1)
    sizes: dict[int, list[int]] = {}
    for layer in diag.layers:
        n = block_number(layer)
        size = sizes.setdefault(n, [0, 0])
        for name, p in layer.named_parameters():
            p.grad = torch.full_like(p, float(n))
            if name.startswith("self_attention."):
                size[0] += p.numel()
            elif name.startswith("mlp."):
                size[1] += p.numel()
    values = diag.collect(device())
    diag.snapshot_weights()
    with torch.no_grad():
        for layer in diag.layers:
            for p in layer.parameters():
                p.mul_(1.0 + block_number(layer) / 100.0)
    values.update(diag.update_ratios(device()))
    layers = [(layer.layer_number, block_number(layer)) for layer in diag.layers]
    return {"values": values, "sizes": sizes, "num_layers": cfg.model.num_layers, "layers": layers}


# ---- layouts vs one process ---------------------------------------------------------------------
#
# One process trains the model for STEPS steps with a direct computation of every per-block
# statistic (plain sums over its parameters, the router re-run by hand: no diagnostics code), after
# saving the step-0 weights; each 2-rank layout loads those weights and trains the same batches
# with logging.diagnostics_interval=1. The global batch is 4 sequences: one micro-batch of 4 in the
# reference, one of 2 per data-parallel rank in the layouts (DP rank r reads samples 2r, 2r+1), so
# the MoE load of "the first micro-batch of every replica" is the reference's one micro-batch.

STEPS = 2
GLOBAL = 4


def layout_cfg(moe: bool, layout: str, out_dir: str, resume: str, extra: tuple[str, ...] = ()):
    from tests.distributed import layout_workers as lw

    dp = 1 if layout.startswith(("tp1", "tp2", "pp2")) else 2  # world 1, or 2 ranks of one replica
    # The interleaved schedule needs micro-batches in multiples of PP: two of 2 sequences.
    micro = GLOBAL // 2 if "vpp" in layout else GLOBAL // dp
    return lw.layout_config(
        "spannorm",
        moe,
        layout,
        out_dir,
        steps=STEPS,
        resume=resume,
        extra=(
            f"training.global_batch_size={GLOBAL}",
            f"training.micro_batch_size={micro}",
            "logging.diagnostics_interval=1",
            # The load-balancing loss depends on how tokens split into micro-batches.
            "model.moe.aux_loss_coeff=0",
            *extra,
        ),
    )


class DirectStats(Hook):
    """The reference's per-block statistics, computed directly on a one-process model (world 1:
    every parameter whole, every gradient reduced): per step, per layer, the attention / MLP
    gradient norms and update-to-weight ratios, and for MoE layers the load, its CV and the
    router entropy from the router's recorded input."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[int, dict]] = {}
        self._inputs: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer) -> None:
        self.layers = [layer for chunk in trainer.objs.chunks for layer in chunk.decoder.layers]
        for layer in self.layers:
            for module in layer.modules():
                if type(module).__name__.endswith("Router"):
                    module.register_forward_hook(self._keep(layer.layer_number))

    def _keep(self, number: int):
        def hook(router, args, output) -> None:  # returns None: the routing is left alone
            if router.training:
                self._inputs.setdefault(number, args[0].detach().clone())

        return hook

    def _groups(self, layer):
        for prefix, key in (("self_attention.", "attn"), ("mlp.", "mlp")):
            yield key, [(n, p) for n, p in layer.named_parameters() if n.startswith(prefix)]

    def before_optimizer_step(self, trainer, step: int) -> None:
        rows = self.rows[step] = {}
        self._before = {}
        for layer in self.layers:
            row = rows[layer.layer_number] = {}
            for key, params in self._groups(layer):
                grads = [p.main_grad.double() for _, p in params]
                row[f"{key}_grad_norm"] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
                for _, p in params:
                    if p.dim() >= 2:
                        self._before[p] = p.detach().double().clone()
            router = next((m for m in layer.modules() if type(m).__name__.endswith("Router")), None)
            if router is not None:
                x = self._inputs[layer.layer_number]
                logits = x.reshape(-1, x.shape[-1]).double() @ router.weight.double().t()
                probs = torch.softmax(logits, dim=-1)
                chosen = logits.topk(router.config.moe_router_topk, dim=-1).indices.flatten()
                load = torch.bincount(chosen, minlength=logits.shape[-1]).double()
                row["moe_tokens_per_expert"] = load.tolist()
                row["moe_load_cv"] = float(load.std(unbiased=False) / load.mean())
                row["moe_router_entropy"] = float(-(probs * probs.log()).sum(-1).mean())
        self._inputs.clear()

    def on_step_end(self, trainer, result) -> None:
        for layer in self.layers:
            row = self.rows[result.step][layer.layer_number]
            for key, params in self._groups(layer):
                mats = [p for _, p in params if p.dim() >= 2]
                delta = sum(float((p.detach().double() - self._before[p]).pow(2).sum()) for p in mats)
                weight = sum(float(self._before[p].pow(2).sum()) for p in mats)
                row[f"{key}_update_ratio"] = math.sqrt(delta / weight)


def _records(run_dir: str) -> dict[int, dict]:
    path = Path(run_dir) / JSONL
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: {int(n): row for n, row in r["layers"].items()} for r in records}


def _model_records(run_dir: str) -> dict[int, dict]:
    """step -> the record's model-level fields (lm_head_log_z, relative_update)."""
    path = Path(run_dir) / JSONL
    if not path.exists():
        return {}
    return {r["step"]: r.get("model", {}) for r in map(json.loads, path.read_text().splitlines())}


def _fit(cfg, hooks) -> None:
    from tests.distributed import layout_workers as lw

    trainer = lw._trainer(cfg, lw.LossRecorder())
    trainer.hooks += hooks
    try:
        if cfg.checkpoint.resume == "none":
            trainer.save()  # step 0: the starting point of every layout
        trainer.fit()
    finally:
        trainer.close()


def reference_diagnostics(rank, world_size, base: str, models) -> dict:
    """World 1: per model (``"dense"`` / ``"moe"``), the direct rows and the diagnostics' rows."""
    from tests.distributed import layout_workers as lw

    lw._allow_child_processes()
    out = {}
    for name in models:
        direct = DirectStats()
        out_dir = f"{base}/ref-{name}"
        _fit(layout_cfg(name == "moe", "tp1", out_dir, "none"), [direct])
        out[name] = dict(direct=direct.rows, diagnostics=_records(out_dir), model=_model_records(out_dir))
    return out


def layout_diagnostics(rank, world_size, base: str, cases) -> dict:
    """World 2: per (layout, model, extra overrides) case, the diagnostics' rows (from rank 0's
    diagnostics.jsonl; every rank computes the same values)."""
    from tests.distributed import layout_workers as lw

    lw._allow_child_processes()
    out = {}
    for layout, name, extra in cases:
        out_dir = f"{base}/{layout}-{name}-{len(extra)}"
        resume = f"{base}/ref-{name}/step_0000000"
        _fit(layout_cfg(name == "moe", layout, out_dir, resume, tuple(extra)), [])
        out[(layout, name, tuple(extra))] = (_records(out_dir), _model_records(out_dir))
    return out
