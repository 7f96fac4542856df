"""In-loop downstream evaluation (``eval.downstream``): the hook scores the live model exactly as
``megaspan eval`` scores the checkpoint of the same step, leaves training bitwise unchanged, and
its scores reach TensorBoard, summary.json and the report. Bad settings fail in one line, exit 2,
before anything is written.

Offline: the tasks are local YAMLs (``tests.helpers.evaluate.write_tasks``); the model trains
in-process on synthetic batches with the tiny recipe's tokenizer. The layouts (TP2, PP2) are in
tests/distributed/test_downstream_layouts.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from megaspan.errors import ConfigError  # noqa: E402
from megaspan.training.hooks import Hook  # noqa: E402
from tests.helpers import cli  # noqa: E402
from tests.helpers.evaluate import TEXT, write_tasks  # noqa: E402
from tests.helpers.models import tiny_overrides  # noqa: E402

pytestmark = pytest.mark.integration

SEQ = 32
STEPS = 4
INTERVAL = 2
GLOBAL_BATCH = 4
BATCH = 3  # scoring batch: not a divisor of the request count, so a ragged last batch is scored
TASKS = ["megaspan_test_mc", "megaspan_test_ppl"]


class LossRecorder(Hook):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer, result) -> None:
        self.losses.append(result.loss)


def _samples(n: int, seed: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """GPTDataset-shaped samples over the tokenizer's ids, each following a fixed bigram rule."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.empty(SEQ + 1, dtype=torch.long)
        text[0] = torch.randint(0, vocab, (1,), generator=g)
        for i in range(SEQ):
            text[i + 1] = (7 * text[i] + 3) % vocab
        out.append(
            dict(
                tokens=text[:-1].clone(),
                labels=text[1:].clone(),
                loss_mask=torch.ones(SEQ),
                position_ids=torch.arange(SEQ),
            )
        )
    return out


def _overrides(run_dir: Path, tokenizer, tasks_dir: Path | None) -> list[str]:
    overrides = tiny_overrides("spannorm", seq_length=SEQ) + [
        f"tokenizer.model={tokenizer.path}",
        # Dropout draws from the random generators every step: a generator the harness reseeded
        # and nobody restored would change the training losses after the first evaluation.
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
        f"training.steps={STEPS}",
        "training.micro_batch_size=2",
        f"training.global_batch_size={GLOBAL_BATCH}",
        "training.eval_steps=1",
        f"training.eval_interval={INTERVAL}",
        "training.seed=7",  # not the harness's own seed (1234)
        f"training.run_dir={run_dir}",
        f"checkpoint.save_interval={INTERVAL}",
        "checkpoint.keep_last=null",
        "schedule.warmup_steps=1",
        "optimizer.lr=3.0e-3",
        "optimizer.min_lr=3.0e-4",
        "logging.progress_bar=false",
        "logging.log_interval=1",
    ]
    if tasks_dir is not None:
        overrides += [
            f"eval.downstream.tasks=[{','.join(TASKS)}]",
            f"eval.downstream.include_path={tasks_dir}",
            f"eval.downstream.interval={INTERVAL}",
            f"eval.downstream.batch_size={BATCH}",
        ]
    return overrides


def _fit(run_dir: Path, tokenizer, tasks_dir: Path | None):
    """(trainer, losses) of one in-process run, with the downstream hook when ``tasks_dir``."""
    from megaspan.config.loader import load_config
    from megaspan.training.build import build_trainer

    cfg = load_config(None, _overrides(run_dir, tokenizer, tasks_dir))
    vocab = tokenizer.vocab_size
    datasets = (_samples(STEPS * GLOBAL_BATCH, 1, vocab), _samples(GLOBAL_BATCH, 2, vocab))
    recorder = LossRecorder()
    trainer = build_trainer(cfg, hooks=[recorder], datasets=datasets, vocab_size=vocab)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    return trainer, recorder.losses


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(hf))
        yield


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory, offline_env):
    """The same run with the hook (scoring at steps 2 and 4) and without it."""
    from megaspan.runtime import init_process_group, setup_cpu

    setup_cpu()
    init_process_group()
    tokenizer, _ = tiny_corpus
    root = tmp_path_factory.mktemp("downstream")
    tasks = write_tasks(root, TEXT)
    hooked, hooked_losses = _fit(root / "hooked", tokenizer, tasks)
    plain, plain_losses = _fit(root / "plain", tokenizer, None)
    return dict(
        tokenizer=tokenizer,
        tasks=tasks,
        root=root,
        hooked=hooked,
        hooked_losses=hooked_losses,
        plain=plain,
        plain_losses=plain_losses,
    )


