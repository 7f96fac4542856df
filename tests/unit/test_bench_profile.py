"""``megaspan bench --profile``: the normalization share comes from real profiler events."""

from __future__ import annotations

import json

import torch

from megaspan.bench import report
from megaspan.bench.profile import is_norm_op, profile_step, summarize


def test_norm_ops_are_recognised_forward_and_backward():
    for name in (
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::_fused_rms_norm",
        "NativeLayerNormBackward0",
        "FusedRMSNormAffineFunction",
        "te::layernorm_fwd",
    ):
        assert is_norm_op(name), name
    for name in ("aten::mm", "aten::softmax", "aten::norm", "aten::linalg_vector_norm"):
        assert not is_norm_op(name), name


def test_summary_share_and_top_ops():
    s = summarize([("aten::mm", 600.0), ("aten::native_layer_norm", 150.0), ("aten::add", 250.0)])
    assert s["norm_share"] == 0.15 and s["self_time_ms"] == 1.0
    assert [op["op"] for op in s["top_ops"]] == ["aten::mm", "aten::add", "aten::native_layer_norm"]
    assert summarize([])["norm_share"] is None


def test_profiled_step_writes_table_trace_and_a_norm_share(tmp_path):
    # A step whose only work is a matmul and a LayerNorm, forward and backward: the share is
    # strictly between 0 and 1, and it grows when the norm is applied more times.
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, 256, requires_grad=True)
    norm = torch.nn.LayerNorm(256)

    def step(times):
        def run():
            h = x @ w
            for _ in range(times):
                h = norm(h)
            h.sum().backward()

        return run

    one = profile_step(step(1), tmp_path, "one", cuda=False)
    many = profile_step(step(8), tmp_path, "many", cuda=False)
    assert 0 < one["norm_share"] < 1 and many["norm_share"] > one["norm_share"]
    assert "native_layer_norm" in (tmp_path / "one.txt").read_text()
    assert json.loads((tmp_path / "one.trace.json").read_text())["traceEvents"]


def _doc(profile_share):
    row = report.Row("pre", "megaspan", "pre", "fp32", "local", [1.0, 1.2], 100, 10, 1e9)
    if profile_share is not None:
        row.extra["profile"] = {"norm_share": profile_share}
    report.finalize([row], {"fp32": None})
    return report.document({"preset": "cpu"}, [row])


def test_markdown_has_a_norm_share_column_only_when_profiled():
    plain = report.markdown(_doc(None))
    assert "norm share" not in plain
    profiled = report.markdown(_doc(0.042)).splitlines()
    assert profiled[2].endswith("norm share |") and profiled[-1].endswith("| 4.2% |")
    assert profiled[2].count("|") == profiled[-1].count("|")
