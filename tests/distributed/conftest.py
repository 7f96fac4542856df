"""Process pools shared by the whole ``tests/distributed`` package.

Overrides the root conftest's ``dist_pool``: every module here runs its jobs on the same world-1
and world-2 pools, so a full run starts each of those ranks once (~10-20 s of torch +
Megatron imports per start on a 2-core machine) instead of once per module. The modules of this
package run one after another, and the pools close when the last of them ends, so they do not
idle through the rest of the suite holding the gloo threads of earlier jobs (see the root
conftest). Each job still names its own timeout, and a failed job closes its pool (the next job
starts a fresh one), so a broken module cannot hand a wedged pool to the next one.
"""

from __future__ import annotations

import pytest

SHARED_WORLD_SIZES = (1, 2)
"""Pool sizes several modules use; a larger pool (world 4: only test_layouts) closes with the
module that started it instead of idling through the rest of the package."""


def _close(pools) -> None:
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="package")
def _package_pools():
    pools: dict = {}
    yield pools
    _close(pools)


@pytest.fixture(scope="module")
def dist_pool(_package_pools):
    """``dist_pool(world_size)`` -> a :class:`tests.helpers.harness.Pool` of that size: the
    package's for SHARED_WORLD_SIZES, this module's otherwise."""
    from tests.helpers.harness import Pool

    own: dict[int, Pool] = {}

    def get(world_size: int) -> Pool:
        pools = _package_pools if world_size in SHARED_WORLD_SIZES else own
        return pools.setdefault(world_size, Pool(world_size))

    yield get
    _close(own)