def test_the_hook_scores_what_megaspan_eval_scores_on_the_checkpoint_of_that_step(runs):
    from megaspan.evaluate.harness import MegaspanLM, evaluate_tasks, task_scores
    from megaspan.evaluate.model import load_model
    from megaspan.training.checkpoint import checkpoint_name

    live = runs["hooked"].downstream
    assert sorted(live) == [INTERVAL, STEPS]
    for step in (INTERVAL, STEPS):
        checkpoint = runs["root"] / "hooked" / "checkpoints" / checkpoint_name(step)
        lm = MegaspanLM(load_model(checkpoint), batch_size=BATCH)
        offline = task_scores(evaluate_tasks(lm, TASKS, include_path=str(runs["tasks"])))
        assert offline.keys() == live[step].keys() == set(TASKS)
        for task, metrics in offline.items():
            assert metrics.keys() == live[step][task].keys(), task
            for metric, value in metrics.items():
                assert live[step][task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (
                    step,
                    task,
                    metric,
                )
    # The scores follow the weights: two steps of training move the perplexity.
    bpb = [live[s]["megaspan_test_ppl"]["bits_per_byte"] for s in (INTERVAL, STEPS)]
    assert bpb[0] != bpb[1]


def test_training_with_the_hook_is_bitwise_training_without_it(runs):
    assert len(runs["hooked_losses"]) == STEPS
    assert runs["hooked_losses"] == runs["plain_losses"]
    assert runs["hooked"].val_losses == runs["plain"].val_losses


def test_without_restoring_the_generators_the_losses_would_differ(runs, tmp_path, monkeypatch):
    """The bitwise test can fail: with the generators left as the harness seeded them, the
    dropout masks after the first evaluation change and so do the losses."""
    from megaspan.training.callbacks import downstream

    monkeypatch.setattr(downstream, "preserved_rng", contextlib.nullcontext)
    _, losses = _fit(tmp_path / "unrestored", runs["tokenizer"], runs["tasks"])
    assert losses[:INTERVAL] == runs["plain_losses"][:INTERVAL]
    assert losses[INTERVAL:] != runs["plain_losses"][INTERVAL:]


def test_scores_reach_tensorboard_summary_and_report(runs, tmp_path):
    from megaspan.report import build_report

    run_dir = runs["root"] / "hooked"
    live = runs["hooked"].downstream
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["downstream"] == {
        str(step): {task: dict(metrics) for task, metrics in scores.items()} for step, scores in live.items()
    }
    for task, metrics in live[STEPS].items():
        for metric in metrics:
            board = cli.scalars(run_dir, f"downstream/{task}/{metric}")
            assert sorted(board) == [INTERVAL, STEPS]
            for step in board:
                assert board[step] == pytest.approx(live[step][task][metric], rel=1e-6)
    page = build_report([run_dir], tmp_path / "report").page.read_text()
    assert "## Downstream tasks vs placement and depth" in page
    row = next(line for line in page.splitlines() if line.startswith("| spannorm | 4 |") and "(n=1" in line)
    acc = live[STEPS]["megaspan_test_mc"]["acc"]
    assert f"{acc:.4f} (n=1, no interval)" in row


def test_task_names_are_checked_against_the_harness(tmp_path):
    from megaspan.config.loader import load_config
    from megaspan.evaluate.harness import check_downstream_tasks

    tasks = write_tasks(tmp_path, TEXT)
    ok = load_config(None, [f"eval.downstream.tasks=[{TASKS[0]}]", f"eval.downstream.include_path={tasks}"])
    assert check_downstream_tasks(ok.eval.downstream) is not None
    unknown = load_config(
        None, ["eval.downstream.tasks=[no_such_task_xyz]", f"eval.downstream.include_path={tasks}"]
    )
    with pytest.raises(ConfigError, match="eval.downstream.tasks: unknown lm-eval task no_such_task_xyz"):
        check_downstream_tasks(unknown.eval.downstream)
    missing = load_config(
        None, ["eval.downstream.tasks=[hellaswag]", f"eval.downstream.include_path={tmp_path / 'nope'}"]
    )
    with pytest.raises(ConfigError, match="eval.downstream.include_path=.*nope is not a directory"):
        check_downstream_tasks(missing.eval.downstream)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ("eval.downstream.tasks=[no_such_task_xyz]",),
            "megaspan: error: eval.downstream.tasks: unknown lm-eval task no_such_task_xyz: see `lm-eval ls tasks`",
        ),
        (
            ("eval.downstream.tasks=[hellaswag]", "eval.downstream.interval=0"),
            "megaspan: error: eval.downstream.interval must be >= 1, got 0",
        ),
    ],
    ids=["unknown-task", "interval-0"],
)
def test_bad_settings_fail_in_one_line_before_anything_is_written(tmp_path, monkeypatch, overrides, line):
    run, cache = tmp_path / "run", tmp_path / "cache"
    # In this process (tests.helpers.cli.train without env): both settings are refused by the
    # config check or lm-eval's index of task names, before any dataset or Hub access (so no HF_*
    # variable plays a part) and before train() builds or tears down a process group (so `runs`
    # and _fit are unaffected). MEGASPAN_CACHE_DIR is read when the cache is first used.
    monkeypatch.setenv("MEGASPAN_CACHE_DIR", str(cache))
    result = cli.train(run, *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(line), result.stderr[-3000:]
    assert not run.exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_megaspan_train_scores_in_the_loop(tmp_path, tiny_corpus):
    """The real command on the tiny recipe: the tokenizer it trains (its cached path, not a
    tokenizer.model setting) scores the tasks at each interval and at the end."""
    tasks = write_tasks(tmp_path, TEXT)
    run = tmp_path / "run"
    # A real `megaspan train` process, the one this module keeps: the harness builds the tasks'
    # JSON datasets under HF_DATASETS_CACHE, which datasets reads when it is imported.
    result = cli.train(
        run,
        "training.steps=3",
        "schedule.warmup_steps=1",
        "training.eval_interval=100",
        "logging.progress_bar=false",
        "eval.downstream.tasks=[megaspan_test_mc]",
        f"eval.downstream.include_path={tasks}",
        "eval.downstream.interval=2",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["downstream"]) == ["2", "3"]  # the interval, then the end
    acc = summary["downstream"]["3"]["megaspan_test_mc"]["acc"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 questions
    lines = [
        line for line in (run / "train.log").read_text().splitlines() if "downstream megaspan_test_mc" in line
    ]
    assert len(lines) == 2 and f"acc {acc:.4f} | step 3" in lines[-1], lines
