"""Per-layer stability diagnostics: why one placement trains deeper than another.

Every ``logging.diagnostics_interval`` steps, for each (global) layer ``l``:

* ``diag/rms/l``        RMS of the residual stream after layer ``l`` (Pre-LN's grows with depth;
                        Post-LN/B2T/SpanNorm keep it at the norm's scale);
* ``diag/token_cos/l``  mean pairwise cosine similarity of the tokens of one sequence after layer
                        ``l`` (-> 1 is rank collapse; HybridNorm Fig. 7, Noci et al. 2022);
* ``diag/grad_attn/l``, ``diag/grad_mlp/l``  gradient norms of the attention and MLP/MoE
                        parameters of layer ``l`` (vanishing in early layers = Post-LN's failure,
                        in late layers = Pre-LN's "curse of depth"; Mix-LN / B2T papers).

Values are exact under TP and PP (shards and stages are summed over the model-parallel group);
with sequence parallelism the activation statistics are those of TP rank 0's token shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaspan.norms.layer import NormPlacementTransformerLayer
from megaspan.training.hooks import Hook

_MAX_TOKENS = 128  # cosine similarity is O(s^2): a sample of positions is enough


def _layers(chunks) -> list[NormPlacementTransformerLayer]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, NormPlacementTransformerLayer)]


def _grad(param):
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def token_cosine(hidden: torch.Tensor) -> float:
    """Mean off-diagonal cosine similarity between positions of the first sequence; [s, b, h]."""
    x = hidden[:_MAX_TOKENS, 0, :].float()
    x = torch.nn.functional.normalize(x, dim=-1)
    s = x.shape[0]
    if s < 2:
        return 1.0
    sim = x @ x.t()
    return float((sim.sum() - sim.diagonal().sum()) / (s * (s - 1)))


class LayerDiagnostics:
    """Forward hooks on every placement layer; inert except on armed steps."""

    FIELDS = ("rms", "token_cos", "grad_attn", "grad_mlp")

    def __init__(self, chunks, num_layers: int, interval: int | None):
        self.chunks = chunks
        self.num_layers = num_layers
        self.interval = interval
        self.layers = _layers(chunks)
        self.armed = False
        self._acts: dict[int, tuple[float, float]] = {}
        if interval:
            for layer in self.layers:
                layer.register_forward_hook(self._hook)

    def arm(self, step: int) -> bool:
        """Record during the step that will be numbered ``step`` (1-based)?"""
        self.armed = bool(self.interval) and step % self.interval == 0
        self._acts.clear()
        return self.armed

    def _hook(self, layer, inputs, output) -> None:
        # Keep the first micro-batch only: one sample per step is the diagnostic, not a mean.
        if not self.armed or not layer.training or layer.layer_number in self._acts:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            rms = float(hidden.float().pow(2).mean().sqrt())
            self._acts[layer.layer_number] = (rms, token_cosine(hidden))

    def collect(self, device: torch.device) -> dict[str, float]:
        """All ranks call this after the backward of an armed step; returns tag -> value."""
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank()
        table = torch.zeros(self.num_layers, 4, dtype=torch.float64, device=device)
        for layer in self.layers:
            row = layer.layer_number - 1
            if tp_rank == 0 and layer.layer_number in self._acts:
                table[row, 0], table[row, 1] = self._acts[layer.layer_number]
            for name, param in layer.named_parameters():
                grad = _grad(param)
                # Replicated (non-TP) params are identical on every TP rank: count them once.
                if grad is None or (tp_rank != 0 and not getattr(param, "tensor_model_parallel", False)):
                    continue
                col = 2 if name.startswith("self_attention.") else 3 if name.startswith("mlp.") else None
                if col is not None:
                    table[row, col] += grad.float().pow(2).sum().item()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table, group=ps.get_model_parallel_group())
        table[:, 2:] = table[:, 2:].sqrt()
        self.armed = False
        return {
            f"diag/{field}/layer_{n + 1:03d}": float(table[n, i])
            for n in range(self.num_layers)
            for i, field in enumerate(self.FIELDS)
        }


class DiagnosticsHook(Hook):
    """Runs :class:`LayerDiagnostics` every ``interval`` steps: armed before the step's forward,
    collected after its backward and before the optimizer clips the gradients in place."""

    def __init__(self, interval: int | None) -> None:
        self.interval = interval
        self.diagnostics: LayerDiagnostics | None = None

    def on_fit_start(self, trainer) -> None:
        self.diagnostics = LayerDiagnostics(trainer.objs.chunks, trainer.cfg.model.num_layers, self.interval)
        self.diagnostics.arm(trainer.progress.step + 1)

    def before_optimizer_step(self, trainer, step: int) -> None:
        if self.diagnostics is not None and self.diagnostics.armed:
            trainer.log.scalars(self.diagnostics.collect(trainer.device), step)

    def on_step_end(self, trainer, result) -> None:
        if self.diagnostics is not None:
            self.diagnostics.arm(result.step + 1)
