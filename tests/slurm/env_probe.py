"""Launcher env probe: what launch/slurm/train.sbatch (via MEGASPAN_CMD) runs in the launcher tests.

It checks the rank/rendezvous wiring with a real gloo process group and all_reduce, and writes what
each rank saw to ``<training.run_dir>/probe/restart<R>-rank<N>.json``. With PROBE_WAIT_SIGNAL=1 it
also follows the trainer's signal contract on the first start (wait for SIGUSR1/SIGTERM, write
``<run_dir>/preempted``, exit 0) so the batch script's forward-and-requeue path can be tested
without the trainer. It is a test of the launcher, not of training.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    run_dir = None
    for arg in argv:
        if arg.startswith("training.run_dir="):
            run_dir = Path(arg.split("=", 1)[1])
    if run_dir is None:
        print("env_probe: no training.run_dir=... argument", file=sys.stderr)
        return 2

    usr1_at_start = signal.getsignal(signal.SIGUSR1)
    got = {"signal": None}

    def handler(signum, _frame):
        got["signal"] = signal.Signals(signum).name

    # Like the trainer, which installs its handlers only when its step loop starts.
    time.sleep(float(os.environ.get("PROBE_HANDLER_DELAY", "0")))
    previous = {s: signal.signal(s, handler) for s in (signal.SIGUSR1, signal.SIGTERM)}

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())

    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    record = {
        "argv": argv,
        "rank": rank,
        "world_size": world,
        "all_reduce_sum": t.item(),
        "usr1_at_start": getattr(usr1_at_start, "name", str(usr1_at_start)),
        "hosts": hosts,
        "env": {
            k: os.environ.get(k)
            for k in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "NODE_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_JOB_ID",
                "SLURM_RESTART_COUNT",
                "SLURM_ARRAY_TASK_ID",
                "OMP_NUM_THREADS",
                "PYTHONUNBUFFERED",
                "CUDA_DEVICE_MAX_CONNECTIONS",
                "TRITON_CACHE_DIR",
            )
        },
    }
    out = run_dir / "probe"
    out.mkdir(parents=True, exist_ok=True)

    if os.environ.get("PROBE_WAIT_SIGNAL") == "1" and restart == 0:
        (out / f"ready-rank{rank}").write_text("ready\n")
        print(f"probe rank {rank}: waiting for a signal", flush=True)
        deadline = time.monotonic() + float(os.environ.get("PROBE_WAIT_SECONDS", "120"))
        while got["signal"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        record["signal"] = got["signal"]
        if got["signal"] is not None and rank == 0:
            (run_dir / "preempted").write_text(f"step 0 signal {got['signal']}\n")
        print(f"probe rank {rank}: got {got['signal']}", flush=True)

    (out / f"restart{restart}-rank{rank}.json").write_text(json.dumps(record, indent=1))
    print(
        f"probe rank {rank}/{world}: all_reduce={t.item()} master="
        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()
    # Like the trainer's PreemptionFlag.restore(): back to the inherited disposition (SIG_IGN
    # under train.sbatch). CPython resets signals that still have a Python handler to SIG_DFL
    # at interpreter shutdown, where a late re-sent warning would otherwise kill the process.
    for signum, old in previous.items():
        signal.signal(signum, old)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
