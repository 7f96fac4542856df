"""Bring-your-own data end to end, through the real CLI: parquet shards and a tokenizer.json (both
made here) -> ``megaspan preprocess`` -> ``megaspan train`` logging to W&B offline; a resume
continues the same W&B run, whose loss history equals TensorBoard's; another tokenizer is refused
on resume; W&B online without network is one line before training."""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from megaspan.cli import main
from megaspan.config.schema import WandbConfig
from megaspan.errors import ConfigError
from megaspan.training import wandb_log
from tests.helpers.cli import scalars, step_losses, train
from tests.helpers.hf import train_tokenizer_json
from tests.helpers.wandb_files import config, history, run_ids

pytestmark = pytest.mark.integration
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("wandb")

DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # é\n" * (1 + i % 4) for i in range(300)]


def _parquet_corpus(tmp_path):
    shards = tmp_path / "fineweb"
    shards.mkdir()
    for n in range(3):
        part = DOCS[n * 100 : (n + 1) * 100]
        pq.write_table(pa.table({"text": part, "url": ["u"] * len(part)}), shards / f"{n:03d}.parquet")
    return shards


def test_parquet_tokenizer_json_wandb_offline_resume(tmp_path, capsys):
    tok = train_tokenizer_json(tmp_path / "tok" / "tokenizer.json", DOCS)
    prefix = tmp_path / "data" / "fineweb"
    args = ["--input", str(_parquet_corpus(tmp_path) / "*.parquet"), "--tokenizer", str(tok)]
    assert main(["preprocess", *args, "--output-prefix", str(prefix), "--quiet", "--workers", "2"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "run"
    common = [
        f"tokenizer.model={tok}",
        f"data.paths=[{prefix}]",
        "logging.log_interval=1",
        "logging.diagnostics_interval=2",
        "training.eval_interval=2",
        "logging.wandb.project=byo",
        "logging.wandb.mode=offline",
        "logging.wandb.tags=[parquet]",
        "schedule.warmup_steps=1",
        "schedule.decay_steps=12",
    ]
    env = {"MEGASPAN_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    first = train(run_dir, *common, "training.steps=4", **env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    second = train(run_dir, *common, "training.steps=8", **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint at step 4" in second.stdout
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(run_ids(f) == {run_id} for f in files)  # one W&B run, two parts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board_tags = EventAccumulator(str(run_dir / "tensorboard"))
    board_tags.Reload()
    tags = board_tags.Tags()["scalars"]
    assert {"train/loss", "valid/loss", "train/lr"} <= set(tags) and any(t.startswith("diag/") for t in tags)
    for tag in tags:  # every TensorBoard scalar, diagnostics included, is in W&B with its values
        logged = {**history(files[0], tag), **history(files[1], tag)}
        board = scalars(run_dir, tag)
        assert sorted(logged) == sorted(board) and board, tag
        # TensorBoard stores float32; W&B keeps the float64 the logger had.
        assert all(abs(logged[s] - board[s]) <= 1e-6 * max(1.0, abs(board[s])) for s in board), tag
    printed = {**step_losses(first.stdout), **step_losses(second.stdout)}
    assert sorted(printed) == list(range(1, 9))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    logged_config = config(files[1])
    assert logged_config["tokenizer"]["model"] == str(tok)
    assert logged_config["model"]["vocab_size"] == resolved["model"]["vocab_size"]
    assert len(logged_config["tokenizer_hash"]) == 64

    other = train_tokenizer_json(tmp_path / "other" / "tokenizer.json", DOCS[:50])
    again = train(run_dir, *common, f"tokenizer.model={other}", "training.steps=12", **env)
    assert again.returncode == 2 and "another tokenizer" in again.stderr, again.stderr[-3000:]


def test_wandb_online_without_network_is_one_line_before_training(tmp_path):
    start = time.monotonic()
    result = train(
        tmp_path / "run",
        "logging.wandb.project=byo",
        "logging.wandb.mode=online",
        MEGASPAN_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_BASE_URL="http://127.0.0.1:9",  # the discard port: nothing listens, refused at once
    )
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
    assert "127.0.0.1:9 is unreachable" in err[0] and "mode=offline" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists() and "step 1/" not in result.stdout
    assert time.monotonic() - start < 120


def test_missing_wandb_package_or_bad_mode_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'megaspan\[wandb\]'"):
        wandb_log.check(WandbConfig(project="p", mode="offline"))
    wandb_log.check(WandbConfig(project="p", mode="disabled"))  # off: nothing imported
    wandb_log.check(WandbConfig(mode="offline"))  # no project: off
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb_log.check(WandbConfig(project="p", mode="offline"))  # the environment wins
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        wandb_log.check(WandbConfig(project="p"))
