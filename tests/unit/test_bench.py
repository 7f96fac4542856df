"""``megaspan bench``: the JSON it writes, the ratios it derives, ``--compare``, the FLOPs formula.

The end-to-end test times two placements plus ``stock`` and ``bare-loop`` for a couple of steps
on the ``cpu-small`` preset (in-process, through the CLI entry point) and checks the document's
schema and that every derived number is computed from the recorded timings. No timing is
asserted: the machine is shared.
"""

from __future__ import annotations

import json
import statistics

import pytest

from megaspan.bench import report
from megaspan.bench.flops import peak_tflops, step_flops

ROW_KEYS = {
    "model",
    "kind",
    "placement",
    "precision",
    "backend",
    "times_s",
    "step_time_s",
    "iqr_s",
    "min_s",
    "tokens_per_step",
    "tokens_per_s",
    "ratio_to_pre",
    "ratio_to_stock",
    "tflops",
    "mfu",
    "max_memory_gib",
    "num_params",
    "flops_per_step",
    "final_loss",
}


def _main(argv: list[str]) -> int:
    from megaspan.cli import COMMANDS, main

    if "bench" in COMMANDS:
        return main(argv)
    # Until the command list has it: the same parser and run() the CLI would use.
    import argparse

    from megaspan.cli import bench

    parser = argparse.ArgumentParser(prog="megaspan")
    bench.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.slow
