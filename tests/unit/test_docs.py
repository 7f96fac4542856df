"""The repository's own docs stay true to the code: links resolve, every placement and every
command is documented, and nothing cites documents outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [
        ROOT / n for n in names.splitlines() if n.endswith((".py", ".md", ".sh", ".sbatch", ".yaml", ".toml"))
    ]


def test_nothing_cites_documents_outside_the_repository() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _tracked_text_files()
        if p.is_file() and p.name != "test_docs.py" and "shared/docs" in p.read_text(errors="replace")
    ]
    assert offenders == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_placement_has_a_section() -> None:
    from megaspan.norms import available

    headings = [
        line for line in (ROOT / "docs" / "placements.md").read_text().splitlines() if line.startswith("## ")
    ]
    for name in available():
        assert any(f"`{name}`" in h for h in headings), f"docs/placements.md has no section for {name}"


def test_every_command_is_in_the_readme() -> None:
    from megaspan.cli import COMMANDS

    readme = (ROOT / "README.md").read_text()
    for command in COMMANDS:
        assert f"megaspan {command}" in readme, command
