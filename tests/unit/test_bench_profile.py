"""``megaspan bench --profile``: the normalization share comes from real profiler events."""

from __future__ import annotations

import json

import pytest
import torch

from megaspan.bench import report
from megaspan.bench.profile import (
    NORM_RANGE,
    is_norm_op,
    mark_norms,
    norm_time_from_ranges,
    profile_step,
    summarize,
)


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


class WrappedNorm(torch.nn.Module):
    """Like a placement's wrapper around Megatron's norm: must count once, not twice."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("norm_cls", [torch.nn.LayerNorm, torch.nn.RMSNorm])
def test_profiled_step_times_the_norms_forward_and_backward(tmp_path, norm_cls):
    # A step of one matmul and `times` norm applications, forward and backward. torch's RMSNorm
    # on CPU runs as pow/mean/rsqrt/mul: no op name says "norm", the module ranges still do.
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, 256, requires_grad=True)
    model = torch.nn.ModuleList([WrappedNorm(norm_cls(256))])

    def step(times):
        def run():
            h = x @ w
            for _ in range(times):
                h = model[0](h)
            h.sum().backward()

        return run

    one = profile_step(step(1), tmp_path, "one", cuda=False, modules=[model])
    many = profile_step(step(8), tmp_path, "many", cuda=False, modules=[model])
    assert (one["norm_calls"], many["norm_calls"]) == (1, 8)  # the wrapper counts once
    # Shares are timings: only their range is asserted (one < many flipped under load).
    assert 0 < one["norm_share"] < 1 and 0 < many["norm_share"] < 1
    # Backward is attributed: the norm time exceeds the forward ranges alone.
    events = []
    with torch.profiler.profile() as prof:
        handles = mark_norms([model])
        step(8)()
        for h in handles:
            h.remove()
    events = prof.events()
    forward_only = sum(e.cpu_time_total for e in events if e.name == NORM_RANGE)
    total, calls = norm_time_from_ranges(events)
    assert calls == 8 and total > forward_only > 0
    assert "aten::mm" in (tmp_path / "one.txt").read_text()
    assert json.loads((tmp_path / "one.trace.json").read_text())["traceEvents"]
    # Without module hooks the norm share comes from op names (GPU kernels).
    plain = profile_step(step(1), tmp_path, "plain", cuda=False)
    assert plain["norm_method"] == "op names"


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
