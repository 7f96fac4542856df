"""``megaspan eval``: the lm-evaluation-harness adapter scores exactly what the model computes.

Offline: the tasks are YAMLs over local JSON files (``dataset_path: json``, written by
``tests.helpers.evaluate.write_tasks``). The references are computed without the adapter:
log-likelihoods from the saved model's own logits, and the rolling log-likelihood against
megaspan's training loss path (``forward_step`` + ``loss_func``, what validation runs) over the
same tokens cut into the same GPTDataset-style samples. A wrong prefix token, a shifted
continuation, a padding leak across a batch or a wrong window each breaks one of them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from megaspan.evaluate.harness import MegaspanLM, evaluate_tasks  # noqa: E402
from megaspan.evaluate.model import load_model  # noqa: E402
from tests.helpers.cli import clean_env, in_process  # noqa: E402
from tests.helpers.evaluate import QUESTIONS, TEXT, save_tiny, write_tasks  # noqa: E402

pytestmark = pytest.mark.integration

SEQ = 32


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _request_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(EOD + the text's ids, how many of them are the continuation), split as lm-eval documents
    it: trailing whitespace of the context belongs to the continuation, and the continuation is
    what the whole text's ids add after as many ids as the context alone has."""
    stripped = context.rstrip()
    whole = tokenizer.tokenize(context + continuation)
    ctx = tokenizer.tokenize(stripped) if stripped else []
    return [tokenizer.eod, *ctx, *whole[len(ctx) :]], len(whole) - len(ctx)


def _direct_loglikelihood(chunk, ids: list[int], n_cont: int) -> tuple[float, bool]:
    with torch.no_grad():
        logits = chunk(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1).unsqueeze(0), None)[0]
    logp = torch.log_softmax(logits.float(), -1)[-n_cont:]
    target = torch.tensor(ids[-n_cont:])
    return float(logp.gather(1, target.unsqueeze(1)).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_the_models_logits(mcore, tiny_corpus, tmp_path, batch_size):
    from lm_eval.api.instance import Instance

    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, seq_length=SEQ)
    lm = MegaspanLM(load_model(path), batch_size=batch_size)
    pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        want = _direct_loglikelihood(chunk, *_request_ids(tokenizer, context, continuation))
        assert logprob == pytest.approx(want[0], rel=1e-5, abs=1e-5), (context, continuation)
        assert greedy == want[1]


def _megaspan_validation_loss(chunk, samples: list[list[int]]) -> float:
    """Mean token loss over samples of SEQ + 1 tokens through the trainer's forward_step/loss_func."""
    from megaspan.training.trainer import forward_step

    loss_sum = count = 0.0
    with torch.no_grad():
        for sample in samples:
            t = torch.tensor([sample])
            batch = {
                "tokens": t[:, :-1],
                "labels": t[:, 1:],
                "loss_mask": torch.ones(1, SEQ),
                "position_ids": torch.arange(SEQ).unsqueeze(0),
            }
            output, loss_fn = forward_step(False, iter([batch]), chunk)
            s, n, _ = loss_fn(output)
            loss_sum, count = loss_sum + float(s), count + float(n)
    return loss_sum / count


def _text_of_whole_windows(tokenizer) -> tuple[str, list[int]]:
    """A prefix of TEXT whose token count is a multiple of SEQ (>= 3 windows), so the harness's
    disjoint windows are exactly GPTDataset's samples of the document stream ``EOD + text``."""
    words = TEXT.split(" ")
    for n in range(len(words), 0, -1):
        text = " ".join(words[:n])
        ids = tokenizer.tokenize(text)
        if len(ids) % SEQ == 0 and len(ids) >= 3 * SEQ:
            return text, ids
    raise AssertionError("no prefix of TEXT has a whole number of windows")


def test_rolling_loglikelihood_equals_megaspans_validation_loss(mcore, tiny_corpus, tmp_path):
    from lm_eval.api.instance import Instance

    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, seq_length=SEQ)
    lm = MegaspanLM(load_model(path), batch_size=2)
    text, ids = _text_of_whole_windows(tokenizer)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    stream = [tokenizer.eod, *ids]
    samples = [stream[k : k + SEQ + 1] for k in range(0, len(ids), SEQ)]
    assert -total / len(ids) == pytest.approx(_megaspan_validation_loss(chunk, samples), rel=1e-5)


def test_local_tasks_through_simple_evaluate(mcore, tiny_corpus, tmp_path, offline):
    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, seq_length=SEQ)
    text, ids = _text_of_whole_windows(tokenizer)
    tasks = write_tasks(tmp_path, text)
    lm = MegaspanLM(load_model(path), batch_size=4)
    out = evaluate_tasks(lm, ["megaspan_test_mc", "megaspan_test_ppl"], include_path=str(tasks))
    # Accuracy: the choice with the highest direct log-likelihood, per question.
    correct = 0
    for question, choices, answer in QUESTIONS:
        scores = [_direct_loglikelihood(chunk, *_request_ids(tokenizer, question, c))[0] for c in choices]
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
    assert out["results"]["megaspan_test_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    # Bits per byte: the summed token loss over the text's UTF-8 bytes, in bits.
    stream = [tokenizer.eod, *ids]
    loss = _megaspan_validation_loss(chunk, [stream[k : k + SEQ + 1] for k in range(0, len(ids), SEQ)])
    bpb = loss * len(ids) / len(text.encode()) / math.log(2)
    assert out["results"]["megaspan_test_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m megaspan eval ARGS`` in a new interpreter with ``env``: datasets and
    huggingface_hub read HF_DATASETS_OFFLINE, HF_HUB_OFFLINE and HF_DATASETS_CACHE when they are
    imported, which this process may have done already with other values."""
    return subprocess.run(
        [sys.executable, "-m", "megaspan", "eval", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=600,
    )


def test_cli_writes_json_and_the_run_summary_and_refuses_unknown_tasks(mcore, tiny_corpus, tmp_path):
    tokenizer, _ = tiny_corpus
    run = tmp_path / "run"
    _, path, _ = save_tiny(run / "checkpoints", tokenizer, seq_length=SEQ)
    (run / "config.yaml").write_text("{}\n")  # what makes the parent a run dir
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    text, _ = _text_of_whole_windows(tokenizer)
    tasks = write_tasks(tmp_path, text)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = tmp_path / "scores.json"
    ok = _cli(
        "--checkpoint", str(run), "--tasks", "megaspan_test_mc", "--include-path", str(tasks),
        "--output", str(out), "--limit", "2", **env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert scores["n-samples"]["megaspan_test_mc"]["effective"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"  # merged, not replaced
    assert (
        summary["eval"]["megaspan_test_mc"]["acc,none"] == scores["results"]["megaspan_test_mc"]["acc,none"]
    )
    # In this process: the task name is checked against lm-eval's index of the local YAMLs before
    # any dataset, Hub or model access, so the HF variables above play no part in this refusal.
    bad = in_process(
        ["eval", "--checkpoint", str(run), "--tasks", "no_such_task_xyz", "--include-path", str(tasks)]
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-3000:]
    assert "unknown lm-eval task no_such_task_xyz" in bad.stderr
