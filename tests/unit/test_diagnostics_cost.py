"""What diagnostics cost on a large model (issue 17.12): no host sync per layer or parameter, and
no fp32 copy of the weights kept beside them.

On a GPU every read of a device value to the host (``.item()``/``float(t)``, i.e. aten's
``_local_scalar_dense``, and ``.tolist()``) stalls the stream. A CPU run cannot show a stall, but it
can count those reads on a real model: the count is the same on either device. The old code read
one value per parameter (gradient norms, update ratios) and four per layer (activations), so its
count grew with the model; now it is one read per phase whatever the depth.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megaspan.models import build_model
from megaspan.runtime import device
from megaspan.training.diagnostics import LayerDiagnostics
from tests.helpers.models import stack_cfg


class HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense (``.item()``, ``float(t)``, ``bool(t)``): a host sync each on
    a GPU. ``tolist`` does not dispatch; it is counted by :func:`count_tolist`."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_tolist(monkeypatch):
    counter = {"n": 0}
    original = torch.Tensor.tolist

    def tolist(self):
        counter["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return counter


def _model(layers: int, extra=()):
    cfg = stack_cfg("spannorm", extra=(f"model.num_layers={layers}", *extra))
    return build_model(cfg, vocab_size=64).chunks


def _step(chunks, layers: int, armed: bool, count_tolist):
    """Forward + backward (+ collect, snapshot, an update, ratios when armed); returns the host
    reads of the diagnostics' part: the hooks inside the forward and the three phases."""
    diag = LayerDiagnostics(chunks, layers, interval=1 if armed else 1000)
    diag.arm(2)  # step 1 is always armed
    model = chunks[0]
    model.train()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    count_tolist["n"] = 0
    with HostReads() as reads:
        loss = model(tokens, pos, None, labels=tokens).mean()
        loss.backward()
        if armed:
            diag.collect(device())
            diag.snapshot_weights()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.01)
            diag.update_ratios(device())
    return reads.count + count_tolist["n"], diag


@pytest.mark.parametrize("layers", [2, 4])
def test_one_host_read_per_phase_whatever_the_depth(mcore, count_tolist, layers):
    chunks = _model(layers)
    baseline, _ = _step(chunks, layers, armed=False, count_tolist=count_tolist)  # the model's own
    reads, diag = _step(chunks, layers, armed=True, count_tolist=count_tolist)
    # collect() and update_ratios() read one flat tensor each; the forward hooks none. Before:
    # 4 per layer + 1 per attention/MLP parameter + 2 per weight matrix (52 for 2 layers, 104 for 4).
    assert reads - baseline == 2, (layers, reads, baseline)
    assert all(math.isfinite(diag.record[n]["attn_update_ratio"]) for n in range(1, layers + 1))


def test_snapshot_is_in_the_weights_dtype_off_the_device(mcore):
    """bf16 weights: the snapshot is a bf16 host copy (before: an fp32 clone on the model's device,
    twice the weights' memory there), and the ratio is still exact."""
    chunks = _model(4, extra=("precision.dtype=bf16",))
    diag = LayerDiagnostics(chunks, 4, interval=1)
    weights = {
        id(p): p for layer in diag.layers for n, p in layer.named_parameters() if p.dim() >= 2 and "." in n
    }
    assert {p.dtype for p in weights.values()} == {torch.bfloat16}
    diag.snapshot_weights()
    assert diag._before and set(diag._before) <= set(weights)
    for key, snap in diag._before.items():
        assert snap.dtype == torch.bfloat16 and snap.device.type == "cpu"
        assert snap.data_ptr() != weights[key].data_ptr()  # a copy, not a view of the weight
    before = {k: p.detach().clone() for k, p in weights.items()}
    with torch.no_grad():
        for p in weights.values():
            p.add_(0.01)
    values = diag.update_ratios(device())
    for layer in diag.layers:
        n = layer.layer_number
        keys = [id(p) for name, p in layer.named_parameters() if name.startswith("mlp.") and p.dim() >= 2]
        delta = math.sqrt(sum(float((weights[k].double() - before[k].double()).pow(2).sum()) for k in keys))
        weight = math.sqrt(sum(float(before[k].double().pow(2).sum()) for k in keys))
        assert values[f"diag/update_mlp/layer_{n:03d}"] == pytest.approx(delta / weight, rel=1e-4)
