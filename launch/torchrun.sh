#!/usr/bin/env bash
# Single-node megaspan training without Slurm: torchrun starts NPROC ranks on this machine.
#
#   launch/torchrun.sh --config recipe.yaml model.num_layers=24       # one rank per GPU
#   NPROC=2 launch/torchrun.sh model.num_layers=2 training.steps=20   # 2 CPU ranks (gloo)
#
# NPROC        ranks (default: number of GPUs, or 1 without GPUs)
# MEGASPAN_CMD command instead of `megaspan train` (word-split)
# MASTER_PORT  rendezvous port (default: torchrun --standalone picks a free one)
# All arguments go to `megaspan train`. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
# MASTER_PORT; megaspan picks gloo on CPU and NCCL on GPU by itself. The GPU env defaults of
# launch/env.sh (CUDA_DEVICE_MAX_CONNECTIONS=1, NCCL/TE settings) apply when GPUs are present.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/env.sh
source "$HERE/env.sh"

if [[ -z ${NPROC:-} ]]; then
    NPROC=1
    if megaspan_has_gpus && command -v nvidia-smi >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L | grep -c '^GPU' || true)
        ((NPROC > 0)) || NPROC=1
    fi
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: NPROC must be a positive integer" >&2; exit 2; }

# Split the cores between ranks unless told otherwise.
: "${OMP_NUM_THREADS:=$(($(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1))}"
export OMP_NUM_THREADS
megaspan_common_env
megaspan_gpu_env_defaults
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache_${USER:-$(id -u)}_0}
megaspan_resolve_cmd

if command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=(torchrun)
else
    TORCHRUN=("${MEGASPAN_PYTHON:-python3}" -m torch.distributed.run)
fi
RDZV=(--standalone)
if [[ -n ${MASTER_PORT:-} ]]; then
    RDZV=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT")
fi

set -x
exec "${TORCHRUN[@]}" "${RDZV[@]}" --nnodes=1 --nproc-per-node="$NPROC" --no-python \
    "${MEGASPAN_CMD_ARGV[@]}" "$@"
