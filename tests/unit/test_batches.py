"""Micro-batch feeding: read-ahead, pipeline-stage keys and TP broadcast change nothing a rank sees.

* the background reader yields exactly the batches of a plain main-thread loop, from any
  position (exact resume: the position is ``consumed_samples``), and training on it gives the
  same losses bit for bit;
* with TP=2 only TP rank 0 reads the dataset (the other rank's dataset raises if touched) and both
  ranks get identical batches; with PP=2 the first stage gets only the inputs, the last only the
  targets;
* a reader error reaches the training thread; a dropped iterator's thread stops.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from megaspan.training import batches as B

SEQ = 8


class Samples:
    """GPTDataset-shaped samples whose values encode their index."""

    def __init__(self, n: int = 40, fail_at: int | None = None, forbid: bool = False):
        self.n, self.fail_at, self.forbid = n, fail_at, forbid

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.forbid:
            raise AssertionError("this rank must not read the dataset")
        if i == self.fail_at:
            raise ValueError(f"bad sample {i}")
        base = torch.arange(SEQ + 1) + 100 * i
        return {
            "tokens": base[:-1],
            "labels": base[1:],
            "loss_mask": torch.ones(SEQ),
            "position_ids": torch.arange(SEQ),
        }


def _drain(it) -> list[dict]:
    return [{k: (None if v is None else v.clone()) for k, v in b.items()} for b in it]


def _same(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            return False
        for k in x:
            if (x[k] is None) != (y[k] is None) or (x[k] is not None and not torch.equal(x[k], y[k])):
                return False
    return True


CPU = torch.device("cpu")


@pytest.mark.parametrize("consumed", [0, 12])
def test_read_ahead_yields_the_plain_loop_batches_from_any_position(consumed):
    ds = Samples()
    plain = _drain(B.MicroBatches(ds, consumed, 2, 1, 2, CPU, prefetch=0, keys=None))
    ahead = _drain(B.MicroBatches(ds, consumed, 2, 1, 2, CPU, prefetch=3, keys=None))
    assert _same(plain, ahead)
    # The rule itself: DP rank 1 of 2 takes the second micro-batch of every block of 4 samples.
    assert len(plain) == (40 - consumed) // 4
    assert plain[0]["tokens"][0, 0].item() == 100 * (consumed + 2)
    # Resuming at a later position gives the tail of the uninterrupted sequence.
    full = _drain(B.MicroBatches(ds, 0, 2, 1, 2, CPU, prefetch=2, keys=None))
    assert _same(full[consumed // 4 :], ahead)


def test_stage_keys_feed_none_for_unused_keys():
    ds = Samples()
    last = next(B.MicroBatches(ds, 0, 2, 0, 1, CPU, keys=B.stage_keys(False, True)))
    assert last["tokens"] is None and last["position_ids"] is None
    assert torch.equal(last["labels"][0], ds[0]["labels"])
    middle = next(B.MicroBatches(Samples(forbid=True), 0, 2, 0, 1, CPU, keys=B.stage_keys(False, False)))
    assert all(v is None for v in middle.values())


def test_reader_error_reaches_the_consumer_and_dropped_readers_stop():
    def readers() -> int:
        # Only this module's reader threads: the process-wide count also moves with threads that
        # other tests (TensorBoard writers, subprocess pipes) start and stop, which made it flaky.
        return sum(t.name == "megaspan-prefetch" and t.is_alive() for t in threading.enumerate())

    def settle(expected: int) -> int:
        for _ in range(100):
            if readers() == expected:
                break
            threading.Event().wait(0.1)
        return readers()

    it = B.MicroBatches(Samples(fail_at=3), 0, 2, 0, 1, CPU, prefetch=2, keys=None)
    next(it)  # samples 0, 1
    with pytest.raises(ValueError, match="bad sample 3"):
        next(it)
    del it
    gc.collect()
    assert settle(0) == 0  # a reader that failed ends
    it = B.MicroBatches(Samples(n=10**6), 0, 2, 0, 1, CPU, prefetch=2, keys=None)
    next(it)
    assert readers() == 1
    del it
    gc.collect()
    assert settle(0) == 0  # a dropped reader stops


def test_read_ahead_gives_identical_losses(single_process_group, monkeypatch):
    """Three trainer steps of the same model fed with and without read-ahead: equal losses."""
    from megaspan.bench.models import SyntheticTokens, build_candidate
    from megaspan.bench.runner import build_config
    from megaspan.training.build import init_megatron

    def cfg_for(name):
        return build_config("cpu-small", "fp32", [f"model.norm_placement={name}", "training.steps=10"])

    losses = {}
    for depth in (0, 2):
        monkeypatch.setattr(B, "PREFETCH", depth)
        cfg = cfg_for("spannorm")
        init_megatron(cfg)
        data = SyntheticTokens(cfg.model.seq_length, cfg.model.vocab_size, seed=3)
        cand = build_candidate("spannorm", cfg_for, data, cfg.model.vocab_size, CPU)
        out = [cand.step() for _ in range(3)]
        losses[depth] = [float(getattr(r, "loss", r)) for r in out]
        cand.close()
    assert losses[0] == losses[2]


def _tp_pp_job(rank: int, world: int, layout: str) -> list[dict]:
    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    par = (
        ParallelConfig(tensor_model_parallel_size=2)
        if layout == "tp2"
        else ParallelConfig(pipeline_model_parallel_size=2)
    )
    initialize_model_parallel(par, seed=1)
    # TP: rank 1 would fail on any read; it must get everything by broadcast.
    ds = Samples(forbid=layout == "tp2" and rank == 1)
    return _drain(B.micro_batches(ds, 4, 2, 0, 1, CPU))


@pytest.mark.integration  # gloo ranks in subprocesses
@pytest.mark.distributed
def test_tp_rank0_reads_and_broadcasts_and_pp_stages_read_their_keys(dist_pool):
    direct = _drain(B.MicroBatches(Samples(), 4, 2, 0, 1, CPU, prefetch=0, keys=None))
    # One pair of ranks for both layouts (each rank start imports torch and Megatron: ~8 s of CPU).
    tp0, tp1 = dist_pool(2).run(_tp_pp_job, "tp2", timeout=240)
    assert _same(tp0, direct) and _same(tp1, direct)
    first, last = dist_pool(2).run(_tp_pp_job, "pp2", timeout=240)
    assert len(first) == len(last) == len(direct)
    assert first[0]["labels"] is None and first[0]["loss_mask"] is None
    assert torch.equal(first[0]["tokens"], direct[0]["tokens"])
    assert last[0]["tokens"] is None and last[0]["position_ids"] is None
    assert torch.equal(last[0]["labels"], direct[0]["labels"])
