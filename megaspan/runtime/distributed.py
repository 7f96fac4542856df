"""Process-group and model-parallel initialization for torchrun, Slurm and single-process runs."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaspan.runtime import cpu_compat


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def env_from_launcher() -> DistEnv:
    """Rank info from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm's srun (SLURM_*)."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return DistEnv(rank, world, local)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_cpu() -> bool:
    """Switch on the CPU emulation of Megatron-Core's CUDA sites when no GPU is present.

    Called once by each entry point (the ``megaspan`` commands, the test fixtures and harness
    workers), never as a side effect of library calls. A no-op with CUDA; returns True if the
    emulation is active.
    """
    return cpu_compat.apply()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(timeout_s: int = 600) -> DistEnv:
    """Initialize torch.distributed (gloo on CPU, nccl on GPU) once per process.

    CPU emulation is not switched on here: entry points call :func:`setup_cpu` explicitly.
    """
    denv = env_from_launcher()
    if dist.is_initialized():
        return denv
    if denv.world_size == 1:
        # A single process rendezvouses with nobody: use a private port and leave os.environ
        # alone, so an inherited MASTER_PORT (or one this process exported) never collides with
        # a parent's or a child's store.
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(
                    f"{var} is not set for a {denv.world_size}-process run: launch with torchrun, "
                    f"launch/slurm/train.sbatch, or export {var}"
                )
        init_method = "env://"
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=denv.rank,
        world_size=denv.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    global _PEERS
    if denv.world_size > 1:
        # Who is who, for the one line a surviving rank prints when a peer dies (lost_peer()).
        peers: list = [None] * denv.world_size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        _PEERS = [tuple(p) for p in peers]
    return denv


_PEERS: list[tuple[str, int]] = []
"""(hostname, pid) of every rank of the world group, gathered once at init."""

_LOST_PEER_TEXT = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Socket closed",
    "NCCL communicator was aborted",
    "remote process exited",
)


def lost_peer(exc: BaseException) -> str | None:
    """If ``exc`` is a collective failing because another rank died: which one ("rank 1 (pid
    4242)" for a dead rank on this node, else "a rank on another node"); otherwise None."""
    text = str(exc)
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(exc, dist_error) or any(t in text for t in _LOST_PEER_TEXT)):
        return None
    if not _PEERS:
        return None
    host = socket.gethostname()
    dead = [
        f"rank {rank} (pid {pid})"
        for rank, (peer_host, pid) in enumerate(_PEERS)
        if peer_host == host and pid != os.getpid() and not _alive(pid)
    ]
    if dead:
        return ", ".join(dead)
    if any(peer_host != host for peer_host, _ in _PEERS):
        return "a rank on another node"
    return None  # every local peer lives: not a lost peer, keep the traceback


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")  # a zombie has died; its parent has not collected it yet


