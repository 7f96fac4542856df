"""build_datasets: GPTDataset samples, blend weights, the default corpus, input validation."""

from __future__ import annotations

import json
import random
import socket
from collections import Counter
from pathlib import Path

import numpy
import pytest
import torch

from megaspan.config.schema import DataConfig, TokenizerConfig
from megaspan.data import DataError
from megaspan.data.datasets import build_datasets
from megaspan.data.preprocess import preprocess_documents
from megaspan.data.tokenizer import build_tokenizer, train_tokenizer

WORDS_A = ["alpha", "beam", "cage", "deck", "fig", "hijack", "image"]  # letters a..m only
WORDS_B = ["nut", "opus", "pyx", "quartz", "stow", "ruz", "vox"]  # letters n..z only


def _documents(words: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "\n" for _ in range(count)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer and two preprocessed datasets whose tokens tell them apart."""
    root = tmp_path_factory.mktemp("data")
    docs_a, docs_b = _documents(WORDS_A, 300, 1), _documents(WORDS_B, 300, 2)
    tok = train_tokenizer(docs_a + docs_b, vocab_size=300, cache_dir=root / "cache")
    for name, docs in (("a", docs_a), ("b", docs_b)):
        preprocess_documents(docs, tok, root / name, progress=False)
    ids_a = {i for d in docs_a for i in tok.tokenize(d)}
    ids_b = {i for d in docs_b for i in tok.tokenize(d)}
    return root, tok, docs_a, ids_a - ids_b, ids_b - ids_a


def test_gpt_samples_keys_shapes_and_eod_placement(setup):
    root, tok, docs_a, _, _ = setup
    cfg = DataConfig(
        paths=[str(root / "a")], split="90,10,0", cache_dir=str(root / "cache"), eod_mask_loss=True
    )
    seq = 128  # several whole documents per sample
    train, valid, test = build_datasets(cfg, tok, seq_length=seq, seed=7, num_samples=(200, 20, 0))
    assert test is None and len(train) >= 200 and len(valid) >= 20
    encoded = {tuple(tok.tokenize(d)) for d in docs_a}
    whole_documents_seen = 0
    for idx in range(200):
        s = train[idx]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (seq,)
        assert s["attention_mask"].shape == (1, seq, seq)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(seq))
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == tok.eod)  # eod_mask_loss
        # The stream is whole documents separated by exactly one EOD each.
        stream = s["tokens"].tolist() + s["labels"][-1:].tolist()
        pieces, start = [], 0
        for pos, token in enumerate(stream + [tok.eod]):
            if token == tok.eod:
                pieces.append(tuple(stream[start:pos]))
                start = pos + 1
        for inner in pieces[1:-1]:
            assert inner in encoded
            whole_documents_seen += 1
    assert whole_documents_seen > 100  # the check above was not vacuous


def test_blend_honours_weights(setup):
    root, tok, _, only_a, only_b = setup
    cfg = DataConfig(
        paths=[str(root / "a"), str(root / "b")],
        weights=[0.7, 0.3],
        split="100,0,0",
        cache_dir=str(root / "cache"),
    )
    train, _, _ = build_datasets(cfg, tok, seq_length=16, seed=3, num_samples=(3000, 0, 0))
    assert len(train) >= 3000
    origins = Counter()
    for idx in range(3000):
        sample = train[idx]
        tokens = set(sample["tokens"].tolist())
        origin = "a" if tokens & only_a else "b"
        assert not tokens & (only_b if origin == "a" else only_a)  # never mixes sources
        assert sample["dataset_id"] == (0 if origin == "a" else 1)
        origins[origin] += 1
    assert abs(origins["a"] / 3000 - 0.7) < 0.03


def test_default_corpus_uses_held_out_valid_prefix(tmp_path):
    data_cfg = DataConfig(cache_dir=str(tmp_path))
    tok = build_tokenizer(TokenizerConfig(vocab_size=512, max_train_sentences=2000), data_cfg)
    train, valid, test = build_datasets(data_cfg, tok, seq_length=64, seed=1, num_samples=(100, 10, 5))
    assert test is None and len(train) >= 100 and len(valid) >= 10
    assert "stdlib" in train.dataset_path and train.dataset_path.endswith("/train")
    assert valid.dataset_path.endswith("/valid")
    bin_file = tmp_path.joinpath(*train.dataset_path.split("/")[-3:]).with_suffix(".bin")
    mtime = bin_file.stat().st_mtime_ns
    again, _, _ = build_datasets(data_cfg, tok, seq_length=64, seed=1, num_samples=(100, 10, 5))
    assert again.dataset_path == train.dataset_path and bin_file.stat().st_mtime_ns == mtime
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"paths": ["{root}/missing"]}, "missing.bin and {root}/missing.idx not found"),
        ({"paths": ["{root}/a", "{root}/b"], "weights": [1.0]}, "data.weights has 1 entries"),
        ({"paths": ["{root}/a"], "weights": [0.0]}, "positive"),
        ({"weights": [1.0]}, "data.paths is empty"),
        ({"paths": ["{root}/tiny"], "split": "98,2,0"}, "the valid split gets none"),
        ({"paths": ["{root}/a"], "split": "train"}, "data.split"),
        ({"paths": ["{root}/a.bin"]}, "without .bin/.idx"),
    ],
)
def test_bad_inputs_raise_one_line_data_error(setup, overrides, fragment):
    root, tok, _, _, _ = setup
    if not (root / "tiny.bin").exists():
        preprocess_documents(["x\n", "y\n", "z\n"], tok, root / "tiny", progress=False)
    fields = {k: [p.format(root=root) for p in v] if k == "paths" else v for k, v in overrides.items()}
    cfg = DataConfig(cache_dir=str(root / "cache"), **fields)
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tok, seq_length=16, seed=1, num_samples=(10, 10, 0))
    assert fragment.format(root=root) in str(info.value)
    assert "\n" not in str(info.value)


def test_half_present_dataset_names_the_missing_file(setup, tmp_path):
    _, tok, _, _, _ = setup
    preprocess_documents(["some text\n"] * 20, tok, tmp_path / "half", progress=False)
    (tmp_path / "half.idx").unlink()
    cfg = DataConfig(paths=[str(tmp_path / "half")], cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"half\.idx not found.*megaspan preprocess"):
        build_datasets(cfg, tok, seq_length=16, seed=1, num_samples=(10, 1, 0))


def test_empty_and_truncated_datasets_are_rejected(setup, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    _, tok, _, _, _ = setup
    builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=numpy.uint16)
    builder.finalize(str(tmp_path / "empty.idx"))  # a valid file pair with zero documents
    preprocess_documents(["some text\n"] * 20, tok, tmp_path / "cut", progress=False)
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    for name, fragment in (("empty", "holds no documents"), ("cut", "incomplete or corrupt")):
        cfg = DataConfig(paths=[str(tmp_path / name)], cache_dir=str(tmp_path))
        with pytest.raises(DataError) as info:
            build_datasets(cfg, tok, seq_length=16, seed=1, num_samples=(10, 1, 0))
        assert fragment in str(info.value) and "\n" not in str(info.value)


def _two_rank_worker(rank: int, port: int, cache: str, model: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        data_cfg = DataConfig(cache_dir=cache)
        tok = build_tokenizer(TokenizerConfig(model=model), data_cfg)
        train, valid, _ = build_datasets(data_cfg, tok, seq_length=32, seed=5, num_samples=(64, 8, 0))
        result = {"tokens": train[3]["tokens"].tolist(), "valid": len(valid)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_build_the_default_corpus_once_and_agree(setup, tmp_path):
    """Rank 0 preprocesses and builds the indices; rank 1 waits, then reads the same cache.

    Spawned, not forked: forking this multi-threaded pytest process can deadlock the children.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, tok, _, _, _ = setup
    torch.multiprocessing.spawn(
        _two_rank_worker, args=(port, str(tmp_path), str(tok.path), str(tmp_path)), nprocs=2
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1
    assert len(list((tmp_path / "stdlib").iterdir())) == 1


def test_index_cache_builds_of_concurrent_jobs_are_serialized(setup, tmp_path):
    """A second job sharing the cache waits for the first job's index build to finish
    (Megatron writes its index files one by one; a reader in between would miss some)."""
    import fcntl
    import threading
    import time

    root, tok, _, _, _ = setup
    cfg = DataConfig(paths=[str(root / "a")], split="90,10,0", cache_dir=str(tmp_path))
    lock_path = tmp_path / "index_cache" / ".lock"
    lock_path.parent.mkdir(parents=True)
    result: dict = {}
    with open(lock_path, "w") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: result.update(
                ds=build_datasets(cfg, tok, seq_length=16, seed=3, num_samples=(20, 2, 0))
            )
        )
        worker.start()
        time.sleep(2.0)
        assert worker.is_alive() and not list(lock_path.parent.rglob("*.npy"))
        fcntl.flock(other_job, fcntl.LOCK_UN)
    worker.join(timeout=120)
    assert not worker.is_alive() and len(result["ds"][0]) >= 20
