"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter. ``TRITON_INTERPRET`` is read when a kernel
is *defined*, so it is set here, before any test module imports ``hf_kvpool.triton_kernels``.
"""

import os

import torch

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
