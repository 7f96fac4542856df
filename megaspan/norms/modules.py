"""Norm modules for the local (CPU-capable) backend and the norm-output scale hook.

Megatron's ``WrappedTorchNorm`` refuses sequence parallelism, and the MoE layer refuses TP
without SP, so the local backend needs its own norm. :class:`SPNorm` is a plain LayerNorm /
RMSNorm whose parameters carry the ``sequence_parallel`` tag that ``finalize_model_grads``
reads to all-reduce their gradients over the TP group (as ``TENorm`` does). Its parameter
names (``weight``, ``bias``) match TE's norms so checkpoints move between backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SPNorm(nn.Module):
    """LayerNorm or RMSNorm (per ``config.normalization``) over the last dim of ``[s, b, h]``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {config.normalization}")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        dtype = config.params_dtype
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for p in self.parameters():
            # Replicated over TP; with SP each rank sees different tokens, so grads must be
            # all-reduced over TP (finalize_model_grads keys on this attribute).
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{'RMSNorm' if self.rms else 'LayerNorm'}({self.hidden_size}, eps={self.eps})"


def _scale_output(module, inputs, output, scale):
    if isinstance(output, tuple):
        return (output[0] * scale, *output[1:])
    return output * scale


def add_output_scale(module: nn.Module, scale: float) -> nn.Module:
    """Multiply a norm's output by a fixed ``scale`` (LayerNorm Scaling's 1/sqrt(l)).

    A forward hook rather than a wrapper keeps the parameter names (and so checkpoint keys)
    identical to an unscaled norm, and works for TE norms too. The scale is a constant, not a
    learned gain: folding it into the gain's init would not be equivalent under Adam/weight decay.
    """
    module.output_scale = scale
    module.register_forward_hook(lambda m, i, o: _scale_output(m, i, o, scale))
    return module


class HeadNorm(SPNorm):
    """Per-head norm (size ``head_dim``) on TP-sharded heads, e.g. HybridNorm's V norm.

    Each TP rank holds different heads, so the gain's gradient is a partial sum over heads and
    must be summed over TP. Megatron's ``finalize_model_grads`` does that only for params named
    ``q_layernorm``/``k_layernorm``; here the sum happens in autograd instead
    (``copy_to_tensor_model_parallel_region``: identity forward, all-reduce backward), so it is
    correct with and without sequence parallelism.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(config, hidden_size, eps)
        for p in self.parameters():
            p.sequence_parallel = False  # summed in autograd, not again in finalize_model_grads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        weight = copy_to_tensor_model_parallel_region(self.weight)
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
        bias = copy_to_tensor_model_parallel_region(self.bias)
        return F.layer_norm(x, (self.hidden_size,), weight, bias, self.eps)
