#!/usr/bin/env bash
# Run the test suite (CPU). Brings up the local Slurm cluster for tests/slurm when possible
# (root + Debian packages; otherwise those tests skip with a reason) and tears it down after.
#
#   tools/setup.sh && tools/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

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

PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest -q --durations=15 "$@"
