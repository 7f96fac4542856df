#!/usr/bin/env bash
# Mutation testing, on demand (never in CI): mutate one module whose bugs would be silent and run
# only that module's targeted tests against each mutant. Survivors are bugs no test notices.
#
#   tools/mutate.sh MODULE            # norms | init | checkpoint | guard | report | schedule | data
#   tools/mutate.sh MODULE --count    # how many mutants, without running them
#   tools/mutate.sh --list            # the modules, their files and tests
#
# Tool: cosmic-ray (https://cosmic-ray.readthedocs.io), installed on first use into its own venv
# (.mutate-venv; the project's .venv is left alone). Each mutant runs in a fresh pytest process
# of the project's venv, over a copy of the committed tree (git archive HEAD) so the checkout is
# never modified. (mutmut 3 was tried first: it forks a process that already imported torch, and
# every mutant died with a segfault.)
#
# Output: runs/mutate/<module>-<date>/ with session.sqlite, report.txt (every mutant, survivors
# with their diff) and score.txt. How to read the score: docs/testing.md.
#
# Mutants run one at a time (each starts torch and Megatron: a 2-core machine fits one).
# Environment: MUTATE_TIMEOUT (seconds per mutant, default 600), MUTATE_FILTER (a pytest -k
# expression narrowing the tests), MUTATE_SAMPLE=N (test a random sample of N mutants, seeded by
# MUTATE_SEED, default 1: a module of hundreds of mutants takes hours; the score is then an
# estimate of the module's, with its 95% interval).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

declare -A FILES=(
    [norms]="megaspan/norms/placements megaspan/norms/layer.py megaspan/norms/modules.py"
    [init]="megaspan/norms/weights.py"
    [checkpoint]="megaspan/training/checkpoint"
    [guard]="megaspan/training/callbacks/guard.py"
    [report]="megaspan/report"
    [schedule]="megaspan/training/setup.py"
    [data]="megaspan/training/batches.py"
)
declare -A TESTS=(
    [norms]="tests/unit/test_placements.py tests/unit/test_placement_options.py tests/unit/test_init_rules.py"
    [init]="tests/unit/test_init_rules.py tests/unit/test_weight_kinds.py"
    [checkpoint]="tests/unit/test_checkpoint_*.py tests/unit/test_train_units.py"
    [guard]="tests/unit/test_train_guard.py"
    [report]="tests/unit/test_report*.py tests/unit/test_evidence*.py"
    [schedule]="tests/unit/test_lr_schedule.py tests/unit/test_train_units.py tests/unit/test_optimizer_precision.py tests/unit/test_train_guard.py tests/distributed/test_interleaved_ddp.py"
    [data]="tests/unit/test_batches.py tests/unit/test_loss_mask.py"
)

usage() {
    echo "usage: tools/mutate.sh MODULE [--count] | --list   (MODULE: ${!FILES[*]})" >&2
    exit 2
}

if [[ ${1:-} == --list ]]; then
    for m in "${!FILES[@]}"; do printf '%-11s %s\n            tests: %s\n' "$m" "${FILES[$m]}" "${TESTS[$m]}"; done
    exit 0
fi
module=${1:-}
[[ -n $module && -n ${FILES[$module]:-} ]] || usage
count_only=0
[[ ${2:-} == --count ]] && count_only=1
[[ -x .venv/bin/python ]] || { echo "tools/mutate.sh: no .venv: run tools/setup.sh first" >&2; exit 2; }

if [[ ! -x .mutate-venv/bin/cosmic-ray ]]; then
    echo "tools/mutate.sh: installing cosmic-ray into .mutate-venv" >&2
    .venv/bin/python -m venv .mutate-venv
    .mutate-venv/bin/python -m pip install --quiet "cosmic-ray>=8.4,<9"
fi

