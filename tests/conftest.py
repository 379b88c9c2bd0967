"""Without a GPU, the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which
must be set before triton is first imported."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (end-to-end training)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_compiler_caches():
    """Each test compiles from a clean slate: many tests compile the same TrainStep.run code
    object for different steps, and together they would reach Dynamo's recompile limit, which
    fails a fullgraph compile."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
