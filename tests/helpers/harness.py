"""The multi-process test harness: real gloo process groups on CPU.

A :class:`Pool` spawns ``world_size`` rank processes once; each initializes torch.distributed
(gloo, free port) through megaspan's own runtime and then runs jobs: ``pool.run(fn, *args,
timeout=S)`` calls ``fn(rank, world_size, *args)`` on every rank and returns the per-rank return
values. Starting a rank costs ~10 s (torch + Megatron imports), so one pool serves many jobs
(tests re-initialize Megatron's model-parallel state per case; the runtime destroys the previous
groups, so that does not pile up threads). ``run_distributed(fn, world_size, *args, timeout=S)``
is a one-job pool.

A failure in any rank raises :class:`DistributedTestError` carrying that rank's traceback. Every
job names its timeout (sized from a measured run, with margin): a hang fails that one job with
the ranks that did not report, instead of blocking until pytest-timeout ends the session. After a
failure the pool is closed (the other ranks may be stuck in a collective) and the next job starts
a fresh one. ``fn`` must be importable (module-level) because ranks are spawned, not forked:
forking a process that already imported torch threads is unsafe.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback

from megaspan.runtime.distributed import free_port

START_TIMEOUT_S = 180.0
"""Spawning a rank and importing torch + Megatron: ~10-20 s on a loaded 2-core machine."""


class DistributedTestError(AssertionError):
    pass


def _setup_rank(rank: int, world_size: int, port: int) -> None:
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
    from megaspan.runtime import freeze_imports, init_process_group, setup_cpu
    from megaspan.training import build  # noqa: F401 - every job needs it: imported before the freeze

    setup_cpu()
    init_process_group(timeout_s=300)
    # A rank runs dozens of jobs, each ending in runtime.destroy()'s full collection: with the
    # imports frozen those walk what one job built, not all of torch and Megatron (0.3 s each).
    freeze_imports()


def _rank_main(rank: int, world_size: int, port: int, inbox, results) -> None:
    try:
        _setup_rank(rank, world_size, port)
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((None, rank, "error", traceback.format_exc()))
        return
    results.put((None, rank, "ready", b""))
    from megaspan.runtime import destroy

    try:
        while (job := inbox.get()) is not None:
            job_id, fn, args = job
            try:
                out = fn(rank, world_size, *args)
                # Plain pickle, not multiprocessing's ForkingPickler: tensors travel by value
                # instead of as shared-memory handles that die with this process.
                results.put((job_id, rank, "ok", pickle.dumps(out)))
            except BaseException:  # noqa: BLE001
                results.put((job_id, rank, "error", traceback.format_exc()))
    finally:
        destroy()


class Pool:
    """``world_size`` spawned ranks sharing one gloo process group, running jobs in turn."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list = []
        self._jobs = 0

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, self.world_size, port, self._inboxes[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(None, START_TIMEOUT_S, "start")

    def run(self, fn, *args, timeout: float) -> list:
        """``[fn(rank, world_size, *args) for each rank]``, each on its own rank process."""
        if not self.alive:
            self.close()
            self._start()
        self._jobs += 1
        job_id = self._jobs
        for inbox in self._inboxes:
            inbox.put((job_id, fn, args))
        outputs = self._collect(job_id, timeout, getattr(fn, "__name__", str(fn)))
        return [pickle.loads(outputs[r]) for r in range(self.world_size)]

    def _collect(self, job_id, timeout: float, what: str) -> dict[int, bytes]:
        outputs: dict[int, bytes] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(outputs) < self.world_size and not errors:
            try:
                got_id, rank, status, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                reported = outputs.keys() | errors.keys()
                dead = [r for r, p in enumerate(self._procs) if r not in reported and not p.is_alive()]
                if dead:
                    time.sleep(1.0)  # give a result that raced the exit a last chance to arrive
                    if self._results.empty():
                        code = self._procs[dead[0]].exitcode
                        errors[dead[0]] = f"process exited with code {code} without reporting a result"
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - reported)
                    self.close(kill=True)
                    raise DistributedTestError(
                        f"{what} on {self.world_size} ranks timed out after {timeout:.0f}s; "
                        f"ranks {missing} did not report"
                    ) from None
                continue
            if got_id != job_id and status != "error":
                continue  # a late answer of an earlier, failed job
            if status in ("ok", "ready"):
                outputs[rank] = payload
            else:
                errors[rank] = payload  # the other ranks are probably blocked in a collective
        if errors:
            self.close(kill=True)
            rank, tb = sorted(errors.items())[0]
            raise DistributedTestError(f"{what}: rank {rank} of {self.world_size} failed:\n{tb}")
        return outputs

    def close(self, kill: bool = False) -> None:
        if not kill:
            for inbox in getattr(self, "_inboxes", []):
                inbox.put(None)
        for p in self._procs:
            p.join(timeout=1 if kill else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        self._procs = []


def run_distributed(fn, world_size: int, *args, timeout: float) -> list:
    """One job on a fresh pool: ``[fn(rank, world_size, *args) for rank in range(world_size)]``."""
    pool = Pool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout)
    finally:
        pool.close()
