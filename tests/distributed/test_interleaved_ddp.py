"""The interleaved (virtual pipeline) schedule's DDP wiring under ``parallel.overlap_grad_reduce``.

With VP chunks, Megatron's interleaved schedule takes ``config.no_sync_func`` as a list (one per
chunk) and only the first chunk may bucket its gradients: later chunks' reductions would be
launched out of order (``megatron.training.get_model``'s rule). Both are set in
``megaspan.training.setup`` and neither shows in a loss on CPU, so they are read off the built
objects (tools/mutate.sh schedule: ``len(no_sync) == 1`` -> ``>= 1`` and ``disable_bucketing=i > 0``
-> ``i < 0`` survived every single-chunk test).
"""

from __future__ import annotations

import pytest

from tests.helpers import workers

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def test_vp_chunks_get_the_no_sync_list_and_only_the_first_chunk_buckets(dist_pool):
    first_stage, last_stage = dist_pool(2).run(workers.interleaved_ddp_wiring, timeout=300)
    assert first_stage["chunks"] == last_stage["chunks"] == 2
    assert first_stage["no_sync_is_the_chunk_list"] and last_stage["no_sync_is_the_chunk_list"]
    # Megatron turns bucketing off on every stage after the first itself; on the first stage the
    # flag megaspan passes is what separates chunk 0 (bucketed) from chunk 1.
    assert first_stage["bucketed"] == [True, False]
    assert last_stage["bucketed"] == [False, False]
