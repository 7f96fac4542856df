"""The one tiny-model factory of the test suite.

Every test that needs a small config starts from :func:`tiny_overrides` (4 layers, hidden 64,
4 heads with 2 query groups, fp32) and adds what it tests; :func:`tiny_cfg` loads it through the
real config loader. MoE adds 4 experts, top-2 routing and a 32-wide expert FFN.
"""

from __future__ import annotations

from collections.abc import Iterable

VOCAB = 128
NUM_LAYERS = 4

MOE = (
    "model.moe.num_experts=4",
    "model.moe.router_topk=2",
    "model.moe.ffn_hidden_size=32",
)


def tiny_overrides(
    placement: str = "spannorm",
    moe: bool = False,
    *,
    seq_length: int = 16,
    norm: str = "RMSNorm",
    aux_loss: bool = False,
    extra: Iterable[str] = (),
) -> list[str]:
    """Dotted overrides of a tiny model (see the module doc); ``extra`` comes last and wins."""
    overrides = [
        f"model.norm_placement={placement}",
        f"model.num_layers={NUM_LAYERS}",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",  # GQA: exercises the interleaved QKV layout
        f"model.seq_length={seq_length}",
        f"model.normalization={norm}",
        "model.activation=swiglu" if norm == "RMSNorm" else "model.activation=gelu",
        "precision.dtype=fp32",
    ]
    if moe:
        overrides += list(MOE)
        if not aux_loss:
            overrides.append("model.moe.aux_loss_coeff=0")
    return overrides + list(extra)


def tiny_cfg(placement: str = "spannorm", moe: bool = False, **kwargs):
    """:func:`tiny_overrides` loaded into a :class:`~megaspan.config.schema.MegaspanConfig`."""
    from megaspan.config.loader import load_config

    return load_config(None, tiny_overrides(placement, moe, **kwargs))


def stack_cfg(
    placement: str = "spannorm", moe: bool = False, norm: str = "RMSNorm", extra: Iterable[str] = ()
):
    """Tiny config for tests that run the decoder stack directly, like the reference stack: 8 tokens
    and no position embedding (the reference has none)."""
    return tiny_cfg(
        placement, moe, seq_length=8, norm=norm, extra=("model.position_embedding_type=none", *extra)
    )


# `megaspan plan` inputs: a vocab size (no tokenizer needed) and a batch every tested layout divides.
SMALL_MOE = tiny_overrides(
    moe=True,
    aux_loss=True,
    extra=("model.vocab_size=128", "training.micro_batch_size=1", "training.global_batch_size=8"),
)


def fresh_model_parallel(seed: int = 1234) -> None:
    """Megatron's model-parallel state at world size 1 (TP=PP=EP=CP=1), seeded with ``seed``:
    what ``megaspan.runtime.initialize_model_parallel(ParallelConfig(), seed)`` leaves, without
    re-creating the groups when this process already holds world-size-1 ones.

    A re-initialization costs ~0.4 s (the runtime destroys the old groups and runs a full garbage
    collection so their gloo threads stop), paid per in-process test and per model built from
    the same seed: about half of the fast tier. At world size 1 every group holds this one rank,
    so a model cannot tell reused groups from new ones; what a model can see is re-done as the
    runtime does it: Megatron's process-wide caches are emptied and the RNG tracker reseeded
    (``tests/unit/test_test_helpers.py`` checks both paths build identical models).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel
    from megaspan.runtime.distributed import _clear_megatron_caches

    reusable = (
        dist.is_initialized()
        and parallel_state.model_parallel_is_initialized()
        and dist.get_world_size() == 1
        and parallel_state.get_virtual_pipeline_model_parallel_world_size() is None
    )
    if not reusable:
        initialize_model_parallel(ParallelConfig(), seed=seed)
        return
    _clear_megatron_caches()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def one_optimizer_step(objs) -> None:
    """One real optimizer step on training objects (``build_training_objects``), so Adam holds
    state for every parameter and the scheduler a step count: a checkpoint saved before any step
    has no optimizer state to resume."""
    from megaspan.training.setup import cuda_free

    for chunk in objs.model:
        chunk.zero_grad_buffer()
    objs.optimizer.zero_grad()
    loss = sum((p.float() ** 2).sum() for p in objs.model[0].parameters()) * 1e-3
    loss.backward()
    objs.scheduler.step(increment=1)
    with cuda_free():
        objs.optimizer.step()
