"""End to end: KVPool(backend="triton") gives DynamicCache's output (under the interpreter on CPU)."""

import os

import pytest
import torch
from helpers import pooled
from tiny_models import build, prompt

from hf_kvpool import KVPool

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter",
)


@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding"])
def test_triton_backend_generate(arch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(arch, "sdpa").to(device)
    pool = KVPool(block_size=8, backend="triton")
    ids = prompt(20, 1).to(device)
    out, _ = pooled(model, ids, pool, max_new_tokens=4)
    assert pool.stats().backend == "triton"
    ids = torch.cat([out.sequences, prompt(5, 2).to(device)], dim=1)
    _, cache = pooled(model, ids, pool, max_new_tokens=4)
    assert cache.reused_tokens == [16]
    # a left-padded batch: row 1 has 16 pad columns and is a miss, so C = 16
    other = torch.cat([torch.zeros(1, 16, dtype=torch.long), prompt(13, 3)], dim=1).to(device)
    batch = torch.cat([ids, other])
    mask = torch.ones_like(batch)
    mask[1, :16] = 0
    _, cache = pooled(model, batch, pool, max_new_tokens=3, attention_mask=mask)
    assert cache.reused_tokens == [16, 0]
