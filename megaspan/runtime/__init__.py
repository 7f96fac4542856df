"""Runtime: process groups, device selection and the CPU compatibility layer."""

from megaspan.runtime.cpu_compat import apply as apply_cpu_compat
from megaspan.runtime.distributed import (
    DistEnv,
    destroy,
    destroy_model_parallel,
    device,
    env_from_launcher,
    free_port,
    freeze_imports,
    init_process_group,
    initialize_model_parallel,
    model_parallel_groups,
    setup_cpu,
)

__all__ = [
    "DistEnv",
    "apply_cpu_compat",
    "destroy",
    "destroy_model_parallel",
    "device",
    "env_from_launcher",
    "free_port",
    "freeze_imports",
    "init_process_group",
    "initialize_model_parallel",
    "model_parallel_groups",
    "setup_cpu",
]
