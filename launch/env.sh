# shellcheck shell=bash
# Shared environment defaults for megaspan launchers (sourced by launch/slurm/*.sbatch and
# launch/torchrun.sh; not executable on its own).
#
# Every variable is set only if the caller has not set it (": ${VAR:=default}"), so any of them
# can be overridden from the submitting shell (sbatch/srun export the environment by default).

# megaspan_has_gpus: 0 (true) when this node has NVIDIA GPUs. MEGASPAN_GPU=1/0 forces the answer.
megaspan_has_gpus() {
    case ${MEGASPAN_GPU:-auto} in
        1 | yes | true) return 0 ;;
        0 | no | false) return 1 ;;
    esac
    # Slurm tells us when GPUs were allocated; otherwise ask the driver.
    [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]] && return 0
    [[ -n ${SLURM_JOB_GPUS:-} ]] && return 0
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# megaspan_gpu_env_defaults: H100 (Hopper) defaults, exported only when GPUs are present.
# Values follow Megatron-LM's own sbatch examples (examples/megatron_fsdp/sbatch_mfsdp_deepseek_v3.sh)
# and megatron/training/arguments.py (CUDA_DEVICE_MAX_CONNECTIONS).
megaspan_gpu_env_defaults() {
    megaspan_has_gpus || return 0
    # TP/CP communication overlap needs kernels queued in issue order on Hopper and earlier.
    # Megatron says Blackwell+ does not need it and FSDP wants it unset or >1: set
    # CUDA_DEVICE_MAX_CONNECTIONS="" (empty) to leave it unset.
    if [[ -z ${CUDA_DEVICE_MAX_CONNECTIONS+x} ]]; then
        export CUDA_DEVICE_MAX_CONNECTIONS=1
    elif [[ -z $CUDA_DEVICE_MAX_CONNECTIONS ]]; then
        unset CUDA_DEVICE_MAX_CONNECTIONS
    fi
    # InfiniBand: service level and a longer retry timeout (4.096us * 2^19 ~ 2 s) for big jobs.
    export NCCL_IB_SL=${NCCL_IB_SL:-1}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
    export NCCL_P2P_NET_CHUNKSIZE=${NCCL_P2P_NET_CHUNKSIZE:-2097152}
    # Leave SMs free for communication kernels running beside TE's LayerNorm kernels.
    export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}
    export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}
    # Free NCCL buffers without recordStream (lower memory, what Megatron recommends).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # Transformer Engine >= 2.17 refuses to unpickle FP8 delayed-scaling state (scale_fwd,
    # amax_history) from a checkpoint without this opt-in: every resume of an FP8 run (requeue,
    # resume=auto, the guard's rollback) would fail. These are the run's own checkpoints.
    export NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=${NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE:-1}
    # Print one NCCL init line per rank on failure-prone clusters; WARN keeps logs small.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
}

# megaspan_common_env: always-on defaults (CPU and GPU).
megaspan_common_env() {
    # Unbuffered Python so per-rank log lines reach the Slurm output file as they happen.
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
    # One OpenMP thread per rank unless told otherwise (torch otherwise oversubscribes the cores).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

# megaspan_resolve_cmd: fill the array MEGASPAN_CMD_ARGV with the command to run.
# MEGASPAN_CMD (word-split, no quoting) overrides it, e.g. MEGASPAN_CMD="python my_probe.py".
# Default: the "megaspan" console script if on PATH, else "python -m megaspan".
# shellcheck disable=SC2034 # MEGASPAN_CMD_ARGV is this function's output, read by the caller
megaspan_resolve_cmd() {
    MEGASPAN_CMD_ARGV=()
    if [[ -n ${MEGASPAN_CMD:-} ]]; then
        read -r -a MEGASPAN_CMD_ARGV <<<"$MEGASPAN_CMD"
    elif command -v megaspan >/dev/null 2>&1; then
        MEGASPAN_CMD_ARGV=(megaspan train)
    else
        MEGASPAN_CMD_ARGV=("${MEGASPAN_PYTHON:-python3}" -m megaspan train)
    fi
}

# megaspan_arg_value KEY ARGS...: print the value of the last "KEY=value" among ARGS, if any.
megaspan_arg_value() {
    local key=$1 a value=""
    local found=1
    shift
    for a in "$@"; do
        if [[ $a == "$key="* ]]; then
            value=${a#"$key="}
            found=0
        fi
    done
    [[ $found == 0 ]] && printf '%s\n' "$value"
    return "$found"
}
