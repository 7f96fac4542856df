"""The torch-free entry points stay torch-free: checked in a fresh interpreter, because the test
process itself has torch loaded long before this test runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "megatron", "transformer_engine", "numpy")
"""Modules whose import costs seconds (numpy is cheap but is the door to most of them)."""


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize(
    "code",
    [
        "import megaspan.config",
        "import megaspan.config; megaspan.config.load_config('tiny')",
        "import megaspan.errors",
        # What `megaspan --help` runs: the parser of every command, then the help text.
        "from megaspan.cli import build_parser; build_parser().format_help()",
    ],
)
def test_torch_free(code: str) -> None:
    assert _heavy(_modules_after(code)) == []


def test_megaspan_help_imports_no_torch() -> None:
    """The real ``megaspan --help`` (argparse exits 0 after printing): no heavy module loaded."""
    code = (
        "import sys\nfrom megaspan.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code"
    )
    assert _heavy(_modules_after(code)) == []


def test_every_command_module_follows_the_contract() -> None:
    """Each listed command has register() and run(); heavy imports live inside run()."""
    from megaspan.cli import COMMANDS, command_modules

    assert len(set(COMMANDS)) == len(COMMANDS)
    for module in command_modules():
        assert callable(module.register) and callable(module.run), module.__name__
