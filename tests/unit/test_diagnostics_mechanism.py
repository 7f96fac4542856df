"""The mechanism metrics (issue 18.3) against a direct plain-PyTorch computation on the same model:
max attention logit and attention entropy per layer (tests/unit/reference.py's attention, from the
weights), the LM head's mean log Z, the relative model update on the probe batch, and the
gradient profile at initialisation (step 1, always armed) in summary.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megaspan.models import build_model
from megaspan.runtime import device
from megaspan.training.build import build_trainer
from megaspan.training.diagnostics import LayerDiagnostics
from tests.distributed import layout_workers as lw
from tests.helpers.models import NUM_LAYERS as L
from tests.helpers.models import stack_cfg
from tests.unit import reference

TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
POS = torch.arange(8).unsqueeze(0).expand(2, -1)


def _armed_step(cfg, attn_inputs: dict):
    built = build_model(cfg, vocab_size=64)
    model = built.chunks[0]
    diag = LayerDiagnostics(built.chunks, L, interval=1)

    def keep(n):
        def hook(module, args, kwargs) -> None:  # returns None: the input is left alone
            x = kwargs.get("hidden_states", args[0] if args else None)
            attn_inputs.setdefault(n, x.detach().clone())

        return hook

    for layer in diag.layers:
        layer.self_attention.register_forward_pre_hook(keep(layer.layer_number), with_kwargs=True)
    assert diag.arm(1)
    model.train()
    model(TOKENS, POS, None, labels=TOKENS).mean().backward()
    values = diag.collect(device())
    return model, diag, values


@pytest.mark.parametrize("placement", ["pre", "post", "hybridnorm"])
def test_attention_max_logit_and_entropy_match_reference(mcore, placement):
    cfg = stack_cfg(placement)
    inputs = {}
    _, diag, values = _armed_step(cfg, inputs)
    m = cfg.model
    qkv_norm = placement == "hybridnorm"
    for layer in diag.layers:
        n = layer.layer_number
        with torch.no_grad():
            _, logits, probs = reference.causal_attention(
                layer,
                inputs[n],
                m.normalization,
                m.layernorm_epsilon,
                qk_norm=qkv_norm,
                v_norm=qkv_norm,
                stats=True,
            )
        top, entropy = reference.attention_max_logit_and_entropy(logits, probs)
        assert diag.record[n]["attn_max_logit"] == pytest.approx(top, rel=1e-5, abs=1e-6), n
        assert diag.record[n]["attn_entropy"] == pytest.approx(entropy, rel=1e-5), n
        assert values[f"diag/attn_max_logit/layer_{n:03d}"] == diag.record[n]["attn_max_logit"]
        assert values[f"diag/attn_entropy/layer_{n:03d}"] == diag.record[n]["attn_entropy"]
        assert 0 < entropy < math.log(8)  # causal over 8 positions: neither one-hot nor uniform


def test_lm_head_log_z_matches_reference(mcore):
    model, diag, values = _armed_step(stack_cfg("pre"), {})
    model.eval()  # dropout is 0: the same logits as the training forward
    with torch.no_grad():
        logits = model(TOKENS, POS, None)  # [b, s, V]
    want = float(reference.log_z(logits).mean())
    assert diag.model_record["lm_head_log_z"] == pytest.approx(want, rel=1e-6)
    assert values["diag/lm_head_log_z"] == diag.model_record["lm_head_log_z"]
    assert want > math.log(64) - 1  # near log V at init: the check is not vacuous


def _final_hidden(chunk, batch) -> torch.Tensor:
    """The LM head's input on ``batch`` (eval mode), read from the decoder's output."""
    seen = []
    handle = chunk.decoder.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    chunk.eval()
    try:
        with torch.no_grad():
            chunk(batch["tokens"], batch["position_ids"], None)
    finally:
        handle.remove()
        chunk.train()
    return seen[0]


def test_trainer_records_relative_update_and_init_gradient_profile(single_process_group, tmp_path):
    steps = 4
    cfg = lw.layout_config(
        "post", False, "tp1", str(tmp_path / "run"), steps=steps, extra=("logging.diagnostics_interval=3",)
    )
    datasets = (
        lw.synthetic_dataset(steps * lw.GLOBAL_BATCH, seed=1),
        lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, seed=2),
    )
    trainer = build_trainer(cfg, datasets=datasets, vocab_size=lw.VOCAB)
    chunk = trainer.objs.chunks[0]
    theta_0 = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    probe_iter = trainer.iterators(trainer.valid_ds, 0)[0]
    probe = next(probe_iter)  # the probe: the first validation micro-batch of DP rank 0
    getattr(probe_iter, "close", lambda: None)()
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    f_t = _final_hidden(chunk, probe)
    with torch.no_grad():
        for n, p in chunk.named_parameters():
            p.copy_(theta_0[n])
    f_0 = _final_hidden(chunk, probe)
    want = reference.relative_update(f_t, f_0)

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]  # step 1 always, then every 3rd
    summary = json.loads((run / "summary.json").read_text())["diagnostics"]
    assert sorted(summary["relative_update"], key=int) == ["1", "2", "3", "4"]  # 1, 2, 4 and armed 3
    assert summary["relative_update"]["4"] == pytest.approx(want, rel=1e-5)
    assert 0 < summary["relative_update"]["1"] < summary["relative_update"]["4"]
    assert records[1]["model"]["relative_update"] == summary["relative_update"]["3"]
    # Xiong et al.'s profile: step 1's per-layer gradient norms, as its diagnostics row has them.
    init = summary["init_grad_profile"]
    for key in ("attn_grad_norm", "mlp_grad_norm"):
        assert init[key] == [records[0]["layers"][str(n)][key] for n in range(1, L + 1)]
        assert all(v > 0 for v in init[key])
    last = records[-1]
    assert summary["step"] == 3 and summary["lm_head_log_z"] == last["model"]["lm_head_log_z"]
    assert summary["attn_max_logit"] == [last["layers"][str(n)]["attn_max_logit"] for n in range(1, L + 1)]
    tops = [r["layers"][str(n)]["attn_max_logit"] for r in records for n in range(1, L + 1)]
    assert summary["max_attn_logit"] == max(tops)
