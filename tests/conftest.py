"""Session-wide test setup.

* ``MEGASPAN_CACHE_DIR`` points at a fresh temporary directory for the whole session (and every
  subprocess it starts), so no test reads or warms the user's ``~/.cache/megaspan`` and no test
  depends on another having built the tokenizer or corpus first (``tiny_corpus`` builds them).
* Tiers (``tools/test.sh --fast`` deselects the slow ones): markers are declared in pyproject.toml.
  ``--all`` runs the full placement x layout matrix of the distributed tests.
* In-process Megatron: ``single_process_group`` (world size 1, CPU emulation switched on
  explicitly) and ``mcore`` (model-parallel state reseeded and Megatron's caches emptied per
  test; the world-size-1 groups are kept from one test to the next).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# One intra-op thread, for this process and every subprocess it starts. The test models are tiny
# (a [16, 2, 64] matmul): a second OpenMP thread buys nothing and, on a shared 2-core machine,
# each op waits for a thread the OS has not scheduled. Measured under load on one 5-step in-process
# fit (tests/distributed/layout_workers.py config): 32-46 s with 2 threads, 0.6-1.0 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_CACHE_DIR = Path(tempfile.mkdtemp(prefix="megaspan-test-cache-"))
os.environ["MEGASPAN_CACHE_DIR"] = str(_CACHE_DIR)


def pytest_addoption(parser):
    parser.addoption(
        "--all",
        action="store_true",
        default=False,
        help="run the full placement x layout matrix (otherwise a representative subset; see slow)",
    )


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _has_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


# Markers by directory: a test under one of these folders gets these markers.
_DIRECTORY_MARKERS = {
    "distributed": ("distributed", "integration"),
    "slurm": ("slurm", "integration"),
    "e2e": ("slow", "integration"),
    "gpu": ("gpu",),
}


def _mark_tiers(items) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for directory, markers in _DIRECTORY_MARKERS.items():
            if "tests" in parts and directory in parts[parts.index("tests") + 1 : -1]:
                for marker in markers:
                    item.add_marker(getattr(pytest.mark, marker))


# Tests that must share one xdist worker (tools/test.sh runs the suite on MEGASPAN_TEST_WORKERS
# workers): every test on a gloo process pool (tests/distributed's package-scoped pools, any
# module using ``dist_pool``), and the one local Slurm cluster (its 2 CPUs; the time-limit tests'
# timing). Two sets of pool ranks at once on 2 cores is a collapse, not a slowdown: each rank keeps
# hundreds of gloo threads polling (see ``dist_pool``), and a first try without this rule ran at a
# load average of 300-400. Every other module is a unit of its own, so a module-scoped fixture (a
# trained checkpoint) is built once, on one worker.
_SHARED_WORKER_DIRECTORIES = ("distributed", "slurm")


def pytest_xdist_make_scheduler(config, log):
    """xdist's module-scope scheduler with the shared units above. (Not ``--dist loadgroup`` with
    ``xdist_group`` markers: pytest-xdist 3.8 under pytest 9 ignores the groups and spreads the
    tests of one group over every worker. ``_split_scope`` is the method xdist's own loadfile and
    loadgroup schedulers override.)"""
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath
    units: dict[str, str] = {}  # module path -> its unit

    class SharedUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module not in units:
                inside = Path(module).parts[1:-1]
                unit = next((d for d in _SHARED_WORKER_DIRECTORIES if d in inside), None)
                source = root / module
                if unit is None and source.is_file() and "dist_pool" in source.read_text(errors="replace"):
                    unit = "distributed"
                units[module] = unit or module
            return units[module]

    return SharedUnits(config, log)


def pytest_collection_finish(session):
    """Import torch, Megatron-Core and the trainer, then freeze everything alive
    (``megaspan.runtime.freeze_imports``): every full garbage collection after this (each
    in-process run's ``runtime.destroy()``, Python's own) walks what the tests built, not the
    ~10^6 objects of the imports and the collected test modules. Once per pytest process (each
    xdist worker), after collection; skipped when nothing was collected (``--collect-only``,
    an empty selection)."""
    if not session.items or session.config.option.collectonly:
        return
    from megaspan.runtime import freeze_imports
    from megaspan.training import build  # noqa: F401

    freeze_imports()


def pytest_collection_modifyitems(config, items):
    _mark_tiers(items)
    if not config.getoption("--all"):
        matrix = pytest.mark.skip(reason="full placement x layout matrix: run with --all")
        for item in items:
            if "full_matrix" in item.keywords:
                item.add_marker(matrix)
    # gpu: needs CUDA (the local backend on a bare CUDA box); te: also Transformer Engine.
    cuda, te = _has_cuda(), _has_te()
    no_cuda = pytest.mark.skip(reason="needs CUDA")
    no_te = pytest.mark.skip(reason="needs CUDA and Transformer Engine")
    for item in items:
        if item.get_closest_marker("te") and not (cuda and te):
            item.add_marker(no_te)
        elif item.get_closest_marker("gpu") and not cuda:
            item.add_marker(no_cuda)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The session's private ``MEGASPAN_CACHE_DIR``."""
    return _CACHE_DIR


