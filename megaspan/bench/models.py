"""What ``megaspan bench`` times: one *candidate* per model, each with a ``step()`` that runs one
full optimizer step (all micro-batches, forward + backward + optimizer).

* a placement (``pre``, ``spannorm``, ...): megaspan's model through megaspan's trainer step;
* ``stock``: Megatron-Core's own ``GPTModel`` from ``get_gpt_layer_local_spec()`` (local backend)
  or ``get_gpt_layer_with_transformer_engine_spec()`` (TE), with the ``TransformerConfig`` that
  megaspan builds for ``pre``, trained through the same trainer step;
* ``bare-loop``: the same stock model driven by ``get_forward_backward_func()`` +
  ``optimizer.step()`` alone, so the trainer's own overhead is a measured ratio.

Data is synthetic and in memory: a fixed pool of random token sequences, no tokenizer or corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megaspan.config.schema import MegaspanConfig

STOCK = "stock"
BARE_LOOP = "bare-loop"


class SyntheticTokens:
    """Map-style dataset shaped like ``GPTDataset``'s samples: random tokens from a small pool.

    Sample ``i`` is pool entry ``i % pool``, so reading costs what indexing a prepared dataset
    costs, and every model sees the same tokens.
    """

    def __init__(self, seq_length: int, vocab_size: int, seed: int, pool: int = 32, length: int = 10**9):
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (pool, seq_length + 1), generator=gen)
        positions = torch.arange(seq_length)
        self.samples = [
            {
                "tokens": t[:-1].clone(),
                "labels": t[1:].clone(),
                "loss_mask": torch.ones(seq_length, dtype=torch.float32),
                "position_ids": positions.clone(),
            }
            for t in tokens
        ]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index % len(self.samples)]


@dataclass
class Candidate:
    """A built model ready to time."""

    name: str
    kind: str  # "megaspan" | "stock" | "bare-loop"
    placement: str
    backend: str
    num_params: int
    padded_vocab: int
    step: Callable[[], object]  # one optimizer step; returns a loss (float or StepResult) or None
    objs: object  # keeps the model alive; dropped by close()

    def close(self) -> None:
        self.objs = None
        self.step = None  # type: ignore[assignment]


def _reseed(seed: int) -> None:
    """Same initial weights for every model (stock and pre start from identical draws)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _stock_chunks(cfg: MegaspanConfig, vocab_size: int):
    """Megatron-Core's own GPT model (one chunk; no virtual pipeline) with ``cfg`` (a ``pre`` config)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megaspan.models import placement_for, resolve_impl, transformer_config
    from megaspan.models.build import language_model_kwargs
    from megaspan.models.mcore_config import model_vocab_size

    placement = placement_for(cfg)
    impl = resolve_impl(cfg.model.transformer_impl)
    tconfig = transformer_config(cfg, placement)
    moe = cfg.model.moe
    if impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=moe.num_experts, moe_grouped_gemm=moe.grouped_gemm
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=moe.num_experts,
            moe_grouped_gemm=moe.grouped_gemm,
            normalization=cfg.model.normalization,
        )
    padded = model_vocab_size(cfg, vocab_size)
    chunk = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        # The same constructor arguments as megaspan's own GPT build (one chunk: no VPP stage).
        **language_model_kwargs(cfg, padded, None),
    )
    return [chunk], tconfig, impl, padded


def _trainer_step(cfg: MegaspanConfig, objs, dataset) -> Callable[[], object]:
    """One step of megaspan's trainer over ``objs``: the adapter to the trainer's step API.

    The trainer is built around the given objects (so ``stock`` runs through it too) with no
    hooks and with a preemption flag, i.e. the per-step work ``Trainer.fit`` does on a step that
    logs, evaluates and saves nothing. Returns what the step returns (read ``loss`` later: the
    host sync is the caller's, outside the timed region).
    """
    from megaspan.training import trainer as tr
    from megaspan.training.build import rank_position
    from megaspan.training.metrics import MetricsLogger
    from megaspan.training.signals import PreemptionFlag

    log = MetricsLogger(False, cfg.training.steps, None, False, False, None)
    trainer = tr.Trainer(cfg, objs, (dataset, dataset), rank_position(cfg), log, [], preempt=PreemptionFlag())
    return trainer.train_step


def _bare_forward_step(data_iterator, model):
    """Megatron's pretrain_gpt forward step, minimal: mean token loss of one micro-batch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        loss = output_tensor.float().sum()
        return loss, torch.tensor(output_tensor.numel(), dtype=torch.int, device=loss.device), {}

    return output, loss_func


def _bare_step(cfg: MegaspanConfig, objs, dataset, device: torch.device) -> Callable[[], object]:
    """``get_forward_backward_func()`` + ``optimizer.step()`` + ``scheduler.step()``, nothing else.

    The micro-batches are collated on the device once, up front: a bare loop pays no data cost.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaspan.training.batches import collate
    from megaspan.training.setup import cuda_free

    tr = cfg.training
    dp_size = ps.get_data_parallel_world_size()
    num_micro = tr.global_batch_size // (tr.micro_batch_size * dp_size)
    batches = []
    for i in range(num_micro):
        samples = [dataset[i * tr.micro_batch_size + j] for j in range(tr.micro_batch_size)]
        batches.append({k: v.to(device) for k, v in collate(samples).items()})
    fwd_bwd = get_forward_backward_func()

    def step() -> None:
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        objs.optimizer.zero_grad()
        fwd_bwd(
            forward_step_func=_bare_forward_step,
            data_iterator=[iter(batches) for _ in objs.model],
            model=objs.model,
            num_microbatches=num_micro,
            seq_length=cfg.model.seq_length,
            micro_batch_size=tr.micro_batch_size,
            forward_only=False,
        )
        with cuda_free():
            objs.optimizer.step()
        objs.scheduler.step(increment=1)

    return step


def build_candidate(
    name: str,
    cfg_for: Callable[[str], MegaspanConfig],
    dataset: SyntheticTokens,
    vocab_size: int,
    device: torch.device,
) -> Candidate:
    """Build the model ``name`` ('stock', 'bare-loop' or a placement) and its step function.

    ``cfg_for(placement)`` returns the bench config with ``model.norm_placement`` set (the
    baselines use ``pre``'s config: the same ``TransformerConfig`` as megaspan's ``pre``).
    """
    from megaspan.training import setup

    cfg = cfg_for("pre" if name in (STOCK, BARE_LOOP) else name)
    _reseed(cfg.training.seed)
    if name in (STOCK, BARE_LOOP):
        chunks, tconfig, impl, padded = _stock_chunks(cfg, vocab_size)
        objs = setup.training_objects(cfg, chunks, tconfig)
        step = _trainer_step(cfg, objs, dataset) if name == STOCK else _bare_step(cfg, objs, dataset, device)
        return Candidate(name, name, "pre", impl, objs.num_params, padded, step, objs)
    objs = setup.build_training_objects(cfg, vocab_size)
    impl, padded = _impl_of(cfg), _padded(cfg, vocab_size)
    return Candidate(
        name, "megaspan", name, impl, objs.num_params, padded, _trainer_step(cfg, objs, dataset), objs
    )


def _impl_of(cfg: MegaspanConfig) -> str:
    from megaspan.models import resolve_impl

    return resolve_impl(cfg.model.transformer_impl)


def _padded(cfg: MegaspanConfig, vocab_size: int) -> int:
    from megaspan.models.mcore_config import model_vocab_size

    return model_vocab_size(cfg, vocab_size)


__all__ = ["BARE_LOOP", "STOCK", "Candidate", "SyntheticTokens", "build_candidate"]
