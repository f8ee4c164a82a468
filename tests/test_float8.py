"""float8 K/V reuse end to end, with real ``torch.float8_e4m3fn`` tensors, on both copy paths (torch;
Triton, under the interpreter on CPU).

The storage of a float8 stream is float8; the torch scatter moves it as int8 bytes (``index_copy_``
lacks float8 on CPU), the Triton kernels as integer views. A tiny GPT-2 whose ``c_attn`` emits float8
puts float8 K/V in the cache (an attention function upcasts them to compute), so ``generate()``
commits and reuses float8 blocks; the suite's strict mode makes a failed commit fail the test.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import pooled
from transformers import AttentionInterface, AttentionMaskInterface, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from hf_kvpool import KVPool
from hf_kvpool.core.hashing import block_hashes, namespace_key

F8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(F8 is None, reason="this torch has no float8_e4m3fn")

VOCAB = 64
BS = 8


def _backends():
    out = ["torch"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return out
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    return out


def _fp8_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the float8 query/K/V, upcast (the cache holds the float8 tensors)."""
    return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


class Float8Out(torch.nn.Module):
    """Wraps GPT-2's ``c_attn``: its q, k, v come out as float8."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(F8)


@pytest.fixture(scope="module")
def model():
    AttentionInterface.register("fp8_kv", _fp8_attention)
    AttentionMaskInterface.register("fp8_kv", sdpa_mask)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=None
    )
    config._attn_implementation = "fp8_kv"
    m = GPT2LMHeadModel(config).eval()
    for block in m.transformer.h:
        block.attn.c_attn = Float8Out(block.attn.c_attn)
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    return m


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (1, n), generator=g)


@pytest.mark.parametrize("backend", _backends())
def test_float8_kv_reuse_through_generate(model, backend):
    pool = KVPool(block_size=BS, backend=backend, capacity_bytes=1 << 20)
    ids = _ids(30, 1)
    out, cache = pooled(model, ids, pool, max_new_tokens=5)
    assert cache.reused_tokens == [0]
    specs, _ = pool.layout
    assert {s.dtype for s in specs} == {F8}  # the pool holds float8 blocks
    assert pool.stats().backend == backend
    assert pool.stats().stored_blocks == (30 + 5 - 1) // BS  # prompt and decode blocks committed
    # the next turn extends the last output: every full block of it is reused, the output unchanged
    ids = torch.cat([out.sequences, _ids(6, 2)], dim=1)
    _, cache = pooled(model, ids, pool, max_new_tokens=5)
    assert cache.reused_tokens == [32]


@pytest.mark.parametrize("backend", _backends())
def test_float8_streams_round_trip_bit_exact(backend):
    """Pool level: float8 streams committed from a padded batch come back bit for bit."""
    pool = KVPool(block_size=BS, backend=backend, capacity_bytes=1 << 20)
    namespace = namespace_key("fp8")
    rows = [list(range(1, 25)), list(range(40, 56))]
    pads = [0, 8]
    g = torch.Generator().manual_seed(0)
    # keys [B, H, S, D] and values of another head size: two storage groups
    streams = [
        (torch.randn(2, 2, 24, 16, generator=g) * 4).to(F8),
        (torch.randn(2, 1, 24, 8, generator=g) * 4).to(F8),
    ]
    chains = [block_hashes(r, BS, namespace) for r in rows]
    for b, (chain, pad) in enumerate(zip(chains, pads)):
        assert pool.commit(chain, 0, streams, b, pad, namespace) == len(chain)
    fetched = pool.fetch(chains, pads, 40, 24, namespace)
    assert fetched.columns == 24
    for got, want in zip(fetched.streams, streams):
        assert got.dtype == F8
        for b, pad in enumerate(pads):
            # compare bytes: float8 has no == on every build, and NaN codes would compare unequal
            assert torch.equal(got[b, :, pad:24].view(torch.uint8), want[b, :, pad:24].view(torch.uint8))
            assert torch.count_nonzero(got[b, :, :pad].view(torch.uint8)) == 0
