"""lm-evaluation-harness over a megaspan model: an ``lm_eval`` ``TemplateLM`` and ``megaspan eval``.

The harness owns the tasks, prompts, request building and metrics; this module only answers its
three kinds of requests from the model's logits, for ``megaspan eval`` (a checkpoint loaded into
one process) and for the in-loop downstream hook (the live model under its TP/PP layout,
:mod:`megaspan.evaluate.live`) alike:

* ``loglikelihood`` (multiple choice, LAMBADA...): the harness's ``TemplateLM`` splits each
  (context, continuation) pair into token ids (trailing context spaces move to the continuation);
  :meth:`_loglikelihood_tokens` puts :attr:`MegaspanLM.prefix_token_id` before every context
  and scores them in length-sorted, right-padded batches (right padding cannot change a causal
  model's earlier positions).
* ``loglikelihood_rolling`` (perplexity tasks): disjoint windows of the model's context, built by
  the harness's own ``get_rolling_token_windows`` (the first window is conditioned on the prefix
  token), each scored as a loglikelihood request.
* ``generate_until``: greedy decoding (sampling if the task asks for it) up to ``max_gen_toks`` or
  the first stop string.

Tokenizer mapping: megaspan's sentencepiece models are trained without a dummy prefix and with the
identity normalization, so they encode text byte-faithfully like GPT-2's BPE (a leading space is
part of the next piece) and ``tok_encode`` is plain encoding. Documents were trained as
``text + EOD`` with no BOS, so the EOD id is both the harness's end-of-text token and the prefix
token that starts a document.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from megaspan.errors import ConfigError, UserError

try:  # the optional `eval` extra; megaspan eval says how to install it when it is missing
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only without the extra
    TemplateLM = object  # type: ignore[assignment,misc]


def _require_lm_eval(what: str = "megaspan eval") -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs lm-evaluation-harness: pip install 'megaspan[eval]'") from None


class MegaspanLM(TemplateLM):
    """An lm-eval model over anything with ``target_scores(tokens[b, s], targets[b, s])`` (per
    position: log-probability of the target and whether it is the greedy choice),
    ``logits(tokens[b, s]) -> [b, s, vocab]`` (generation), ``tokenizer``, ``max_length``,
    ``vocab_size`` and ``device``: a one-process :class:`~megaspan.evaluate.model.LoadedModel`
    (``megaspan eval``) or the live model under its layout,
    :class:`~megaspan.evaluate.live.LiveModel` (the in-loop hook)."""

    def __init__(self, model, batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.max_gen_toks = max_gen_toks

    # -- tokenization --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.model.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # No special tokens are ever added: the prefix token is the harness's to place.
        return self.model.tokenizer.tokenize(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.detokenize(ids)

    # -- scoring -------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per pair, in
        length-sorted batches.

        The one scoring path of ``megaspan eval`` and the in-loop hook: the model answers
        ``target_scores(tokens, targets)`` per position (a one-process model from its logits, the
        live model across its TP/PP layout; both through :func:`megaspan.evaluate.scoring.target_scores`)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        inputs = []
        for ctx, cont in pairs:
            # Keep the last max_length inputs: the continuation, and as much context as fits.
            whole = (ctx + cont)[-(self.max_length + 1) :]
            inputs.append((whole[:-1], whole[1:][-len(cont) :] if cont else []))
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i][0]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(inputs[batch[0]][0])
            if width == 0:  # nothing to condition on and nothing to score
                for i in batch:
                    results[i] = (0.0, True)
                continue
            tokens = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            targets = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for row, i in enumerate(batch):
                inp, target = inputs[i]
                tokens[row, : len(inp)] = torch.tensor(inp)
                if target:
                    targets[row, len(inp) - len(target) : len(inp)] = torch.tensor(target)
            logprobs, greedy = self.model.target_scores(tokens, targets)
            for row, i in enumerate(batch):
                inp, target = inputs[i]
                if not target:
                    results[i] = (0.0, True)
                    continue
                span = slice(len(inp) - len(target), len(inp))
                results[i] = (float(logprobs[row, span].sum()), bool(greedy[row, span].all()))
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Every request is a document start, so its context follows the prefix (EOD) token as
        # every training document did; the harness adds it only to empty contexts (its default
        # for models without BOS), and a context it already starts is left alone.
        pairs = [
            (ctx if ctx[:1] == [self.prefix_token_id] else [self.prefix_token_id, *ctx], cont)
            for _, ctx, cont in requests
        ]
        results = self._score(pairs)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
            ):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megaspan.evaluate.generate import Sampling, generate_ids

        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            sampling = Sampling(
                max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            prompt = [self.prefix_token_id, *self.tok_encode(context)]
            text = self.tok_decode(generate_ids(self.model, prompt, sampling, stop={self.eot_token_id}))
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs


INCLUDE_HINT = "pass --include-path DIR with your own task YAMLs"
"""How ``megaspan eval`` is told about task YAMLs of its own (the config key says it otherwise)."""


@functools.lru_cache(maxsize=4)
def _indexed_tasks(include_path: str | None):
    """lm-eval's task index (it reads every task YAML the harness ships: seconds), built once per
    process and ``include_path``: the config check before training and every in-loop evaluation
    share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_manager(include_path: str | None, key: str = "--include-path "):
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"{key}{include_path} is not a directory of task YAMLs")
    return _indexed_tasks(include_path)


