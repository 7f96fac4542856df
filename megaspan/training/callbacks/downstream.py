"""In-loop downstream evaluation (``eval.downstream``): lm-evaluation-harness tasks scored on the
live model under the run's layout every ``interval`` steps and at the end of training.

The scoring is ``megaspan eval``'s (:class:`~megaspan.evaluate.harness.MegaspanLM`), over
:class:`~megaspan.evaluate.live.LiveModel` instead of a loaded checkpoint: every rank runs the
harness in lockstep and the forward passes go through Megatron's forward-only schedule across
TP/PP (see that module). The scores go to TensorBoard/W&B as ``downstream/<task>/<metric>``, to
the console, and to ``summary.json``'s ``downstream`` (``trainer.downstream``; the summary hook
writes it).

Training is left exactly as it was: the chunks are put in eval mode and back, nothing computes a
gradient, and the random generators the harness reseeds (Python's, numpy's, torch's, CUDA's and
Megatron's tracked ones) are restored, so the training losses with the hook on are bitwise those
without it (tests/unit/test_downstream_hook.py).
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megaspan.errors import ConfigError
from megaspan.training.hooks import Hook, StepResult


@contextmanager
def preserved_rng():
    """Every random generator training draws from, as it was before the block."""
    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    tracker = get_cuda_rng_tracker()
    tracked = {name: state.clone() for name, state in tracker.get_states().items()}
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


@contextmanager
def eval_mode(chunks):
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk in chunks:
            chunk.train()


def tokenizer_path(trainer) -> str:
    """The tokenizer the run trains with: the resolved config's (a trained one's cache path), else
    ``tokenizer.model``."""
    resolved = ((trainer.resolved or {}).get("config") or {}).get("tokenizer") or {}
    path = resolved.get("model") or trainer.cfg.tokenizer.model
    if not path:
        raise ConfigError(
            "eval.downstream.tasks needs the run's tokenizer: set tokenizer.model (a run given its "
            "datasets in code has no tokenizer of its own)"
        )
    return str(path)


class DownstreamHook(Hook):
    def __init__(self, cfg) -> None:
        from megaspan.evaluate.harness import check_downstream_tasks

        self.cfg = cfg  # DownstreamConfig
        check_downstream_tasks(cfg)  # one line, before the run dir is touched
        self.last: int | None = None
        self._lm = None

    def _adapter(self, trainer):
        if self._lm is None:
            from megaspan.data.tokenizer import load_tokenizer
            from megaspan.evaluate.harness import MegaspanLM
            from megaspan.evaluate.live import LiveModel
            from megaspan.models.mcore_config import padded_vocab_size

            c = trainer.cfg
            tok = c.tokenizer
            tokenizer = load_tokenizer(
                tokenizer_path(trainer), type=tok.type, eod_token=tok.eod_token, bos_token=tok.bos_token
            )
            vocab = ((trainer.resolved or {}).get("config") or {}).get("model", {}).get("vocab_size")
            padded = padded_vocab_size(
                vocab or c.model.vocab_size or tokenizer.vocab_size, c.parallel.tensor_model_parallel_size
            )
            self._lm = MegaspanLM(LiveModel(trainer, tokenizer, padded), batch_size=self.cfg.batch_size)
        return self._lm

    def run(self, trainer) -> dict[str, dict[str, float]]:
        """Score the tasks now (collective); returns ``{task: {metric: value}}`` (every rank)."""
        from megaspan.evaluate.harness import evaluate_tasks, task_scores

        step = trainer.progress.step
        lm = self._adapter(trainer)
        t0 = time.perf_counter()
        with preserved_rng(), eval_mode(trainer.objs.model):
            results = evaluate_tasks(
                lm,
                list(self.cfg.tasks),
                include_path=self.cfg.include_path,
                limit=self.cfg.limit,
                num_fewshot=self.cfg.num_fewshot,
                # The standard errors are not kept, and their resampling would run on every rank.
                bootstrap_iters=0,
            )
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The harness returns its results where LOCAL_RANK is 0; every rank computed the same.
            box = [results]
            dist.broadcast_object_list(box, src=0)
            results = box[0]
        scores = task_scores(results)
        trainer.downstream[step] = scores
        trainer.log.scalars(
            {f"downstream/{task}/{m}": v for task, metrics in scores.items() for m, v in metrics.items()},
            step,
        )
        text = " | ".join(
            f"{task} {m} {v:.4f}" for task, metrics in scores.items() for m, v in metrics.items()
        )
        trainer.log.info(f"downstream {text} | step {step} ({time.perf_counter() - t0:.1f} s)")
        self.last = step
        return scores

    def on_fit_start(self, trainer) -> None:
        self.last = trainer.progress.step  # a resumed run's step was scored before it stopped

    def on_step_end(self, trainer, result: StepResult) -> None:
        if self.cfg.interval and result.step % self.cfg.interval == 0:
            self.run(trainer)

    def on_fit_end(self, trainer) -> None:
        # A preempted or stopped run ends fast; its final scores come after the resume.
        if trainer.finished and self.last != trainer.progress.step:
            self.run(trainer)
