"""Bad input gets a clear error that names the argument and says what to do.

(tests/test_integration.py already covers a PooledCache(model) used by another model, a pool of
another kv-head layout, and a token id above the vocabulary.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import generate, pooled
from kv_encoding import batch_kv, block_bytes
from kv_encoding import chain as kv_chain
from tiny_models import build, prompt

import hf_kvpool
import hf_kvpool.hf.registry as registry
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.core.pool import LayoutMismatchError

BS = 4


@pytest.fixture
def model():
    return build("llama", "sdpa")


@pytest.mark.parametrize("block_size", [0, -4, 3, 12, 24, 2048, 1.5, "16", None])
def test_block_size_not_a_power_of_two_or_out_of_range(block_size):
    with pytest.raises(
        ValueError, match=r"block_size must be a power of two between 1 and 1024, got .*16 is a good default"
    ):
        KVPool(block_size=block_size)


@pytest.mark.parametrize("block_size", [1, 2, 8, 1024])
def test_block_size_powers_of_two_are_accepted(block_size):
    assert KVPool(block_size=block_size).block_size == block_size


def test_triton_block_size_range():
    with pytest.raises(ValueError, match="the triton backend takes block_size 8-128, got 4"):
        KVPool(block_size=4, backend="triton")


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\)"):
        KVPool(backend=backend)


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "1GB", 2.0**30])
def test_capacity_not_a_positive_int(capacity):
    with pytest.raises(ValueError, match=r"capacity_bytes must be a positive int \(bytes\) or None"):
        KVPool(capacity_bytes=capacity)


@pytest.mark.parametrize("capacity", [-5, 1.5, "1GB"])
def test_host_capacity_not_a_positive_int(capacity):
    with pytest.raises(ValueError, match="host_capacity_bytes must be a positive int"):
        KVPool(host_capacity_bytes=capacity)
    assert KVPool(host_capacity_bytes=0).stats().host_stored_blocks == 0  # 0: no host tier


def test_capacity_smaller_than_one_block_at_the_pool():
    """The block size in bytes is known at the first commit: the error names both numbers and the fix."""
    pool = KVPool(block_size=2, capacity_bytes=100, backend="torch")
    tokens = [0, 1, 2, 3]
    with pytest.raises(
        ValueError,
        match=rf"capacity_bytes=100 is smaller than one block: a block of 2 tokens takes {block_bytes(2)} bytes "
        r"for this model; raise capacity_bytes or lower block_size",
    ):
        pool.commit(kv_chain(0, tokens, 2), 0, batch_kv(0, [tokens], [0]), 0, 0)
    assert pool._device is None  # nothing half-built


def test_capacity_smaller_than_one_block_through_generate(model, monkeypatch):
    monkeypatch.setattr(registry, "_warned", set())
    pool = KVPool(block_size=BS, capacity_bytes=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="capacity_bytes=1000 is smaller than one block"):
            generate(model, prompt(12, 1), PooledCache(model, pool=pool))


def test_capacity_of_one_block_works(model):
    pool = KVPool(block_size=BS, capacity_bytes=2 * 2 * 2 * BS * 16 * 4)
    pooled(model, prompt(12, 1), pool)
    _, cache = pooled(model, prompt(12, 1), pool)
    assert pool.stats().capacity_blocks == 1 and cache.reused_tokens == [4]  # the one block it holds
    pool._device.manager.check()


@pytest.mark.parametrize("salt", [5, 1.0, ["a"], object()])
def test_salt_of_a_wrong_type(model, salt):
    with pytest.raises(TypeError, match="salt must be a str or bytes, got"):
        PooledCache(model, salt=salt)


def test_enable_needs_a_module():
    with pytest.raises(
        TypeError, match=r"enable\(\) takes a torch.nn.Module \(a transformers model\), got str"
    ):
        hf_kvpool.enable("meta-llama/Llama-3-8B")


def test_cache_bound_by_use_refuses_another_model(model):
    """A bare PooledCache() binds to the first enabled model that uses it; another model gets an error
    that says what to do."""
    other = build("llama", "sdpa", seed=4)
    hf_kvpool.enable(model)
    hf_kvpool.enable(other)
    cache = PooledCache()
    generate(model, prompt(10, 2), cache, max_new_tokens=2)
    assert cache.model is model
    with pytest.raises(
        ValueError, match=r"bound to another model \(LlamaForCausalLM at 0x.*create one PooledCache per model"
    ):
        generate(other, prompt(10, 2), cache, max_new_tokens=2)
    generate(model, prompt(10, 3), cache, max_new_tokens=2)  # still fine for its own model


def test_pool_of_another_dtype_is_refused(model):
    """A pool filled by an fp32 model, used by a bf16 copy: a clear error, and the pool is intact."""
    pool = KVPool(block_size=BS)
    ids = prompt(20, 4)
    pooled(model, ids, pool)
    stored = pool.stats().stored_blocks
    half = build("llama", "sdpa").to(torch.bfloat16)
    with pytest.raises(
        LayoutMismatchError, match=r"another layout .*float32.*bfloat16.*Give this model its own pool"
    ):
        generate(half, ids, PooledCache(half, pool=pool))
    assert isinstance(LayoutMismatchError("x"), ValueError)
    assert pool.stats().stored_blocks == stored
    pool._device.manager.check()
    _, cache = pooled(model, ids, pool)  # the fp32 model still reuses its blocks
    assert cache.reused_tokens == [19]
    # and the advice works: the bf16 model with its own pool
    out = generate(half, ids, PooledCache(half, pool=KVPool(block_size=BS)))
    assert out.sequences.shape == (1, 28)


def test_model_cast_in_place_after_filling_its_pool(model):
    """model.to(bfloat16) after its pool holds fp32 K/V: refused with the same advice, never mixed."""
    pool = KVPool(block_size=BS)
    hf_kvpool.enable(model, pool=pool)
    ids = prompt(20, 5)
    pooled(model, ids, pool)
    model.to(torch.bfloat16)
    with pytest.raises(LayoutMismatchError, match="Give this model its own pool"):
        generate(model, ids, PooledCache(model))
    assert all(b.pins == 0 for b in pool._device.manager.blocks())


@pytest.mark.parametrize("bad", [-1, 128, 10**6])
def test_token_ids_out_of_range(model, bad):
    ids = prompt(10, 6, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded: what its pad columns hold is not checked
    ids[0, :3] = 0
    ids[1, 5] = bad
    with pytest.raises(
        ValueError,
        match=rf"input_ids row 1 holds token id {bad}, outside this model's vocabulary \[0, 128\); check that the tokenizer matches the model",
    ):
        generate(model, ids, PooledCache(model), attention_mask=mask)
