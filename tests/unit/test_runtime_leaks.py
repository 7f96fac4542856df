"""Re-initializing or destroying the runtime leaves no process group, thread or Megatron state of
an earlier model alive in the process (in-process: what a long-lived test worker, notebook or
sweep worker sees).

A gloo group's threads stop only when its last Python handle dies, and Megatron keeps handles
in process-wide caches that outlive the model: ``RotaryEmbedding.forward`` is an
``lru_cache`` whose keys hold the embedding (with its context-parallel group), and the MoE
metrics tracker holds the reduce groups of the model that last recorded an aux loss. The
groups are tracked through weak references, so the tests see exactly the groups they created,
whatever other tests of the session left behind.
"""

from __future__ import annotations

import importlib
import os
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megaspan.runtime.distributed import RESET_NAMES
from tests.helpers.models import tiny_cfg

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
TOKENS = torch.arange(16).reshape(2, 8) % 128


def _gloo_threads() -> int:
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            count += Path(f"/proc/self/task/{tid}/comm").read_text().strip() in GLOO_THREADS
        except OSError:  # the thread ended while we listed
            pass
    return count


def _current_groups() -> list[weakref.ref]:
    return [weakref.ref(pg) for pg in dist.distributed_c10d._world.pg_map]


def _train_forward(cfg) -> None:
    """Build a model and run one training-mode forward (rotary embedding, MoE router aux loss)."""
    from megaspan.models import build_model

    model = build_model(cfg, vocab_size=128).chunks[0]
    model.train()
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    model(TOKENS, positions, None, labels=TOKENS).sum().backward()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_reinitializing_after_forward_passes_frees_the_old_groups(single_process_group):
    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    cfg = tiny_cfg("pre", moe=True, aux_loss=True)
    initialize_model_parallel(ParallelConfig(), seed=1)
    _train_forward(cfg)
    threads = _gloo_threads()
    for _ in range(6):
        old = [ref for ref in _current_groups() if ref() is not dist.group.WORLD]
        initialize_model_parallel(ParallelConfig(), seed=1)
        alive = [ref() for ref in old if ref() is not None]
        assert alive == [], f"{len(alive)} destroyed groups still have a live handle"
        _train_forward(cfg)
    # One leaked group is about 3 gloo threads at world size 1.
    assert _gloo_threads() <= threads


def test_moe_state_is_reset_by_reinitializing(single_process_group):
    """Megatron's MoE state is process-wide: the metrics tracker is sized by the first model
    that records into it (a deeper model built later indexed past it), and the aux-loss
    backward scale keeps the first tensor set (a bare backward stores a 0-dim one, into which
    the next trainer's schedule cannot copy its [1] scale) and its value."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    for layers in (2, 4):  # shallower first
        initialize_model_parallel(ParallelConfig(), seed=1)
        assert get_moe_metrics_tracker().metrics == {}
        assert MoEAuxLossAutoScaler.main_loss_backward_scale is None
        # What a trainer's schedule does before backward: a [1]-shaped 1/num_microbatches.
        MoEAuxLossAutoScaler.set_loss_scale(torch.full([1], 0.25))
        _train_forward(tiny_cfg("pre", moe=True, aux_loss=True, extra=[f"model.num_layers={layers}"]))
        assert get_moe_metrics_tracker().metrics
    initialize_model_parallel(ParallelConfig(), seed=1)  # leave Megatron's initial state behind


@pytest.mark.parametrize("module,cls", RESET_NAMES, ids=[c for _, c in RESET_NAMES])
def test_reset_megatron_names_exist(module, cls):
    """Contract: the classes whose loss scale the runtime resets still carry it."""
    assert hasattr(getattr(importlib.import_module(module), cls), "main_loss_backward_scale")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_destroy_frees_every_group_and_resets_megatron_state(single_process_group):
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        get_num_microbatches,
        init_num_microbatches_calculator,
    )
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import destroy, init_process_group, initialize_model_parallel

    threads = _gloo_threads()
    initialize_model_parallel(ParallelConfig(), seed=1)
    _train_forward(tiny_cfg("pre", moe=True, aux_loss=True))
    destroy_num_microbatches_calculator()  # an earlier in-process trainer may have left one
    init_num_microbatches_calculator(0, None, 8, 2, 1)  # what a trainer sets up
    groups = _current_groups()
    try:
        destroy()
        assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
        alive = [ref() for ref in groups if ref() is not None]
        assert alive == [], f"{len(alive)} destroyed groups still have a live handle"
        assert _gloo_threads() < threads  # the world group's own threads are gone too
        assert get_moe_metrics_tracker().metrics == {}
        assert MoEAuxLossAutoScaler.main_loss_backward_scale is None
        assert get_cuda_rng_tracker().get_states() == {}
        with pytest.raises(AttributeError):  # no calculator left
            get_num_microbatches()
    finally:
        init_process_group()  # the session's group, for the tests that follow


def test_training_objects_are_freed_with_the_distributed_optimizer(single_process_group):
    """The schedules' loss-scale hook holds the optimizer weakly: a bound method on the
    TransformerConfig closed a cycle (config -> optimizer -> DDP -> modules -> config) that the
    garbage collector did not free with the distributed optimizer, so each trainer built in a
    long-lived process kept its model and its groups' gloo threads."""
    import gc

    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel
    from megaspan.training.setup import build_training_objects

    initialize_model_parallel(ParallelConfig(), seed=1)
    objs = build_training_objects(
        tiny_cfg("pre", extra=["parallel.use_distributed_optimizer=true"]), vocab_size=128
    )
    assert objs.config.grad_scale_func(torch.tensor(3.0)).item() == 3.0  # fp32: loss scale 1
    refs = [weakref.ref(objs.chunks[0]), weakref.ref(objs.model[0]), weakref.ref(objs.optimizer)]
    del objs
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_frozen_imports_still_let_the_collector_free_what_is_built_later():
    """``freeze_imports`` (each pytest process runs it after collection, ``megaspan train`` before
    building) hides what exists now from the cyclic collector, not what comes later: a reference
    cycle made afterwards, like a model holding its groups, is still freed by ``gc.collect`` (what
    ``runtime.destroy`` relies on to stop gloo threads). And a second call is harmless."""
    import gc

    from megaspan.runtime import freeze_imports

    class Node:
        pass

    before = Node()
    before.self = before  # a cycle that exists at the freeze: kept for good (it is "imported")
    freeze_imports()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    cycle = Node()
    cycle.self = cycle
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None
    kept = weakref.ref(before)
    del before
    gc.collect()
    assert kept() is not None  # frozen: no collection looks at it again
    freeze_imports()
    assert gc.get_freeze_count() >= frozen
