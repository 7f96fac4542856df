"""Contract test for the CPU runtime: every Megatron-Core name it patches must still exist.

If a Megatron-Core upgrade renames or removes one of these, this fails loudly here instead of as
an obscure CUDA error deep inside a training step.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megaspan.runtime import cpu_compat


def _fresh_python(code: str, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter (this process has long applied the emulation); its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _resolve(module: str, attr: str):
    try:
        obj = importlib.import_module(module)
    except ImportError:
        parent, cls = module.rsplit(".", 1)
        obj = getattr(importlib.import_module(parent), cls)
    return getattr(obj, attr)


@pytest.mark.parametrize(
    "module,attr", cpu_compat.PATCHED_NAMES, ids=[f"{m}.{a}" for m, a in cpu_compat.PATCHED_NAMES]
)
def test_patched_megatron_name_exists(module, attr):
    assert _resolve(module, attr) is not None


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_emulation_is_explicit():
    """Neither importing the runtime nor initializing a process group switches the emulation on;
    building Megatron state without it fails with the fix (checked in a fresh interpreter)."""
    code = (
        "import torch\n"
        "from megaspan.runtime import cpu_compat, init_process_group, initialize_model_parallel\n"
        "from megaspan.config.schema import ParallelConfig\n"
        "init_process_group()\n"
        "assert not cpu_compat.is_applied()\n"
        "try:\n"
        "    initialize_model_parallel(ParallelConfig(), seed=1)\n"
        "except RuntimeError as exc:\n"
        "    assert 'setup_cpu()' in str(exc), exc\n"
        "    print('refused')\n"
    )
    assert "refused" in _fresh_python(code, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_apply_patches_cpu_sites(single_process_group):
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    assert cpu_compat.apply() is True and cpu_compat.apply() is True  # idempotent
    assert torch.cuda.current_device() == "cpu"
    # The schedules see a CPU view of torch for their hard-coded CUDA counters and autocast,
    # while the real torch (and so the model's forward/backward) is left alone.
    assert schedules.torch is not torch and schedules.torch.Tensor is torch.Tensor
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert torch.zeros is not schedules.torch.zeros
    assert schedules.torch.autocast("cuda", dtype=torch.bfloat16).device == "cpu"
    assert torch.overrides._get_current_function_mode_stack() == []
    assert token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True).tolist() == [1, 2]
    # Tensor.type is not replaced process-wide: only inside the schedules/optimizer mode.
    assert torch.zeros(2).type() == "torch.FloatTensor"
    with cpu_compat.CudaToCpuMode():
        assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(2).type(torch.float64).dtype == torch.float64
    state = mrandom._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())


def test_schedule_device_rewrite(single_process_group):
    with cpu_compat.CudaToCpuMode():
        t = torch.zeros([], dtype=torch.int, device="cuda")
        u = torch.ones(2).cuda()
    assert t.device.type == "cpu" and u.device.type == "cpu"


@pytest.mark.integration
def test_inert_when_cuda_is_available():
    """With CUDA present apply() changes nothing (checked in a fresh interpreter)."""
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "before = torch.cuda.current_device\n"
        "from megaspan.runtime import cpu_compat\n"
        "assert cpu_compat.apply() is False\n"
        "assert torch.cuda.current_device is before and not cpu_compat.is_applied()\n"
        "print('inert')\n"
    )
    assert "inert" in _fresh_python(code, timeout=300)


def test_cpu_rng_tracker_fork_restores_state(single_process_group):
    from megatron.core import tensor_parallel

    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=7)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        again = torch.rand(3)
    assert not torch.equal(inside, again)  # the forked stream advanced


@pytest.mark.integration
def test_single_process_ignores_an_inherited_busy_master_port():
    """A world-size-1 run (e.g. `megaspan train` started from a process that holds its own
    store) must not try to bind the MASTER_PORT it inherited."""
    import os
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy.getsockname()[1]))
        code = (
            "from megaspan.runtime import init_process_group, destroy\n"
            "init_process_group(timeout_s=60); destroy(); print('ok')\n"
        )
        assert "ok" in _fresh_python(code, timeout=300, env=env)


def _os_threads() -> list[str]:
    """Names of this process's OS threads (``threading`` does not see gloo's C++ threads)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended while we listed
            pass
    return names


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
# 30 full re-initializations (~24 s on a loaded 2-core machine, an eighth of the fast tier); the
# fast tier keeps test_runtime_leaks' 6-re-initialization checks of the same leak.
@pytest.mark.integration
def test_reinitializing_model_parallel_keeps_threads_and_groups_flat(single_process_group):
    """Megatron's destroy_model_parallel only drops its group handles; each re-initialization
    used to leave ~20 gloo groups (60 threads at world size 1) alive until the process exited."""
    import torch.distributed as dist

    from megaspan.config.schema import ParallelConfig
    from megaspan.models import build_model
    from megaspan.runtime import initialize_model_parallel
    from tests.helpers.models import tiny_cfg

    cfg = tiny_cfg()
    initialize_model_parallel(ParallelConfig(), seed=1)
    build_model(cfg, vocab_size=128)  # models hold group handles (in reference cycles)
    threads = len(_os_threads())
    groups = len(dist.distributed_c10d._world.pg_map)
    for i in range(30):
        initialize_model_parallel(ParallelConfig(), seed=1)
        if i % 3 == 0:
            build_model(cfg, vocab_size=128)
    # Other libraries may start a thread or two meanwhile; a leak adds ~60 per re-initialization.
    assert len(_os_threads()) <= threads + 5, Counter(_os_threads())
    assert len(dist.distributed_c10d._world.pg_map) == groups


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_destroy_leaves_no_process_group_threads(single_process_group):
    # Counts every gloo thread of the process: it passes in-process, after other tests' models
    # and trainers, only because the runtime empties Megatron's caches and the trainer's hooks
    # hold no strong cycle (it used to need a fresh interpreter).
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import destroy, init_process_group, initialize_model_parallel, setup_cpu

    setup_cpu()
    init_process_group()
    initialize_model_parallel(ParallelConfig(), seed=1)
    assert any(name in GLOO_THREADS for name in _os_threads())
    try:
        destroy()
        assert not dist.is_initialized()
        assert not parallel_state.model_parallel_is_initialized()
        # No module global of parallel_state keeps a (destroyed) group's threads alive.
        assert not [n for n, v in vars(parallel_state).items() if isinstance(v, dist.ProcessGroup)]
        assert [name for name in _os_threads() if name in GLOO_THREADS] == []
    finally:
        init_process_group()  # the session's group, for the tests that follow
