"""The model being trained, under its own layout, as the model of
:class:`~megaspan.evaluate.harness.MegaspanLM`: what the in-loop downstream hook scores.

``megaspan eval`` loads a checkpoint into one process (:class:`~megaspan.evaluate.model.LoadedModel`);
in the loop there is no second copy of the weights: every rank runs lm-evaluation-harness in
lockstep on the same requests (the harness is deterministic given its seeds, and it sees a
one-process model: ``rank`` 0, ``world_size`` 1), and each batch of requests goes through the
live model chunks with Megatron's forward-only schedule, as validation does
(:meth:`megaspan.training.trainer.Trainer.evaluate`):

* the batch is right-padded to a width the layout accepts (a multiple of TP with sequence
  parallelism) and cut into one micro-batch per pipeline stage (the pipeline stays full, and an
  interleaved schedule gets the micro-batch count it requires), padding rows with EOD;
* on the last pipeline stage, each TP rank scores the targets against its slice of the
  vocabulary (:func:`megaspan.evaluate.scoring.target_scores`, two all-reduces over TP);
* the scores are broadcast from the last stage to the other stages of its pipeline, so every
  rank hands the harness the same numbers and the harness computes the same metrics everywhere.

Data-parallel replicas do the same work redundantly (each is a whole model; splitting the requests
across them would need lm-eval's multi-rank gather, for a cost that is small next to training).
Context parallelism is refused by the config check (the sequence would have to be split and the
scores gathered across CP ranks).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megaspan.evaluate.scoring import target_scores


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _collect(score, targets: torch.Tensor, output: torch.Tensor):
    """Megatron's loss-function slot on the last stage: no loss, the scores as 'reported' data."""
    return torch.zeros((), device=output.device), {"scores": score(output, targets)}


class LiveModel:
    """``target_scores`` and ``logits`` of the trainer's model chunks (collective: every rank of
    the run must call the same methods with the same tokens), plus ``tokenizer``, ``max_length``,
    ``device`` and ``vocab_size`` for the harness adapter. The caller switches the chunks to eval
    mode and back (:class:`megaspan.training.callbacks.downstream.DownstreamHook`)."""

    def __init__(self, trainer, tokenizer, padded_vocab: int) -> None:
        from megatron.core import parallel_state as ps

        self.trainer = trainer
        self.tokenizer = tokenizer
        self.device = trainer.device
        self.max_length = trainer.cfg.model.seq_length  # the longest sequence it was trained on
        par = trainer.cfg.parallel
        tp = ps.get_tensor_model_parallel_world_size()
        self._multiple = tp if par.sequence_parallel else 1
        self._tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        self._pp = ps.get_pipeline_model_parallel_world_size()
        self._padded_vocab = padded_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def target_scores(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(targets[b, j] | tokens[b, :j + 1]), greedy) per position of a ``[b, s]`` batch, on the CPU."""

        def score(logits, tgt):
            logprob, greedy = target_scores(logits, tgt, self._tp_group)
            return torch.stack([logprob, greedy.float()], dim=-1)

        out = self._run(tokens, targets, score, 2)
        return out[..., 0], out[..., 1] > 0.5

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[b, s, padded vocab]`` (gathered over TP; for generation tasks only: the
        log-likelihoods never gather the vocabulary)."""

        def gathered(logits, _targets):
            logits = logits.float().contiguous()
            if self._tp_group is None:
                return logits
            parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(self._tp_group))]
            dist.all_gather(parts, logits, group=self._tp_group)
            return torch.cat(parts, dim=-1)

        return self._run(tokens, None, gathered, self._padded_vocab)

    def _run(self, tokens: torch.Tensor, targets: torch.Tensor | None, score, last_dim: int) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        rows, s = tokens.shape
        if s > self.max_length:
            raise ValueError(f"{s} tokens exceed the model's context of {self.max_length}")
        width = _round_up(s, self._multiple)
        m = self._pp
        per = -(-rows // m)
        eod = self.tokenizer.eod
        padded = torch.full((m * per, width), eod, dtype=torch.long)
        padded[:rows, :s] = tokens
        tgt = torch.full_like(padded, eod)
        if targets is not None:
            tgt[:rows, :s] = targets
        padded, tgt = padded.to(self.device), tgt.to(self.device)
        positions = torch.arange(width, device=self.device).unsqueeze(0).expand(per, width)
        micro = [
            dict(tokens=padded[i * per : (i + 1) * per], targets=tgt[i * per : (i + 1) * per])
            for i in range(m)
        ]

        def step(data_iterator, model):
            batch = next(data_iterator)
            # Plain causal attention, positions 0..width-1: as training (and megaspan eval) see it.
            output = model(batch["tokens"], positions, None)
            return output, partial(_collect, score, batch["targets"])

        trainer = self.trainer
        with torch.no_grad():
            store = trainer.fwd_bwd(
                forward_step_func=step,
                data_iterator=[iter(micro) for _ in trainer.objs.model],
                model=trainer.objs.model,
                num_microbatches=m,
                seq_length=width,
                micro_batch_size=per,
                forward_only=True,
            )
        if store:  # the last pipeline stage
            out = torch.cat([x["scores"] for x in store]).float()
        else:
            out = torch.empty((m * per, width, last_dim), dtype=torch.float32, device=self.device)
        if m > 1:
            dist.broadcast(
                out,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return out[:rows, :s].cpu()
