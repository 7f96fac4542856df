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
    saved = (os.dup(1), os.dup(2))
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        rc: int
        with open(request["log"], "a") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                result = main(list(request["argv"]))
                rc = int(result) if isinstance(result, int) else 0
            except SystemExit as exc:  # argparse errors exit 2
                rc = exc.code if isinstance(exc.code, int) else 1
            except KeyboardInterrupt:
                rc = 130
            except BaseException:  # noqa: BLE001 - a cell's crash is the cell's result, not the worker's
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                if frozen:
                    gc.collect()  # the finished trainer's model and optimizer, before the next is built
                else:
                    # After the first cell torch and Megatron-Core are imported (under the CLI's
                    # warning filters) and the cell's own objects are gone: freeze what is left,
                    # so every later collection walks only what one cell built.
                    from megaspan.runtime import freeze_imports

                    freeze_imports()
                    frozen = True
        proto.write(json.dumps({"index": request["index"], "rc": rc}) + "\n")
        if rc == 130:
            break  # Ctrl-C: the cell saved its checkpoint; stop taking cells
    return 0


if __name__ == "__main__":
    sys.exit(serve(*sys.argv[1:2]))