out=$ROOT/runs/mutate/$module-$(date +%Y%m%d-%H%M%S)
work=$(mktemp -d "${TMPDIR:-/tmp}/megaspan-mutate.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
git archive HEAD | tar -x -C "$work"

# The mutated copy must be the megaspan the tests import (not the checkout's editable install).
read -r -a files <<<"${FILES[$module]}"
tests=$(cd "$work" && for pattern in ${TESTS[$module]}; do compgen -G "$pattern" || true; done | tr '\n' ' ')
[[ -n $tests ]] || { echo "tools/mutate.sh: no test file matches ${TESTS[$module]}" >&2; exit 2; }
paths=$(printf '"%s", ' "${files[@]}")
filter=${MUTATE_FILTER:+-k \"$MUTATE_FILTER\"}
cat >"$work/mutate.toml" <<EOF
[cosmic-ray]
module-path = [${paths%, }]
timeout = ${MUTATE_TIMEOUT:-600}
excluded-modules = []
test-command = "env PYTHONPATH=$work MEGASPAN_CACHE_DIR=$work/.cache OMP_NUM_THREADS=1 $ROOT/.venv/bin/python -m pytest -x -q -p no:randomly -p no:cacheprovider $filter $tests"

[cosmic-ray.distributor]
name = "local"
EOF
cp "$work/mutate.toml" "$out/"

cd "$work"
"$ROOT/.mutate-venv/bin/cosmic-ray" init mutate.toml "$out/session.sqlite"
total=$("$ROOT/.mutate-venv/bin/cosmic-ray" dump "$out/session.sqlite" | wc -l)
# Mutants inside a function's annotations, in a module with `from __future__ import annotations`,
# are equivalent: the annotation is a string nobody evaluates (`float | None` -> `float << None`
# changes nothing). They were 3 of a 10-mutant sample of report/; marked skipped, not run.
# Class-level annotations stay in: the config loader evaluates dataclass fields' types
# (typing.get_type_hints), so a mutant there can be caught.
annotations=$("$ROOT/.mutate-venv/bin/python" - "$out/session.sqlite" <<'PY'
import ast
import sys
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

spans: dict[Path, list] = {}


def annotation_spans(path: Path) -> list:
    source = path.read_text()
    if "from __future__ import annotations" not in source:
        return []  # annotations are evaluated: a mutant there can fail at import
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            notes = [node.returns]
        elif isinstance(node, ast.arg):
            notes = [node.annotation]
        else:
            continue
        found += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in notes if a is not None]
    return found


skipped = 0
with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    for item in list(db.pending_work_items):
        (mutation,) = item.mutations
        if mutation.module_path not in spans:
            spans[mutation.module_path] = annotation_spans(mutation.module_path)
        start, end = tuple(mutation.start_pos), tuple(mutation.end_pos)
        if any(lo <= start and end <= hi for lo, hi in spans[mutation.module_path]):
            db.set_result(
                item.job_id,
                WorkResult(output="in a type annotation (never evaluated)", worker_outcome=WorkerOutcome.SKIPPED),
            )
            skipped += 1
print(skipped)
PY
)
total=$((total - annotations))
echo "tools/mutate.sh: $module: $total mutants of ${FILES[$module]} (and $annotations in type annotations, skipped)"
if ((count_only)); then exit 0; fi
if [[ -n ${MUTATE_SAMPLE:-} ]]; then
    # The mutants outside the sample are marked skipped: cosmic-ray exec runs only the others.
    "$ROOT/.mutate-venv/bin/python" - "$MUTATE_SAMPLE" "${MUTATE_SEED:-1}" "$out/session.sqlite" <<'PY'
import random
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

n, seed, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with use_db(path, WorkDB.Mode.open) as db:
    items = sorted(db.pending_work_items, key=lambda item: item.job_id)
    keep = {item.job_id for item in random.Random(seed).sample(items, min(n, len(items)))}
    for item in items:
        if item.job_id not in keep:
            db.set_result(item.job_id, WorkResult(output="not in the sample", worker_outcome=WorkerOutcome.SKIPPED))
print(f"tools/mutate.sh: testing a sample of {len(keep)} of {len(items)} mutants (seed {seed})")
PY
    total=$MUTATE_SAMPLE
fi

echo "tools/mutate.sh: baseline (the unmutated tests must pass): $tests"
"$ROOT/.mutate-venv/bin/cosmic-ray" baseline mutate.toml >/dev/null 2>&1 || {
    echo "tools/mutate.sh: the tests fail without any mutation: fix them first ($tests)" >&2
    exit 1
}
# Progress: cosmic-ray exec is silent, so report the finished count every minute.
(
    while sleep 60; do
        done_n=$("$ROOT/.mutate-venv/bin/cr-report" "$out/session.sqlite" 2>/dev/null | grep -c '^worker outcome: WorkerOutcome.NORMAL\|^worker outcome: WorkerOutcome.EXCEPTION\|^worker outcome: WorkerOutcome.ABNORMAL' || true)
        echo "tools/mutate.sh: $done_n/$total mutants tested"
    done
) &
progress=$!
"$ROOT/.mutate-venv/bin/cosmic-ray" exec mutate.toml "$out/session.sqlite" || true
kill "$progress" 2>/dev/null || true

"$ROOT/.mutate-venv/bin/cr-report" --show-diff "$out/session.sqlite" >"$out/report.txt" || true
# cr-rate would count skipped (unsampled) mutants as survivors: count the tested ones only.
survival=$("$ROOT/.mutate-venv/bin/python" - "$out/session.sqlite" <<'PY'
import math
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome

with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    results = [r for _, r in db.results if r.worker_outcome != WorkerOutcome.SKIPPED]
    skipped = db.num_results - len(results)
n, killed = len(results), sum(r.is_killed for r in results)
if not n:
    print("no mutant tested")
    sys.exit()
p, z = (n - killed) / n, 1.96  # Wilson interval of the survival rate (a sample estimates the module's)
centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
interval = f", 95% interval {100 * (centre - half):.0f}-{100 * (centre + half):.0f}%" if skipped else ""
print(f"{100 * p:.1f}% ({n - killed} of {n} tested mutants survived{interval})")
PY
)
{
    echo "module: $module (${FILES[$module]})"
    echo "tests: $tests"
    echo "mutants: $total${MUTATE_SAMPLE:+ (a random sample, seed ${MUTATE_SEED:-1})}"
    echo "survival rate: $survival   (score = 100 - survival)"
} | tee "$out/score.txt"
echo "tools/mutate.sh: survivors and their diffs: $out/report.txt"
