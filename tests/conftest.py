import os

import pytest

# Two cores: keep intra-op threading small so multi-process tests do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _cuda_and_te() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _cuda_and_te():
        return
    skip = pytest.mark.skip(reason="needs CUDA and Transformer Engine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_process_group():
    """A world-size-1 gloo group in the pytest process (CPU patches applied)."""
    from megaspan.runtime import init_process_group

    init_process_group()
    yield


@pytest.fixture
def mcore(single_process_group):
    """Fresh Megatron model-parallel state (TP=PP=EP=1) seeded identically for each test."""
    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    yield
