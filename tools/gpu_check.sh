#!/usr/bin/env bash
# GPU node check: the one command that proves a GPU node can run megaspan. It prints a PASS /
# FAIL / SKIP / MISS line per check (tools/gpu_check.py says what each covers) and exits non-zero
# when any check failed or left no result.
#
#   tests/gpu grouped into checks: every placement trains on the local backend (bf16) and on TE in
#     bf16 / FP8 tensorwise / FP8 delayed; hybrid and MoE grouped GEMM on TE; FP8-delayed save and
#     resume; a local-backend checkpoint loads into TE
#   CPU vs GPU: the same checkpoint trained 4 steps on the CPU and on the GPU, fp32, TF32 off
#   with >= 2 GPUs: TP2+SP, PP2, CP2, EP2 (+ grouped GEMM) against one GPU's losses
#   megaspan bench on the H100 presets (BENCH=0 skips it)
#
# Inside the image from docker/ (Transformer Engine present), from a checkout mounted at its
# root, as your own user so that results are yours and the run works for any uid:
#
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#       -v "$PWD":/workspace/megaspan -w /workspace/megaspan megaspan:<tag> tools/gpu_check.sh
#
# On a bare CUDA machine without TE (torch + megatron-core only) the TE checks SKIP and the rest
# runs on the local backend in bf16/fp32: what such a box can check.
#
# Environment: OUT (results; default runs/gpu_check/<date>, or under /tmp when the checkout is
# not writable), PYTHON, BENCH=0|1, PRESETS="h100-1b h100-moe", PRECISIONS, PLACEMENTS=pre,spannorm,
# BENCH_ARGS, NPROC (ranks of the MoE bench), ONLY=check,prefix,... (run just those),
# GPU_CHECK_TIMEOUT (seconds per training run). Without a CUDA device it prints SKIP and exits 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
export PYTHON=$PY

stamp=$(date +%Y%m%d-%H%M%S)
if [[ -z ${OUT:-} ]]; then
    if mkdir -p runs/gpu_check 2>/dev/null && [[ -w runs/gpu_check ]]; then
        OUT=$PWD/runs/gpu_check/$stamp
    else
        OUT=${TMPDIR:-/tmp}/megaspan_gpu_check/$stamp
        echo "gpu_check: the checkout is not writable for uid $(id -u): results go to $OUT"
    fi
fi
mkdir -p "$OUT"
export OUT

# `docker run --user` with a uid the image does not know leaves HOME=/ (not writable): give
# every cache that lives under HOME (Triton, torch extensions, matplotlib, pip) a home in OUT.
if [[ -z ${HOME:-} || ! -w ${HOME:-/} ]]; then
    export HOME=$OUT/home
    mkdir -p "$HOME"
fi
export MEGASPAN_CACHE_DIR=${MEGASPAN_CACHE_DIR:-$OUT/cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton}
export MPLCONFIGDIR=${MPLCONFIGDIR:-$HOME/.matplotlib}

# The GPU defaults of the launchers (CUDA_DEVICE_MAX_CONNECTIONS, TE's FP8 extra-state opt-in, ...).
# shellcheck source=launch/env.sh
source launch/env.sh
megaspan_gpu_env_defaults

exec "$PY" tools/gpu_check.py
