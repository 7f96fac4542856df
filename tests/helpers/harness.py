"""Multi-process test harness: real gloo process groups on CPU.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, initializes
torch.distributed (gloo, free port) in each through megaspan's own runtime, runs
``fn(rank, world_size, *args)`` and returns the per-rank return values. A failure in any rank
raises ``DistributedTestError`` carrying that rank's traceback. ``fn`` must be importable
(module-level) because processes are spawned, not forked: forking a process that already
imported torch threads is unsafe.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback

from megaspan.runtime.distributed import free_port


class DistributedTestError(AssertionError):
    pass


def _worker(rank: int, world_size: int, port: int, fn, args, results) -> None:
    try:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            # Two ranks on two cores: more intra-op threads only oversubscribe.
            OMP_NUM_THREADS="1",
        )
        import logging
        import warnings

        import torch

        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
        from megaspan.runtime import destroy, init_process_group

        init_process_group(timeout_s=300)
        try:
            out = fn(rank, world_size, *args)
        finally:
            destroy()
        # Plain pickle, not multiprocessing's ForkingPickler: tensors travel by value instead of
        # as shared-memory handles that die with this process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size and not errors:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                reported = outputs.keys() | errors.keys()
                dead = [r for r, p in enumerate(procs) if r not in reported and not p.is_alive()]
                if dead:
                    # Give a result that raced the exit a last chance to arrive.
                    time.sleep(1.0)
                    if results.empty():
                        code = procs[dead[0]].exitcode
                        errors[dead[0]] = f"process exited with code {code} without reporting a result"
                elif time.monotonic() > deadline:
                    raise DistributedTestError(f"timed out after {timeout}s waiting for ranks") from None
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload  # the other ranks are probably blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        rank, tb = sorted(errors.items())[0]
        raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{tb}")
    return [outputs[r] for r in range(world_size)]
