"""The test suite's own rule: shared code lives in tests/helpers, no test module imports another."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_no_test_module_imports_another_test_module():
    offenders = [
        f"{path.relative_to(TESTS)}: {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in _imported_modules(ast.parse(path.read_text(), str(path)))
        if name.rsplit(".", 1)[-1].startswith("test_")
    ]
    assert not offenders, "move the shared piece to tests/helpers: " + ", ".join(offenders)


def test_a_bad_worker_count_is_one_line_and_exit_2():
    env = {**os.environ, "MEGASPAN_TEST_WORKERS": "two"}
    result = subprocess.run(
        [str(TESTS.parent / "tools" / "test.sh"), "--fast"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == "", result
    assert (
        result.stderr.count("\n") == 1
        and "MEGASPAN_TEST_WORKERS" in result.stderr
        and "'two'" in result.stderr
    )
