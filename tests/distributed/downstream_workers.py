"""Per-rank functions of tests/distributed/test_downstream_layouts.py: one process saves a tiny
model and scores it with ``megaspan eval``'s path; each layout loads those weights into a real
trainer (``build_trainer``, weights-only) and scores them with the downstream hook."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.distributed import layout_workers as lw
from tests.helpers.evaluate import QUESTIONS
from tests.helpers.models import tiny_overrides

SEQ = 32
BATCH = 3
TASKS = ["megaspan_test_mc", "megaspan_test_ppl"]


def _offline(hf_cache: str) -> None:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=hf_cache)


def _requests():
    from lm_eval.api.instance import Instance

    pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _generation():
    """One greedy generation request (the gathered-logits path of the live model)."""
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, ("def main(", {"until": ["\n\n"], "max_gen_toks": 6}), 0)]


def reference(
    rank: int, world_size: int, tokenizer_path: str, ckpt_dir: str, tasks_dir: str, hf_cache: str
) -> dict:
    """Save a fresh tiny model (step 0) and score it in this one process as ``megaspan eval`` does."""
    from megaspan.data.tokenizer import load_tokenizer
    from megaspan.evaluate.harness import MegaspanLM, evaluate_tasks, task_scores
    from megaspan.evaluate.model import load_model
    from tests.helpers.evaluate import save_tiny
    from tests.helpers.models import fresh_model_parallel

    _offline(hf_cache)
    lw._allow_child_processes()
    fresh_model_parallel(seed=1234)
    _, path, _ = save_tiny(Path(ckpt_dir), load_tokenizer(tokenizer_path), seq_length=SEQ)
    lm = MegaspanLM(load_model(path), batch_size=BATCH)
    return dict(
        checkpoint=str(path),
        loglikelihoods=lm.loglikelihood(_requests()),
        generated=lm.generate_until(_generation()),
        scores=task_scores(evaluate_tasks(lm, TASKS, include_path=tasks_dir)),
    )


def _samples(n: int) -> list[dict[str, torch.Tensor]]:
    tokens = torch.arange(n * (SEQ + 1)).remainder(100).view(n, SEQ + 1)
    return [
        dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(SEQ), position_ids=torch.arange(SEQ))
        for t in tokens
    ]


def live(
    rank: int,
    world_size: int,
    layout: str,
    tokenizer_path: str,
    checkpoint: str,
    tasks_dir: str,
    hf_cache: str,
    run_dir: str,
) -> dict:
    """The checkpoint's weights in a trainer under ``layout``, scored by its downstream hook."""
    from megaspan.config.loader import load_config
    from megaspan.data.tokenizer import load_tokenizer
    from megaspan.training.build import build_trainer
    from megaspan.training.callbacks.downstream import DownstreamHook, eval_mode

    _offline(hf_cache)
    lw._allow_child_processes()
    overrides = tiny_overrides(
        "spannorm", seq_length=SEQ, extra=(f"tokenizer.model={tokenizer_path}", "model.arch=gpt")
    ) + [
        "training.steps=1",
        "schedule.warmup_steps=0",
        "training.micro_batch_size=2",
        "training.global_batch_size=4",
        "training.eval_steps=1",
        f"training.run_dir={run_dir}",
        f"checkpoint.resume={checkpoint}",
        "checkpoint.load_optimizer=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        f"eval.downstream.tasks=[{','.join(TASKS)}]",
        f"eval.downstream.include_path={tasks_dir}",
        f"eval.downstream.batch_size={BATCH}",
        *lw.LAYOUTS[layout],
    ]
    cfg = load_config(None, overrides)
    vocab = load_tokenizer(tokenizer_path).vocab_size
    trainer = build_trainer(cfg, datasets=(_samples(8), _samples(4)), vocab_size=vocab)
    try:
        (hook,) = [h for h in trainer.hooks if isinstance(h, DownstreamHook)]
        scores = hook.run(trainer)
        with eval_mode(trainer.objs.model):
            lm = hook._adapter(trainer)
            loglikelihoods = lm.loglikelihood(_requests())
            generated = lm.generate_until(_generation())
    finally:
        trainer.close()
    return dict(scores=scores, loglikelihoods=loglikelihoods, generated=generated)
