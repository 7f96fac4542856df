"""``python -m megaspan.sweep.worker``: run sweep cells one after another in one process.

A ``megaspan train`` process spends ~12 s importing torch and Megatron-Core before its first
step; a small CPU cell trains for less than that. The local runner (``megaspan sweep``, unless
``--isolate``) therefore starts ``--jobs`` of these workers and hands each one cell at a time.

Protocol (one JSON object per line): the runner writes ``{"index": i, "argv": [...], "log":
path}`` on stdin; the worker runs ``megaspan <argv>`` in-process (the same ``megaspan.cli.main``
the command line runs: same validation, exit codes, summary.json) with its stdout and stderr
(file descriptors 1 and 2, so C-level output too) appended to ``log``, then answers ``{"index": i,
"rc": code}`` on its original stdout. EOF on stdin ends the worker.

``megaspan.training.build.train`` tears down everything a run creates (process group, Megatron
parallel state, micro-batch calculator) and re-seeds every RNG at the start of the next, so a
cell run here trains exactly as it would in a fresh process (tests/unit/test_sweep_stages.py
compares the two). A crash that kills the interpreter takes only the cell in flight with it: the
runner reports that cell failed and starts a new worker for the rest.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import traceback


def _entry(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "main")


def serve(entry: str = "megaspan.cli:main") -> int:
    from megaspan.launchers import stop_with_launchers

    # The runner listed itself in MEGASPAN_WATCH_PIDS: when it is killed -9, this worker stops
    # too (SIGTERM to itself: a cell in flight saves its checkpoint; an idle worker just ends),
    # as a `megaspan train` of its own would.
    stop_with_launchers()
    try:
        return _serve(entry)
    except KeyboardInterrupt:  # Ctrl-C while waiting for a cell: nothing in flight, just end
        return 130


def _serve(entry: str) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    main = _entry(entry)
    frozen = False
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        with open(request["log"], "a") as log:
            rc = run_captured(main, request["argv"], log.fileno(), log.fileno())
        if frozen:
            gc.collect()  # the finished trainer's model and optimizer, before the next is built
        else:
            # After the first cell torch and Megatron-Core are imported (under the CLI's warning
            # filters) and the cell's own objects are gone: freeze what is left, so every later
            # collection walks only what one cell built.
            from megaspan.runtime import freeze_imports

            freeze_imports()
            frozen = True
        proto.write(json.dumps({"index": request["index"], "rc": rc}) + "\n")
        if rc == 130:
            break  # Ctrl-C: the cell saved its checkpoint; stop taking cells
    return 0


def run_captured(main, argv, out_fd: int, err_fd: int) -> int:
    """``main(argv)`` in this process with file descriptors 1 and 2, and ``sys.stdout`` /
    ``sys.stderr``, on ``out_fd`` / ``err_fd`` (C-level output too), put back afterwards. Returns
    the exit code a process of its own would give: ``main``'s int (0 otherwise), a ``SystemExit``'s
    int code (argparse errors: 2; any other code: 1), 130 for Ctrl-C, and 1, with the traceback on
    ``err_fd``, for any other exception (a cell's crash is the cell's result, not the worker's).
    The tests run CLI commands through it too (``tests.helpers.cli.in_process``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # New streams on the redirected descriptors: the current sys.stdout may not write to fd 1 at
    # all (pytest's capture replaces it); line-buffered keeps Python's and C's lines in order.
    streams = (open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False))  # noqa: SIM115
    sys.stdout, sys.stderr = streams
    try:
        result = main(list(argv))
        return int(result) if isinstance(result, int) else 0
    except SystemExit as exc:  # argparse errors exit 2
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a process of its own
        traceback.print_exc()
        return 1
    finally:
        for stream in streams:
            stream.close()  # flushes; the descriptors stay open (closefd=False)
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)


if __name__ == "__main__":
    sys.exit(serve(*sys.argv[1:2]))