def check_tasks(tasks: list[str], manager, hint: str = INCLUDE_HINT, where: str = "") -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(
            f"{where}unknown lm-eval task {', '.join(unknown)}: see `lm-eval ls tasks` for the names, or {hint}"
        )


def check_downstream_tasks(downstream) -> Any:
    """``eval.downstream`` (a :class:`~megaspan.config.schema.DownstreamConfig`) against the
    harness: installed, ``include_path`` a directory, every task known. One-line
    :class:`ConfigError` otherwise; returns the task manager (None when no tasks are set). Run
    before anything is written (``megaspan train`` and the hook's construction)."""
    if not downstream.tasks:
        return None
    _require_lm_eval("eval.downstream.tasks")
    manager = _task_manager(downstream.include_path, "eval.downstream.include_path=")
    check_tasks(
        list(downstream.tasks),
        manager,
        "set eval.downstream.include_path=DIR to a directory of your own task YAMLs",
        "eval.downstream.tasks: ",
    )
    return manager


def evaluate_tasks(
    lm: MegaspanLM,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    bootstrap_iters: int = 100000,
) -> dict[str, Any] | None:
    """Run lm-eval's ``simple_evaluate`` on ``lm``; returns ``{"results": {task: {metric: value}},
    "n_samples": ..., "versions": ...}`` (the JSON-safe part of the harness's output).

    The harness returns its results only in the process whose ``LOCAL_RANK`` is 0 (or unset);
    elsewhere this returns None (the in-loop hook broadcasts rank 0's). It seeds Python's,
    numpy's and torch's global generators with ``seed``: a caller that trains on afterwards
    restores them (the hook does). ``bootstrap_iters``: the harness's resampling for the standard
    errors (for perplexity, F1, BLEU...: a process pool of every core); 0 skips them (they read
    "N/A"; the scores are the same)."""
    _require_lm_eval()
    import lm_eval

    manager = _task_manager(include_path)
    check_tasks(tasks, manager)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    if out is None:
        return None
    keep = ("results", "n-samples", "versions", "n-shot", "higher_is_better")
    return json.loads(json.dumps({k: out[k] for k in keep if k in out}, default=str))


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of every numeric metric (stderr and aliases left out). lm-eval
    names a metric ``name,filter``; the default filter ``none`` is dropped (``acc,none`` ->
    ``acc``), another is kept (``exact_match,strict-match``)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or "stderr" in key:
                continue
            name, _, filt = key.partition(",")
            out.setdefault(task, {})[name if filt in ("", "none") else key] = float(value)
    return out


def headline(results: dict[str, Any]) -> dict[str, float]:
    """One ``task/metric`` -> value per numeric metric (see :func:`task_scores`)."""
    return {f"{task}/{m}": v for task, metrics in task_scores(results).items() for m, v in metrics.items()}


def record_in_run_dir(run_dir: Path, checkpoint: Path, step: int, results: dict[str, Any]) -> Path:
    """Merge the scores into ``<run_dir>/summary.json`` under ``"eval"``, keyed by task (the newest
    evaluation of a task wins; the step and checkpoint it scored are kept with it)."""
    from megaspan.training.callbacks.summary import SUMMARY_FILE
    from megaspan.training.rundir import guarded, write_atomic

    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    scores = summary.setdefault("eval", {})
    for task, metrics in results.get("results", {}).items():
        scores[task] = {"step": step, "checkpoint": str(checkpoint), **metrics}
    guarded(path, lambda: write_atomic(path, json.dumps(summary, indent=1, default=str)))
    return path
