"""The test suite's own shortcuts must not change what a test sees."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers.models import fresh_model_parallel, tiny_cfg

TOKENS = torch.arange(16).reshape(2, 8) % 128


def _built(cfg) -> tuple[dict, torch.Tensor, dict, dict]:
    """(weights, training-mode loss, model-parallel RNG states after the step, MoE metrics)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megaspan.models import build_model

    model = build_model(cfg, vocab_size=128).chunks[0]
    weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    metrics_before = dict(get_moe_metrics_tracker().metrics)
    model.train()
    loss = model(TOKENS, torch.arange(8).expand_as(TOKENS), None, labels=TOKENS).sum()
    loss.backward()  # the MoE aux loss records into Megatron's process-wide tracker
    return weights, loss.detach(), get_cuda_rng_tracker().get_states(), metrics_before


def test_fresh_model_parallel_reuses_groups_and_builds_what_a_full_initialization_builds(
    single_process_group,
):
    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    # Dropout on: the step draws from the model-parallel RNG tracker, so its states move.
    cfg = tiny_cfg("pre", moe=True, aux_loss=True, extra=("model.hidden_dropout=0.1",))
    initialize_model_parallel(ParallelConfig(), seed=1234)
    weights, loss, rng, metrics = _built(cfg)
    assert metrics == {}
    groups = set(dist.distributed_c10d._world.pg_map)
    torch.rand(3)  # the CPU generator moves on too, as in any earlier test

    fresh_model_parallel(1234)
    assert set(dist.distributed_c10d._world.pg_map) == groups  # no group created or destroyed
    again, again_loss, again_rng, again_metrics = _built(cfg)
    assert again_metrics == {}  # the previous model's MoE metrics were dropped
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], v) for k, v in weights.items())
    assert torch.equal(again_loss, loss)
    assert again_rng.keys() == rng.keys() and all(torch.equal(again_rng[k], v) for k, v in rng.items())

    fresh_model_parallel(7)  # another seed: other weights
    other, *_ = _built(cfg)
    assert not all(torch.equal(other[k], v) for k, v in weights.items())