def test_cpu_small_two_placements_plus_stock(single_process_group, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = _main(
        [
            "bench",
            "--preset",
            "cpu-small",
            "--placements",
            "pre,spannorm",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    for key in ("machine", "versions", "load_average", "device", "preset", "warmup", "repeats", "schedule"):
        assert key in meta, key
    assert meta["preset"] == "cpu-small" and meta["repeats"] == 2 and meta["schedule"] == "round-robin"
    assert set(meta["load_average"]) == {"before", "after"}
    assert meta["versions"]["megatron-core"]
    rows = {r["model"]: r for r in doc["results"]}
    assert list(rows) == ["pre", "spannorm", "stock", "bare-loop"]
    for r in rows.values():
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["step_time_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["tokens_per_step"] == 4 * 64  # global batch 4 x seq 64
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
        assert r["ratio_to_pre"] == pytest.approx(r["step_time_s"] / rows["pre"]["step_time_s"])
        assert r["ratio_to_stock"] == pytest.approx(r["step_time_s"] / rows["stock"]["step_time_s"])
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / 1e12)
        assert r["mfu"] is None and r["max_memory_gib"] is None  # CPU: no peak table, no CUDA memory
    assert rows["pre"]["ratio_to_pre"] == pytest.approx(1.0)
    assert rows["stock"]["kind"] == "stock" and rows["bare-loop"]["kind"] == "bare-loop"
    # Same TransformerConfig and seed: stock has megaspan pre's parameter count.
    assert rows["stock"]["num_params"] == rows["pre"]["num_params"] == rows["bare-loop"]["num_params"]
    # The trainer steps report a finite loss; the bare loop has none to report.
    assert rows["pre"]["final_loss"] > 0 and rows["bare-loop"]["final_loss"] is None
    printed = capsys.readouterr().out
    assert "| spannorm |" in printed and "| bare-loop |" in printed

    # --compare of a run with itself: every time ratio is 1.
    capsys.readouterr()
    assert _main(["bench", "--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("| 1.000 |") >= 4


def _row(model, kind, times, placement=None, precision="fp32"):
    return report.Row(
        model=model,
        kind=kind,
        placement=placement or ("pre" if kind != "megaspan" else model),
        precision=precision,
        backend="local",
        times_s=times,
        tokens_per_step=100,
        num_params=1,
        flops_per_step=2e12,
    )


def test_finalize_ratios_come_from_medians():
    rows = report.finalize(
        [
            _row("pre", "megaspan", [2.0, 1.0, 3.0]),
            _row("spannorm", "megaspan", [2.2, 2.2, 9.0]),
            _row("stock", "stock", [1.0, 1.0, 1.0]),
            _row("pre", "megaspan", [4.0], precision="bf16"),
        ],
        {"fp32": 4.0, "bf16": None},
    )
    pre, span, stock, pre_bf16 = rows
    assert pre.step_time_s == 2.0 and pre.iqr_s == pytest.approx(1.0)
    assert span.ratio_to_pre == pytest.approx(1.1) and span.ratio_to_stock == pytest.approx(2.2)
    assert stock.ratio_to_pre == pytest.approx(0.5)
    assert pre.tflops == pytest.approx(1.0) and pre.mfu == pytest.approx(0.25)
    # Ratios stay within one precision; no stock in bf16 -> no ratio, no peak -> no MFU.
    assert pre_bf16.ratio_to_pre == 1.0 and pre_bf16.ratio_to_stock is None and pre_bf16.mfu is None


def test_compare_of_two_different_runs(tmp_path, capsys):
    """B/A per row, each run's own vs-pre/vs-stock ratios, and rows present in one run only."""
    meta = {"load_average": [0.5, 0.5, 0.5]}
    a = report.document(
        meta,
        report.finalize(
            [
                _row("pre", "megaspan", [2.0, 2.0, 2.0]),
                _row("spannorm", "megaspan", [2.2, 2.2, 2.2]),
                _row("stock", "stock", [2.0, 2.0, 2.0]),
                _row("peri", "megaspan", [3.0]),
            ],
            {"fp32": None},
        ),
    )
    b = report.document(
        meta,
        report.finalize(
            [
                _row("pre", "megaspan", [1.0, 1.0, 1.0]),  # B twice as fast
                _row("spannorm", "megaspan", [1.5, 1.5, 1.5]),  # but SpanNorm's overhead grew
                _row("stock", "stock", [1.0, 1.0, 1.0]),
                _row("lns", "megaspan", [1.0]),
            ],
            {"fp32": None},
        ),
    )
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    capsys.readouterr()
    assert _main(["bench", "--compare", str(pa), str(pb)]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}  # fmt: skip
    # columns: precision, A ms, B ms, B/A, A vs pre, B vs pre, A vs stock, B vs stock
    assert rows["pre"] == ["fp32", "2000.0", "1000.0", "0.500", "1.000", "1.000", "1.000", "1.000"]
    assert rows["spannorm"] == ["fp32", "2200.0", "1500.0", "0.682", "1.100", "1.500", "1.100", "1.500"]
    assert rows["stock"][3] == "0.500"
    assert set(rows) == {"pre", "spannorm", "stock"}
    assert "in one run only: lns/fp32, peri/fp32" in table


def test_compare_rejects_a_file_that_is_not_a_bench_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"steps": 3}))
    with pytest.raises(report.BenchFileError, match="not a megaspan bench result"):
        report.load(bad)
    with pytest.raises(report.BenchFileError, match="does not exist"):
        report.load(tmp_path / "missing.json")


def test_step_flops_matches_megatron_formula_by_hand():
    # 1 sequence of 8 tokens, 1 layer, h=4, 2 heads (MHA), vocab 10.
    shape = dict(
        sequences=1,
        seq_length=8,
        num_layers=1,
        hidden_size=4,
        num_attention_heads=2,
        num_query_groups=None,
        kv_channels=None,
        padded_vocab_size=10,
    )
    # GeLU FFN 16, per token: 6 * [4*(4+4+4) + 4*4 + 4*8/2*2 + 2*4*16] + 6*4*10 = 6*(48+16+32+128) + 240
    expected = 8 * (6 * (48 + 16 + 32 + 128) + 240)
    assert step_flops(**shape, ffn_hidden_size=16, swiglu=False) == expected
    # MoE top-2 of expert FFN 16 with SwiGLU: the FFN term is 3 * h * (16 * 2).
    moe = step_flops(**shape, ffn_hidden_size=99, swiglu=True, moe_topk=2, moe_ffn_hidden_size=16)
    assert moe == 8 * (6 * (48 + 16 + 32 + 3 * 4 * 32) + 240)


def test_peak_table_picks_the_specific_name_first():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "fp8-delayed") == pytest.approx(1513.0)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8-tensorwise") is None
    assert peak_tflops(None, "bf16") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--placements", "nosuch"], "unknown placement 'nosuch'"),
        (["--placements", "pre,stock"], "stock and bare-loop are always timed"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["model.vocab_size=null"], "model.vocab_size must be set"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    from megaspan.cli import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megaspan: error:") and message in err and "\n" not in err


def test_fp8_without_te_is_one_line_exit_2(capsys):
    import torch

    from megaspan.cli import main
    from megaspan.models import te_available

    if torch.cuda.is_available() and te_available():
        pytest.skip("FP8 is available here")
    assert main(["bench", "--precision", "fp8-tensorwise"]) == 2
    assert "needs a CUDA GPU with Transformer Engine" in capsys.readouterr().err
