"""The ``megaspan`` command line: help, info, dry runs and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megaspan.cli import build_parser, main


def megaspan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "megaspan", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=240
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in ("train", "info", "tokenizer", "preprocess"):
        assert command in text


def test_info_reports_versions_and_placements(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "megatron-core        0.19.2" in out
    assert "transformer-engine" in out and "torch" in out and "device" in out
    from megaspan.norms import available

    for name, cls in available().items():
        assert f"  {name}" in out and cls.description in out


def test_dry_run_prints_the_resolved_config_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--dry-run", f"training.run_dir={run}", "model.num_layers=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["num_layers"] == 3 and resolved["training"]["run_dir"] == str(run)
    assert not run.exists()


def test_shipped_recipes_are_valid() -> None:
    for recipe in ("default", "tiny"):
        assert main(["train", "--config", recipe, "--dry-run"]) == 0


@pytest.fixture(scope="module")
def tiny_tokenizer() -> str:
    """The tiny recipe's tokenizer model (trained once, then cached)."""
    from megaspan.config.loader import load_config
    from megaspan.data.tokenizer import build_tokenizer

    cfg = load_config("tiny")
    return str(build_tokenizer(cfg.tokenizer, cfg.data).path)


def _empty_dataset(tmp_path: Path) -> str:
    prefix = tmp_path / "empty"
    prefix.with_suffix(".bin").write_bytes(b"")
    prefix.with_suffix(".idx").write_bytes(b"")
    return str(prefix)


BAD_INPUTS = {
    "unknown key": (["model.num_layer=3"], "unknown config key 'model.num_layer'"),
    "wrong type": (["training.steps=ten"], "training.steps: expected an integer"),
    "missing data path": (["data.paths=[/nonexistent/corpus]", "tokenizer.model={tokenizer}"], "/nonexistent/corpus"),
    "empty corpus": (["data.paths=[{empty}]", "tokenizer.model={tokenizer}"], "incomplete or corrupt"),
    "seq > positions": (["model.seq_length=128", "model.max_position_embeddings=64"], "model.seq_length=128"),
    "batch not divisible": (["training.global_batch_size=6", "training.micro_batch_size=4"], "global_batch_size=6"),
    "fp8 without TE": (["precision.fp8=e4m3"], "Transformer Engine"),
    "TE backend without TE": (["model.transformer_impl=transformer_engine"], "model.transformer_impl"),
}


NEEDS_NO_TE = {"fp8 without TE", "TE backend without TE"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, tiny_tokenizer: str) -> None:
    if case in NEEDS_NO_TE and importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    overrides, expected = BAD_INPUTS[case]
    overrides = [o.format(tokenizer=tiny_tokenizer, empty=_empty_dataset(tmp_path)) for o in overrides]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("an earlier run's config\n")
    before = snapshot(tmp_path)
    result = megaspan("train", "--config", "tiny", f"training.run_dir={run}", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("megaspan: error: ") and expected in lines[0]
    assert snapshot(tmp_path) == before
