"""The ``megaspan`` command line: help, info, dry runs, one-line errors for bad input, quiet console.

Bad input runs in-process through :func:`megaspan.cli.main` (fast); one case runs the installed
console script to prove the real process prints exactly one line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from megaspan.cli import COMMANDS, build_parser, main, quiet

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in COMMANDS:
        assert f"    {command} " in text


def test_verbose_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--verbose", "info"]).verbose is True
    assert parser.parse_args(["info", "--verbose"]).verbose is True
    assert parser.parse_args(["tokenizer", "encode", "--model", "m", "--verbose"]).verbose is True
    assert parser.parse_args(["info"]).verbose is False


def test_info_reports_versions_and_placements(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "megatron-core        0.19.2" in out
    assert "transformer-engine" in out and "torch" in out and "device" in out
    from megaspan.norms import available

    for name, cls in available().items():
        assert f"  {name}" in out and cls.description in out
    assert "span_include_y_term=False" in out and "mixln_alpha=0.25" in out and "deepnorm_alpha=None" in out


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only UserError becomes one line; anything else propagates (the interpreter prints it)."""

    def broken() -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr("megaspan.cli.info.format_info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])


def test_dry_run_prints_the_resolved_config_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(["train", "--config", "tiny", "--dry-run", f"training.run_dir={run}", "model.num_layers=3"]) == 0
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["num_layers"] == 3 and resolved["training"]["run_dir"] == str(run)
    assert not run.exists()


def test_shipped_recipes_are_valid() -> None:
    for recipe in ("default", "tiny"):
        assert main(["train", "--config", recipe, "--dry-run"]) == 0


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty data cache and a run dir holding an earlier run's file; a single-process launch."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MEGASPAN_CACHE_DIR", str(cache))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MEGASPAN_VERBOSE"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("an earlier run's config\n")
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    return cache, run


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process cases must be refused by validation: should one slip through, fail at once at
    the first step after validation (switching on the runtime) instead of training in-process."""

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("validation let this config through to the training runtime")

    monkeypatch.setattr("megaspan.runtime.setup_cpu", reached)


CONFIG_ONLY = {
    # case: (overrides, text the one line must contain)
    "TE backend without TE": (["model.transformer_impl=transformer_engine"], "model.transformer_impl"),
    "fp8 without TE": (["precision.fp8=e4m3"], "precision.fp8"),
    "TP not dividing heads": (["parallel.tensor_model_parallel_size=3"], "num_attention_heads=4"),
    "bad PP split": (
        ["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=3"],
        "pipeline",
    ),
    "PP not dividing layers": (["parallel.pipeline_model_parallel_size=3"], "pipeline"),
    "global batch not divisible": (
        ["training.global_batch_size=6", "training.micro_batch_size=4"],
        "global_batch_size=6",
    ),
    "zero micro-batch": (["training.micro_batch_size=0"], "training.micro_batch_size"),
    "unknown placement option": (["model.norm.not_a_key=1"], "model.norm.not_a_key"),
    "unknown key": (["model.num_layer=3"], "model.num_layer"),
    "wrong type": (["training.steps=ten"], "training.steps"),
    "seq > positions": (["model.seq_length=128", "model.max_position_embeddings=64"], "model.seq_length=128"),
    "warmup >= decay": (["training.steps=3", "schedule.warmup_steps=5"], "schedule.warmup_steps=5"),
}
NEEDS_NO_TE = {"fp8 without TE", "TE backend without TE"}


@pytest.mark.parametrize("case", list(CONFIG_ONLY))
def test_config_only_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, clean_env: tuple[Path, Path], no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    if case in NEEDS_NO_TE and HAS_TE:
        pytest.skip("Transformer Engine is installed here")
    cache, run = clean_env
    overrides, expected = CONFIG_ONLY[case]
    before = snapshot(cache.parent)
    assert main(["train", "--config", "tiny", f"training.run_dir={run}", *overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("megaspan: error: ") and expected in lines[0], lines[0]
    assert captured.out == ""
    assert snapshot(cache.parent) == before
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "case",
    ["TP not dividing heads", "bad PP split", "global batch not divisible", "unknown placement option"],
)
def test_plan_refuses_the_same_inputs_in_one_line(
    case: str, clean_env: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``plan`` runs the same validation as ``train`` (on the world size it is given)."""
    overrides, expected = CONFIG_ONLY[case]
    assert main(["plan", "--config", "tiny", "--world-size", "6", *overrides]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megaspan: error: ") and expected in lines[0], lines


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny recipe's tokenizer model, trained into a private cache and copied out."""
    from megaspan.config.loader import load_config
    from megaspan.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    cfg = load_config("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGASPAN_CACHE_DIR", str(root / "cache"))
        path = build_tokenizer(cfg.tokenizer, cfg.data).path
    shutil.copy(path, root / "tiny.model")
    return str(root / "tiny.model")


DATA = {
    "missing data path": (["data.paths=[/nonexistent/corpus]"], "/nonexistent/corpus"),
    "empty corpus": (["data.paths=[{empty}]"], "incomplete or corrupt"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_data_bad_input_is_one_line_exit_2_and_leaves_the_run_dir(
    case: str, clean_env: tuple[Path, Path], tiny_tokenizer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, run = clean_env
    empty = cache.parent / "empty"
    empty.with_suffix(".bin").write_bytes(b"")
    empty.with_suffix(".idx").write_bytes(b"")
    overrides = [o.format(empty=empty) for o in DATA[case][0]]
    before = snapshot(run)
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                f"training.run_dir={run}",
                f"tokenizer.model={tiny_tokenizer}",
                *overrides,
            ]
        )
        == 2
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megaspan: error: ") and DATA[case][1] in lines[0], lines
    assert snapshot(run) == before


@pytest.mark.integration
def test_console_script_prints_one_line_on_a_cold_cache(clean_env: tuple[Path, Path]) -> None:
    """The installed ``megaspan`` script in a fresh process: nothing but the one line (no
    preprocessing output, no third-party warnings), exit 2, no file written."""
    cache, run = clean_env
    case = "unknown placement option" if HAS_TE else "TE backend without TE"
    overrides, expected = CONFIG_ONLY[case]
    script = Path(sys.executable).with_name("megaspan")
    before = snapshot(cache.parent)
    result = subprocess.run(
        [str(script), "train", "--config", "tiny", f"training.run_dir={run}", *overrides],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("megaspan: error: ") and expected in lines[0]
    assert result.stdout == ""
    assert snapshot(cache.parent) == before


# ---- quiet console --------------------------------------------------------------------------


def test_quiet_hides_the_listed_third_party_messages_only() -> None:
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    gpt_logger.addHandler(handler)
    try:
        for verbose in (False, True):
            seen.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                quiet.install(verbose=verbose)
                for noise in quiet.NOISE:
                    if noise.via == "warnings":
                        warnings.warn(f"{noise.starts_with} (rest of the text)", UserWarning, stacklevel=1)
                warnings.warn("megaspan: something worth reading", UserWarning, stacklevel=1)
            gpt_logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
            gpt_logger.warning("another GPTModel message")
            shown = [str(w.message) for w in caught]
            if verbose:
                assert len(shown) == 1 + sum(n.via == "warnings" for n in quiet.NOISE)
                assert len(seen) == 2
            else:
                assert shown == ["megaspan: something worth reading"]
                assert seen == ["another GPTModel message"]
    finally:
        gpt_logger.removeHandler(handler)
        quiet.install(verbose=True)  # leave no filters behind for later tests


def test_every_noise_entry_is_documented() -> None:
    for noise in quiet.NOISE:
        assert noise.starts_with and noise.source and len(noise.why) > 20


@pytest.mark.integration
def test_quiet_matches_the_installed_megatron_messages() -> None:
    """The listed texts are what this Megatron-Core version really prints (a fresh process imports
    the modules that warn): hidden by default, all shown with verbose=True."""
    code = (
        "from megaspan.cli import quiet; quiet.install(verbose={verbose})\n"
        "import megatron.core.optimizer, megatron.core.models.mimo, megatron.core.models.backends\n"
        "from megatron.core.transformer import TransformerConfig\n"
        "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)\n"
        # A real Megatron torch_dist save + load (what every resume does): torch DCP's notice
        # about the argument order of its load.
        "import tempfile, torch\n"
        "from megaspan.runtime import init_process_group, setup_cpu\n"
        "setup_cpu(); init_process_group()\n"
        "from megatron.core import dist_checkpointing\n"
        "from megatron.core.dist_checkpointing import ShardedTensor\n"
        "from megaspan.training.checkpoint import _sync_save_strategy\n"
        "from megaspan.training.setup import cuda_free\n"
        "d = tempfile.mkdtemp()\n"
        "with cuda_free():\n"
        "    sd = {{'a': ShardedTensor.from_rank_offsets('a', torch.arange(4.0))}}\n"
        "    dist_checkpointing.save(sd, d, sharded_strategy=_sync_save_strategy())\n"
        "    dist_checkpointing.load({{'a': ShardedTensor.from_rank_offsets('a', torch.zeros(4))}}, d)\n"
    )
    quiet_run, verbose_run = (
        subprocess.run(
            [sys.executable, "-c", code.format(verbose=v)], capture_output=True, text=True, timeout=300
        )
        for v in (False, True)
    )
    assert quiet_run.returncode == 0 and verbose_run.returncode == 0, verbose_run.stderr
    assert quiet_run.stderr == ""
    for noise in quiet.NOISE:
        if noise.via == "warnings":
            assert noise.starts_with in verbose_run.stderr, noise.starts_with


def test_a_directory_as_config_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 20 item 10: a directory given as --config was reported as "not found"."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("training:\n  steps: 2\n")
    assert main(["train", "--config", str(tmp_path / "recipes"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "is a directory (it holds mine.yaml): give the path of a YAML recipe file" in err[0]
    )
