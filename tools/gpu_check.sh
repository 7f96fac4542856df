#!/usr/bin/env bash
# GPU check: run the GPU tests, then `megaspan bench` on the H100 presets in bf16 and FP8
# (tensorwise and delayed scaling), and print one summary table with the issue-10 targets.
#
# Meant to run inside the image from docker/ (Transformer Engine present), from a checkout
# mounted at its root, with no edits:
#
#   docker run --rm --gpus all --ipc=host -v "$PWD":/workspace/megaspan megaspan:<tag> tools/gpu_check.sh
#
# Options (environment):
#   OUT=dir            where the JSON results and logs go (default: runs/gpu_check/<date>)
#   PRESETS="h100-1b h100-moe"
#   PRECISIONS="bf16 fp8-tensorwise fp8-delayed"
#   PLACEMENTS=pre,spannorm
#   NPROC=n            processes for the MoE preset (EP = n); default: min(8, GPUs)
#   BENCH_ARGS="..."   extra `megaspan bench` arguments (e.g. "--repeats 5 model.num_layers=12")
#   PYTHON=python      interpreter (default: .venv/bin/python if present, else python)
#
# Without a CUDA device it prints why and exits 0 (nothing to check). Without Transformer Engine
# the TE tests skip and only bf16 is benched (local backend); FP8 needs TE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
PRESETS=${PRESETS:-"h100-1b h100-moe"}
PRECISIONS=${PRECISIONS:-"bf16 fp8-tensorwise fp8-delayed"}
PLACEMENTS=${PLACEMENTS:-pre,spannorm}
read -r -a EXTRA <<<"${BENCH_ARGS:-}"

ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [[ $ngpu == 0 ]]; then
    echo "gpu_check: skipped: no CUDA device visible (run it on a GPU host, see the header)"
    exit 0
fi
have_te=$("$PY" -c 'import importlib.util as u; print(int(u.find_spec("transformer_engine") is not None))')
if [[ $have_te == 0 ]]; then
    echo "gpu_check: Transformer Engine not installed: TE tests skip, FP8 is not benched (local backend, bf16)"
    PRECISIONS=bf16
fi
NPROC=${NPROC:-$((ngpu < 8 ? ngpu : 8))}
mkdir -p "$OUT"
echo "gpu_check: $ngpu GPU(s), TE=$have_te, results in $OUT"
"$PY" -m megaspan info | tee "$OUT/info.txt" || true

status=0
echo "== tests/gpu"
if ! "$PY" -m pytest -q tests/gpu 2>&1 | tee "$OUT/tests_gpu.log"; then
    echo "gpu_check: tests/gpu FAILED" >&2
    status=1
fi

results=()
for preset in $PRESETS; do
    json="$OUT/bench-$preset.json"
    read -r -a precisions <<<"$PRECISIONS"
    args=(bench --preset "$preset" --placements "$PLACEMENTS" --precision "${precisions[@]}" --json "$json" "${EXTRA[@]}")
    if [[ $preset == *moe* && $NPROC -gt 1 ]]; then
        cmd=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megaspan "${args[@]}")
    else
        cmd=("$PY" -m megaspan "${args[@]}")
    fi
    echo "== ${cmd[*]}"
    if "${cmd[@]}" 2>&1 | tee "$OUT/bench-$preset.log"; then
        results+=("$json")
    else
        echo "gpu_check: bench $preset FAILED (log: $OUT/bench-$preset.log)" >&2
        status=1
    fi
done

if ((${#results[@]})); then
    echo "== summary"
    "$PY" -m megaspan bench --summary "${results[@]}" | tee "$OUT/summary.md"
fi
exit $status
