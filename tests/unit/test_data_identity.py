"""Training data replaced under the same prefix is noticed (issue 20 item 2).

* every checkpoint records the data's identity (prefix, sizes, .idx content hash, blend); a
  resume on other data is refused in one line unless ``checkpoint.allow_data_change=true``;
* Megatron's index cache (named after the path, not the content) is never trusted for new
  content: the datasets read the new data through indices built for it.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from megaspan.config.schema import DataConfig
from megaspan.data.datasets import build_datasets, dataset_identity
from megaspan.data.identity import describe_difference
from megaspan.data.preprocess import preprocess_documents
from megaspan.data.tokenizer import train_tokenizer
from megaspan.errors import CheckpointError
from tests.helpers.cli import train
from tests.helpers.models import one_optimizer_step, tiny_overrides

WORDS = ["alpha", "beam", "cage", "deck", "fig", "hijack", "image", "nut", "opus", "pyx"]


def _documents(count: int, seed: int, longest: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, longest))) + "\n" for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and two different document sets (other counts and lengths)."""
    root = tmp_path_factory.mktemp("identity")
    docs_a, docs_b = _documents(300, 1, 40), _documents(500, 2, 20)
    tok = train_tokenizer(docs_a + docs_b, vocab_size=300, cache_dir=root / "tok")
    return root, tok, docs_a, docs_b


def _samples(ds, n: int = 30) -> list[list[int]]:
    return [ds[i]["tokens"].tolist() for i in range(n)]


def test_data_replaced_under_the_same_prefix_gets_a_fresh_index(corpus, tmp_path):
    root, tok, docs_a, docs_b = corpus
    prefix = tmp_path / "data" / "corpus"
    prefix.parent.mkdir()
    cfg = DataConfig(paths=[str(prefix)], split="90,10,0", cache_dir=str(tmp_path / "cache"))
    preprocess_documents(docs_a, tok, prefix, progress=False)
    build_datasets(cfg, tok, seq_length=32, seed=3, num_samples=(40, 4, 0))
    preprocess_documents(docs_b, tok, prefix, progress=False)  # new data, same prefix
    train_ds = build_datasets(cfg, tok, seq_length=32, seed=3, num_samples=(40, 4, 0))[0]
    # What a cache that never saw the old data builds from the new data.
    clean = DataConfig(paths=[str(prefix)], split="90,10,0", cache_dir=str(tmp_path / "clean"))
    expected = build_datasets(clean, tok, seq_length=32, seed=3, num_samples=(40, 4, 0))[0]
    assert _samples(train_ds) == _samples(expected)


def test_identity_names_what_changed(corpus, tmp_path):
    root, tok, docs_a, docs_b = corpus
    prefix = tmp_path / "corpus"
    preprocess_documents(docs_a, tok, prefix, progress=False)
    cfg = DataConfig(paths=[str(prefix)], split="90,10,0", cache_dir=str(tmp_path / "cache"))
    before = dataset_identity(cfg, tok)
    assert describe_difference(before, dataset_identity(cfg, tok)) is None
    assert json.loads(json.dumps(before)) == before  # goes into the JSON commit record
    preprocess_documents(docs_b, tok, prefix, progress=False)
    assert f"{prefix}: .bin size changed" in describe_difference(before, dataset_identity(cfg, tok))
    reweighted = DataConfig(paths=[str(prefix)], split="80,20,0", cache_dir=str(tmp_path / "cache"))
    now = dataset_identity(reweighted, tok)
    assert "data.split" in describe_difference(dataset_identity(cfg, tok), now)


# ---- checkpoints --------------------------------------------------------------------------------


def _objs():
    from megaspan.config.loader import load_config
    from megaspan.training.setup import build_training_objects

    return build_training_objects(load_config(None, tiny_overrides()), 128)


