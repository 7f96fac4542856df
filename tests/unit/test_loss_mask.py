"""The training loss honours ``loss_mask``: masked tokens add nothing to the loss or the count.

Checked through the path the schedules call (``forward_step`` -> its loss function) against a
cross-entropy computed here from the model's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaspan.models import build_model
from tests.helpers.models import VOCAB, tiny_cfg

SEQ, BATCH = 16, 2


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(BATCH, SEQ)
    mask[0, SEQ // 2 :] = 0  # the second half of the first sequence is padding, say
    mask[1, :3] = 0
    return dict(
        tokens=text[:, :-1].contiguous(),
        labels=text[:, 1:].contiguous(),
        loss_mask=mask,
        position_ids=torch.arange(SEQ).expand(BATCH, -1).contiguous(),
    )


def test_masked_tokens_add_nothing_to_the_loss(mcore):
    from megaspan.training.trainer import forward_step

    model = build_model(tiny_cfg("spannorm", seq_length=SEQ), vocab_size=VOCAB).chunks[0]
    model.eval()
    batch = _batch()
    with torch.no_grad():
        output, loss_fn = forward_step(False, iter([batch]), model)
        loss, num_tokens, report = loss_fn(output)
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, v]
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none"
    )
    mask = batch["loss_mask"].reshape(-1)
    assert int(num_tokens) == int(mask.sum()) == BATCH * SEQ - SEQ // 2 - 3
    torch.testing.assert_close(loss, (per_token * mask).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        report["lm loss"], torch.stack([(per_token * mask).sum(), mask.sum()]), rtol=1e-5, atol=1e-5
    )
    # Not vacuous: the masked tokens' losses are far from zero.
    assert (per_token * (1 - mask)).sum() > 1.0
