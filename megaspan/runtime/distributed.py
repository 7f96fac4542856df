"""Process-group and model-parallel initialization for torchrun, Slurm and single-process runs."""

from __future__ import annotations

import datetime
import os
import socket
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


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(timeout_s: int = 600) -> DistEnv:
    """Initialize torch.distributed (gloo on CPU, nccl on GPU) once per process."""
    cpu_compat.apply()
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
    return denv


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


def initialize_model_parallel(parallel, seed: int) -> None:
    """Create Megatron's TP/PP/EP/CP/DP groups and seed its RNG tracker.

    ``parallel`` is a :class:`megaspan.config.schema.ParallelConfig`.
    """
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel_sizes(parallel))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
