"""PaLM's output z-loss (``training.z_loss``): coeff x log(Z)^2 per token added to the training loss.

Z is the softmax normaliser of the LM head, sum_v exp(logit_v), over the padded vocabulary as the
cross entropy sees it. The loss pulls log Z towards 0, which keeps the output logits from drifting
(Chowdhery et al. 2022, PaLM section 5; Wortsman et al. 2023 find it removes output-logit
divergence). Megatron-Core 0.19.2 has a z-loss only for MoE routers
(``moe_utils.z_loss_func``: not vocab-parallel), so the LM-head one is here:

* a forward hook on every LM head (``output_layer``) computes the per-token log Z from its logits,
  vocab-parallel under TP (:func:`vocab_parallel_logsumexp`), and queues it with its graph;
* the trainer's ``loss_func`` (called by Megatron's schedule right after the same micro-batch's
  forward, on the last pipeline stage) takes it and adds ``coeff * logZ^2`` to each token's loss
  before the loss mask, so it is averaged like the cross entropy. The reported (logged) loss stays
  the plain cross entropy, comparable with runs without the z-loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of vocab-sharded ``logits`` (a TP rank holds a slice of the
    vocabulary), differentiable: max-shifted, the shard sums added over the TP group with
    Megatron's ``reduce_from_tensor_model_parallel_region`` (backward: identity per shard)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    if ps.get_tensor_model_parallel_world_size() == 1:
        return torch.logsumexp(logits, dim=-1)
    m = logits.detach().max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    total = reduce_from_tensor_model_parallel_region((logits - m.unsqueeze(-1)).exp().sum(-1))
    return m + total.log()


def output_layers(chunks) -> list:
    """Every LM head (``output_layer``) of the model chunks (only the last pipeline stage has one)."""
    return [
        m for chunk in chunks for name, m in chunk.named_modules() if name.split(".")[-1] == "output_layer"
    ]


class ZLoss:
    """The z-loss of ``chunks`` with coefficient ``coeff``: hooks the LM heads; :meth:`per_token`
    gives the next micro-batch's ``coeff * logZ^2``, shaped like the model's per-token loss."""

    def __init__(self, chunks, coeff: float) -> None:
        self.coeff = coeff
        self._log_z: torch.Tensor | None = None  # the last LM-head forward's, with its graph
        self._handles = [m.register_forward_hook(self._hook) for m in output_layers(chunks)]

    def _hook(self, module, args, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output  # [s, b, V / TP]
        # A copy: Megatron's vocab-parallel cross entropy turns fp32 logits into softmax IN PLACE,
        # which would corrupt the logsumexp's saved input (autograd refuses it). This costs one
        # fp32 copy of the micro-batch's logits (bf16 logits are copied by the cast anyway).
        self._log_z = vocab_parallel_logsumexp(logits.to(torch.float32, copy=True))  # [s, b]

    def start(self) -> None:
        """Before a micro-batch's forward: forget any earlier LM-head output."""
        self._log_z = None

    def per_token(self) -> torch.Tensor:
        """[b, s]: coeff * logZ^2 of this micro-batch (its forward ran since :meth:`start`)."""
        log_z, self._log_z = self._log_z, None
        if log_z is None:
            raise RuntimeError("z-loss: no LM-head output since this micro-batch's forward started")
        return self.coeff * log_z.pow(2).transpose(0, 1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._log_z = None