def test_resume_on_other_data_is_refused_unless_allowed(mcore, corpus, tmp_path, capsys):
    from megaspan.training.checkpoint import Progress, load_checkpoint, save_checkpoint
    from megaspan.training.setup import cuda_free

    root, tok, docs_a, docs_b = corpus
    prefix = tmp_path / "corpus"
    cfg = DataConfig(paths=[str(prefix)], split="90,10,0", cache_dir=str(tmp_path / "cache"))
    preprocess_documents(docs_a, tok, prefix, progress=False)
    saved_identity = dataset_identity(cfg, tok)
    objs = _objs()
    one_optimizer_step(objs)
    with cuda_free():
        path = save_checkpoint(
            tmp_path / "ckpt",
            Progress(0, 0),
            objs.chunks,
            objs.optimizer,
            objs.scheduler,
            {},
            None,
            data_identity=saved_identity,
        )
    preprocess_documents(docs_b, tok, prefix, progress=False)
    now = dataset_identity(cfg, tok)
    load = dict(chunks=objs.chunks, optimizer=objs.optimizer, scheduler=objs.scheduler)
    with pytest.raises(CheckpointError) as info, cuda_free():
        load_checkpoint(path, **load, expected_data=now)
    text = str(info.value)
    assert "\n" not in text and str(prefix) in text and "checkpoint.allow_data_change=true" in text
    with cuda_free():
        load_checkpoint(path, **load, expected_data=saved_identity)  # the same data: fine
        load_checkpoint(path, **load, expected_data=now, allow_data_change=True)
    assert "continuing on the new data" in capsys.readouterr().err


@pytest.mark.integration  # CLI subprocesses (~20 s)
def test_cli_resume_after_the_data_was_replaced(corpus, tmp_path):
    """The whole command: one line and exit 2 (before: it trained on the new .bin through the
    old index); then allowed with the option."""
    root, tok, docs_a, docs_b = corpus
    prefix = tmp_path / "data" / "corpus"
    prefix.parent.mkdir()
    preprocess_documents(docs_a, tok, prefix, progress=False)
    run = tmp_path / "run"
    common = (
        f"data.paths=[{prefix}]",
        f"tokenizer.model={tok.path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "training.steps=2",
        "checkpoint.save_interval=2",
        "schedule.warmup_steps=1",
    )
    first = train(run, *common)
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(prefix.parent)
    prefix.parent.mkdir()
    preprocess_documents(docs_b, tok, prefix, progress=False)
    longer = (*common[:3], "training.steps=4", *common[4:])
    refused = train(run, *longer)
    assert refused.returncode == 2, (refused.returncode, refused.stderr[-2000:])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("megaspan: error:")]
    assert len(errors) == 1 and str(prefix) in errors[0] and "Traceback" not in refused.stderr
    allowed = train(run, *longer, "checkpoint.allow_data_change=true")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "resumed from checkpoint at step 2" in allowed.stdout


def test_idx_hashes_are_remembered_per_file_version(corpus, tmp_path, monkeypatch):
    """A large .idx is hashed once, not at every start; a replaced file is hashed again."""
    from megaspan.data import identity

    root, tok, docs_a, docs_b = corpus
    prefix = tmp_path / "corpus"
    preprocess_documents(docs_a, tok, prefix, progress=False)
    cfg = DataConfig(paths=[str(prefix)], split="90,10,0", cache_dir=str(tmp_path / "cache"))
    first = dataset_identity(cfg, tok)
    memo = json.loads((tmp_path / "cache" / "index_cache" / identity._MEMO_FILE).read_text())
    assert list(memo.values()) == [first["datasets"][0]["idx_sha256"]]  # kept for the next start
    opened: list[str] = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith(".idx"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert dataset_identity(cfg, tok) == first and opened == []  # from the memo
    monkeypatch.undo()
    preprocess_documents(docs_b, tok, prefix, progress=False)
    second = dataset_identity(cfg, tok)
    assert second["datasets"][0]["idx_sha256"] != first["datasets"][0]["idx_sha256"]
