"""``megaspan preprocess`` inputs beyond .txt/.jsonl: parquet shards and globs, .jsonl.gz/.zst and
Hugging Face datasets (saved to disk, reloaded offline). The same documents through any input give
byte-identical .bin/.idx, for any worker count; bad inputs are one line and write nothing."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from megaspan.cli import main
from megaspan.data import DataError
from megaspan.data.corpus import expand_inputs, read_parquet
from megaspan.data.preprocess import preprocess_files
from megaspan.data.tokenizer import load_tokenizer
from tests.helpers.cli import clean_env, in_process
from tests.helpers.hf import train_tokenizer_json

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [f"def f{i}(x):\n    return x * {i}  # é {'日本' * (i % 3)}\n" for i in range(40)] + ["tail 🙂"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _write_shards(directory, docs, *, column="text", shards=2, row_group_size=7):
    """Parquet shards like FineWeb's (text + other columns), several row groups each, with null
    and empty rows that must be skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // shards)
    for n in range(shards):
        part = docs[n * per : (n + 1) * per]
        texts = [None, *part, ""]
        table = pa.table({column: texts, "id": [f"{n}-{i}" for i in range(len(texts))]})
        pq.write_table(table, directory / f"shard-{n:05d}.parquet", row_group_size=row_group_size)
    return directory


def _same_bytes(a, b):
    return all(a.with_suffix(s).read_bytes() == b.with_suffix(s).read_bytes() for s in (".bin", ".idx"))


def test_parquet_glob_jsonl_and_gz_give_identical_output_for_1_and_2_workers(tmp_path, tok):
    shards = _write_shards(tmp_path / "pq", DOCS)
    assert pq.ParquetFile(shards / "shard-00000.parquet").num_row_groups > 1
    lines = "".join(json.dumps({"text": d}) + "\n" for d in DOCS)
    (tmp_path / "c.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(lines)
    runs = {
        "jsonl": ([tmp_path / "c.jsonl"], 1),
        "gz": ([tmp_path / "c.jsonl.gz"], 1),
        "pq1": ([str(shards / "shard-*.parquet")], 1),
        "pq2": ([shards], 2),
    }
    for name, (inputs, workers) in runs.items():
        stats = preprocess_files(inputs, tok, tmp_path / "out" / name, workers=workers, progress=False)
        assert stats.documents == len(DOCS)
    out = tmp_path / "out"
    assert all(_same_bytes(out / "jsonl.x", out / f"{n}.x") for n in ("gz", "pq1", "pq2"))
    assert list(read_parquet(shards / "shard-00001.parquet")) == DOCS[21:]


def test_parquet_without_the_text_key_is_one_line_and_writes_nothing(tmp_path, tok, capsys):
    shards = _write_shards(tmp_path / "pq", DOCS, column="content")
    tokenizer = str(tok.path)
    argv = [
        "preprocess",
        "--tokenizer",
        tokenizer,
        "--input",
        str(shards),
        "--output-prefix",
        str(tmp_path / "o" / "x"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no column 'text'" in err[0] and "--text-key" in err[0], err
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--text-key", "content", "--quiet", "--workers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.bin", "x.idx"]
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "nothing-*.parquet")])


def test_jsonl_zst_reads_or_says_what_is_missing(tmp_path, tok):
    try:
        import zstandard
    except ImportError:
        (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(DataError, match="needs the zstandard package"):
            expand_inputs([tmp_path / "c.jsonl.zst"])
        return
    lines = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.jsonl").write_bytes(lines)
    for name in ("c.jsonl", "c.jsonl.zst"):
        preprocess_files([tmp_path / name], tok, tmp_path / "out" / name, workers=1, progress=False)
    assert _same_bytes(tmp_path / "out" / "c.jsonl.x", tmp_path / "out" / "c.jsonl.zst.x")


def _offline_preprocess(tmp_path, *args):
    """``python -m megaspan preprocess`` offline, in a new interpreter: datasets and
    huggingface_hub read the HF_* variables when they are imported, not when they load."""
    env = clean_env(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf-home" / "datasets"),
    )
    cmd = [sys.executable, "-m", "megaspan", "preprocess", "--quiet", "--workers", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.integration  # offline megaspan subprocesses
def test_hf_dataset_saved_to_disk_reloads_offline_identical_to_jsonl(tmp_path, tok):
    import datasets

    rows = [None, *DOCS[:20], "", *DOCS[20:]]
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[:3], "n": [0, 1, 2]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    preprocess_files([tmp_path / "c.jsonl"], tok, tmp_path / "ref", workers=1, progress=False)
    tokenizer = ["--tokenizer", str(tok.path)]
    # A save_to_disk directory is read by datasets.load_from_disk: no Hub, no cache, so no HF_*
    # variable plays a part and it runs in this process (which imported datasets above).
    local = ["preprocess", "--quiet", "--workers", "1", *tokenizer]
    done = in_process(
        [*local, "--hf-dataset", f"{tmp_path / 'saved'}::train", "--output-prefix", str(tmp_path / "hf")]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(DOCS)} documents" in done.stdout
    assert _same_bytes(tmp_path / "ref.x", tmp_path / "hf.x")
    # A Hub name goes to load_dataset, which stays off the network (and the hint names
    # HF_DATASETS_OFFLINE) only when datasets was imported offline: a process of its own.
    missing = _offline_preprocess(
        tmp_path,
        *tokenizer,
        "--hf-dataset",
        "nobody/no-such-dataset:default:train",
        "--output-prefix",
        str(tmp_path / "m"),
    )
    err = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(err) == 1, missing.stderr[-3000:]
    assert (
        err[0].startswith("megaspan: error: --hf-dataset 'nobody/no-such-dataset:default:train'")
        and "HF_DATASETS_OFFLINE" in err[0]
    )
    no_split = in_process(
        [*local, "--hf-dataset", f"{tmp_path / 'saved'}::test", "--output-prefix", str(tmp_path / "m")]
    )
    assert no_split.returncode == 2 and "no split 'test' (splits: train, validation)" in no_split.stderr
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))


@pytest.mark.integration  # kills a megaspan subprocess
def test_killed_preprocess_leaves_no_pair_training_would_accept_and_a_rerun_completes(tmp_path, tok):
    import signal
    import time

    from megaspan.data.datasets import _token_count
    from megaspan.data.preprocess import is_complete

    docs = [f"row {i}: " + DOCS[i % len(DOCS)] for i in range(20000)]
    shards = _write_shards(tmp_path / "pq", docs, shards=3, row_group_size=2000)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "megaspan",
        "preprocess",
        "--quiet",
        "--workers",
        "1",
        "--tokenizer",
        str(tok.path),
    ]
    cmd += ["--input", str(shards), "--output-prefix", str(out / "x")]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in out.glob(".x.*.bin")] if out.exists() else []
        if partial and partial[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "preprocess finished before it could be interrupted; make the corpus larger"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "x.bin").exists() and not (out / "x.idx").exists() and not is_complete(out / "x")
    with pytest.raises(DataError, match="not found; create it with"):
        _token_count(str(out / "x"))
    # The rerun is an ordinary run (the killed process above is the one under test): in this process.
    rerun = in_process(cmd[3:])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert is_complete(out / "x") and _token_count(str(out / "x")) > 0