@pytest.fixture(scope="session")
def tiny_corpus(cache_dir):
    """The ``tiny`` recipe's tokenizer and the preprocessed stdlib corpus, built once per session
    in the session cache (what ``megaspan train --config tiny`` would build on first use)."""
    from megaspan.config.loader import load_config
    from megaspan.data.preprocess import preprocess_stdlib
    from megaspan.data.tokenizer import build_tokenizer

    cfg = load_config("tiny", [])
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
    prefixes = preprocess_stdlib(tokenizer, cache_dir, progress=False)
    return tokenizer, prefixes


@pytest.fixture
def single_process_group():
    """A world-size-1 gloo group in the pytest process, with the CPU emulation switched on.

    Function-scoped and idempotent (both calls return at once when already done): an in-process
    ``train()`` tears the world group down at its end, and the next test must not inherit that.
    """
    from megaspan.runtime import init_process_group, setup_cpu

    setup_cpu()
    init_process_group()
    yield


@pytest.fixture
def mcore(single_process_group):
    """Megatron model-parallel state (TP=PP=EP=1) seeded identically for each test, with Megatron's
    process-wide caches emptied; world-size-1 groups of an earlier test are reused
    (:func:`tests.helpers.models.fresh_model_parallel`: re-creating them was ~0.4 s a test)."""
    from tests.helpers.models import fresh_model_parallel

    fresh_model_parallel(seed=1234)
    yield


@pytest.fixture(scope="module")
def dist_pool():
    """``dist_pool(world_size)`` -> a :class:`tests.helpers.harness.Pool` shared by one test module,
    so its cases pay each rank's start (torch + Megatron imports) once.

    Module-scoped, not session-scoped: a worker that has run many trainer jobs still holds the
    gloo threads of groups from earlier jobs (~880 threads and ~20% of a core per idle rank after
    tests/distributed/test_layouts.py; what keeps them alive in a worker, unlike in the in-process
    leak test, is not found yet), so pools end with the module that used them instead of idling
    through the rest of the suite."""
    from tests.helpers.harness import Pool

    pools: dict[int, Pool] = {}

    def get(world_size: int) -> Pool:
        return pools.setdefault(world_size, Pool(world_size))

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MB tmpfs (MEGASPAN_TEST_TMPFS_SIZE) to fill: a real full disk; skips without root."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = os.environ.get("MEGASPAN_TEST_TMPFS_SIZE", "3m")
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Every test leaves SIGINT/SIGTERM/SIGUSR1 as it found them. An in-process training run with
    a PreemptionFlag ends with ``finish()`` (SIGTERM/USR1 ignored, its SIGINT handler kept), and a
    later in-process test that relies on a signal's default then silently runs through it."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)
