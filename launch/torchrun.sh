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

# torchrun's own Python, so the shim below imports the same torch.
TORCHRUN_PY=${MEGASPAN_PYTHON:-python3}
if TORCHRUN_BIN=$(command -v torchrun 2>/dev/null); then
    read -r SHEBANG <"$TORCHRUN_BIN" || true
    [[ $SHEBANG == '#!'*python* ]] && TORCHRUN_PY=${SHEBANG#\#!}
fi
RDZV=(--standalone)
if [[ -n ${MASTER_PORT:-} ]]; then
    RDZV=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT")
fi

# ---- signals ------------------------------------------------------------------------------------
# Plain `exec torchrun` loses a checkpoint on `kill -TERM -PGID` or Ctrl-C: torchrun catches the
# signal, raises its SignalException (a traceback), SIGTERMs each rank's whole process group and
# SIGKILLs whatever still runs 30 s later, in the middle of the save. Instead:
#   * torchrun runs under a shim that gives SIGTERM/SIGINT/SIGUSR1 a no-op Python handler (reset to
#     the default in the ranks at exec, unlike SIG_IGN) and handles only SIGHUP/SIGQUIT
#     (--signals-to-handle): a signal to the whole group does not make it tear the
#     ranks down;
#   * this shell traps the signals and forwards them to the ranks (torchrun's children; each
#     rank is its own session, so a group signal does not reach them directly), then waits:
#     the ranks checkpoint at the step boundary and exit 0, and so do torchrun and this script.
#   * Ctrl-C (SIGINT) is forwarded as SIGTERM, so the ranks exit 0 and torchrun reports no failed
#     worker; this script then exits 130, as a shell expects after Ctrl-C. A second Ctrl-C is
#     forwarded as SIGINT, which aborts the ranks at once (no checkpoint).
#   * SIGKILL cannot be trapped: the shim lists this script's pid and torchrun's in
#     MEGASPAN_WATCH_PIDS (megaspan/launchers.py), and each rank stops with a checkpoint once one of
#     them is no longer its ancestor: kill -9 of this script or of torchrun leaves no rank running.
#     kill -9 of a rank makes torchrun stop the others (no helper processes remain: megaspan's
#     checkpoint writer has none).
# shellcheck disable=SC2016
SHIM='import os, signal, sys
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, lambda *_: None)
watch = os.environ.get("MEGASPAN_WATCH_PIDS", "").split()
os.environ["MEGASPAN_WATCH_PIDS"] = " ".join(watch + [str(os.getppid()), str(os.getpid())])
from torch.distributed.run import get_args_parser, main
if any("--signals-to-handle" in a.option_strings for a in get_args_parser()._actions):
    sys.argv.insert(1, "--signals-to-handle=SIGHUP,SIGQUIT")
sys.argv[0] = "torchrun"
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
try:
    sys.exit(main())
except ChildFailedError as err:
    # One line instead of its traceback and failure table (each rank has said what happened).
    how = lambda f: f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited {f.exitcode}"
    print("torchrun: " + "; ".join(f"rank {r} (pid {f.pid}) {how(f)}" for r, f in sorted(err.failures.items())), file=sys.stderr)
    sys.exit(1)'
GOT=""
TR_PID=""
# shellcheck disable=SC2317 # reached through the `trap` handlers below
forward() {  # forward SIGNAL-FOR-RANKS
    local pid
    [[ -n $TR_PID ]] || return 0
    for pid in $(pgrep -P "$TR_PID" 2>/dev/null); do
        kill -s "$1" "$pid" 2>/dev/null || true
    done
    echo "torchrun.sh: forwarded SIG$1 to the ranks; waiting for their checkpoint" >&2
}
# shellcheck disable=SC2317 # reached through `trap`
on_int() {
    if [[ $GOT == INT ]]; then forward INT; else GOT=INT; forward TERM; fi
}
# shellcheck disable=SC2317
on_term() { [[ -n $GOT ]] || GOT=$1; forward "$1"; }
trap on_int INT
trap 'on_term TERM' TERM
trap 'on_term USR1' USR1

set -x
"$TORCHRUN_PY" -c "$SHIM" "${RDZV[@]}" --nnodes=1 \
    --nproc-per-node="$NPROC" --no-python "${MEGASPAN_CMD_ARGV[@]}" "$@" &
TR_PID=$!
{ set +x; } 2>/dev/null
RC=0
while :; do
    RC=0
    wait "$TR_PID" || RC=$?
    # `wait` returns >128 when a trapped signal interrupts it; torchrun is still running then.
    if ((RC > 128)) && kill -0 "$TR_PID" 2>/dev/null; then
        continue
    fi
    break
done
if [[ $GOT == INT && $RC == 0 ]]; then
    exit 130
fi
exit "$RC"
