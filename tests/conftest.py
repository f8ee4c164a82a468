"""Shared test set-up.

``scripts/`` is importable (workloads, the redis-server helper). Without a GPU, Triton kernels run under the interpreter. ``TRITON_INTERPRET`` is read when a kernel
is *defined*, so it is set here, before any test module imports ``hf_kvpool.triton_kernels``.
"""

import os
import sys
from pathlib import Path

import torch

# benchmark workloads and the private redis-server helper live in scripts/ (not in the library)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Tiny models on this machine's 2 shared cores: several torch threads only contend (10-40x
    slower measured); tests that loop over tiny models use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # scripts/check_wheel.sh runs tests against an installed wheel: make sure that is what they import
    installed_in = os.environ.get("HF_KVPOOL_INSTALLED_IN")
    if installed_in:
        import hf_kvpool

        where = os.path.realpath(hf_kvpool.__file__)
        assert where.startswith(os.path.realpath(installed_in)), f"hf_kvpool imported from {where}"