def parallel_sizes(parallel) -> dict:
    """``parallel_state.initialize_model_parallel`` size kwargs for a ParallelConfig."""
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def model_parallel_groups() -> list:
    """Every process group this process holds besides the default (world) one.

    Megatron-Core creates all of its groups (TP, PP, DP and their gloo twins, CP and hierarchical
    CP, embedding and position-embedding, expert TP/EP/DP, the distributed-optimizer instance
    groups, all-gather groups, ...) through ``torch.distributed.new_group``, so torch's registry
    is the complete list; walking it also catches groups created lazily after initialization.
    """
    if not dist.is_initialized():
        return []
    world = dist.GroupMember.WORLD
    return [pg for pg in list(dist.distributed_c10d._world.pg_map) if pg is not world]


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel state *and* the process groups behind it.

    ``parallel_state.destroy_model_parallel`` only drops its handles: every gloo group keeps
    its worker threads (``pt_gloo_runloop``/``gloo_tcp_loop``) and every NCCL group its
    communicator until the process exits, so each re-initialization in a long-lived process
    (tests, resharding, the planner, notebooks) leaked about 20 groups. Destroy them here.

    ``destroy_process_group`` does not stop a gloo group's threads: they stop when the last
    Python handle of the group dies. Megatron's process-wide caches hold such handles past the
    models that created them, so they are emptied here too (:func:`_clear_megatron_caches`).
    """
    from megatron.core import parallel_state

    groups = model_parallel_groups()
    if parallel_state.model_parallel_is_initialized() or groups:
        parallel_state.destroy_model_parallel()
    _drop_stale_handles(parallel_state)
    _clear_megatron_caches()
    registry = dist.distributed_c10d._world.pg_map
    for group in groups:
        # Destroying a group can take others with it (a split group's parent), so look again.
        if group in registry:
            dist.destroy_process_group(group)
    # Models built on the old groups hold handles inside reference cycles: collect them now
    # rather than whenever the cyclic GC next runs (a test session reached 1,000+ idle gloo
    # threads). Also when no group is left: a cache emptied above may have held the last ones.
    gc.collect()


RESET_NAMES: tuple[tuple[str, str], ...] = (
    ("megatron.core.transformer.moe.moe_utils", "MoEAuxLossAutoScaler"),
    ("megatron.core.transformer.multi_token_prediction", "MTPLossAutoScaler"),
    ("megatron.core.transformer.experimental_attention_variant.dsa", "DSAIndexerLossAutoScaler"),
)
"""Megatron-Core classes whose ``main_loss_backward_scale`` (process-wide state) is reset here;
``tests/unit/test_runtime_leaks.py`` checks that each still has that attribute."""


def _clear_megatron_caches() -> None:
    """Reset Megatron-Core's process-wide state that outlives a model (and may hold its groups).

    * The MoE metrics tracker (``moe_logging``): its entries keep the reduce groups of the
      model that last recorded an aux loss, and its per-layer tensors are sized by that model
      (a deeper MoE model built later in the process indexed past them).
    * The aux-loss backward scales of the MoE, MTP and DSA-indexer loss autoscalers (class
      attributes, :data:`RESET_NAMES`): the first scale set is kept and later ones are copied
      into it, so a bare ``backward()`` (0-dim default scale) broke the next trainer's schedule
      ("output with shape [] doesn't match the broadcast shape [1]"), and a scale of an earlier
      run's micro-batch count silently scaled the next model's aux-loss gradients.
    * Methods cached with ``functools.lru_cache``: the cache keys hold ``self``, so
      ``RotaryEmbedding.forward`` (maxsize 32) kept up to 32 dead models' rotary embeddings,
      each with its context-parallel group, alive for the life of the process (measured: one
      destroyed group per model built, about 3 gloo threads each). Every cached method of a
      loaded ``megatron.core`` class is cleared, so one added in an upgrade is covered too.
    """
    from megatron.core.transformer.moe import moe_logging

    moe_logging.destroy_moe_metrics_tracker()
    for module_name, cls_name in RESET_NAMES:
        module = sys.modules.get(module_name)  # only what is loaded: nothing else can hold state
        if module is not None:
            cls = getattr(module, cls_name)
            # Megatron's initial values: MTP's scaler starts at 1.0, the others start unset.
            initial = torch.tensor(1.0) if cls_name == "MTPLossAutoScaler" else None
            cls.main_loss_backward_scale = initial
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron.core"):
            continue
        for cls in list(vars(module).values()):
            if not isinstance(cls, type) or cls.__module__ != name:
                continue
            for attr in list(vars(cls).values()):
                if callable(getattr(attr, "cache_clear", None)):
                    attr.cache_clear()


def _drop_stale_handles(module) -> None:
    """Reset module globals that still hold process groups after ``destroy_model_parallel``.

    Megatron-Core 0.19.2 forgets ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`` and its gloo
    twin; a handle kept alive keeps a destroyed gloo group's threads alive with it. Checked
    generically so a group added in an upgrade cannot leak the same way.
    """
    for name, value in list(vars(module).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(module, name, None)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, dist.ProcessGroup) for v in value):
            setattr(module, name, None)
        elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
            setattr(module, name, {})


def initialize_model_parallel(parallel, seed: int) -> None:
    """Create Megatron's TP/PP/EP/CP/DP groups and seed its RNG tracker.

    ``parallel`` is a :class:`megaspan.config.schema.ParallelConfig`. Groups of an earlier call
    are destroyed first, so re-initializing any number of times holds one set of groups.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available() and not cpu_compat.is_applied():
        raise RuntimeError(
            "Megatron-Core needs CUDA: on a CPU-only machine call megaspan.runtime.setup_cpu() at "
            "the entry point (the megaspan commands and the test fixtures do) before building models"
        )
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel_sizes(parallel))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def freeze_imports() -> None:
    """Collect, then move every object alive now out of the cyclic garbage collector's reach
    (``gc.freeze``). Call once per process, after the heavy imports and before any model exists.

    torch, Megatron-Core and their imports leave ~10^6 long-lived objects, and every full
    collection walks them all: ~0.3 s a pass on a 2-core CPU, paid by each :func:`destroy`
    (its ``gc.collect`` is what stops dead groups' gloo threads) and by Python's own generation-2
    passes during training, which land at different steps on different ranks (the stragglers
    Megatron-LM's ``--manual-gc`` exists for). Frozen objects are never scanned again; they are
    still freed by reference counting, so only cycles among them would outlive the process,
    which is why nothing built from a config (models, groups, optimizers) may exist yet.
    """
    gc.collect()
    gc.freeze()


def destroy() -> None:
    """Leave no Megatron or torch.distributed state behind in this process.

    Destroys every process group (model-parallel ones first, then the world), empties
    Megatron's process-wide caches that hold groups or are sized by a model (MoE metrics
    tracker, cached methods), and resets the other process-wide Megatron state a trainer sets
    up (the number-of-microbatches calculator, the model-parallel RNG tracker), so the next
    model built in this process (a test, a notebook cell, a sweep worker) starts as in a
    fresh interpreter.
    """
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.tensor_parallel import random as mpu_random

    destroy_model_parallel()
    destroy_num_microbatches_calculator()
    # force_reset drops the tracker and its per-name RNG states; the next
    # initialize_model_parallel seeds a new one.
    mpu_random.initialize_rng_tracker(force_reset=True)
    if dist.is_initialized():
        dist.destroy_process_group()
