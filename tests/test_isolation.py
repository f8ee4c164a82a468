"""Isolation: K/V of one salt, model or set of weights is never served to another.

tests/test_integration.py already shows that two salts, two models and a model before/after an
optimizer step, ``load_state_dict`` or a ``.data`` write share nothing. This adds the pool-level
view (same tokens under two salts are two distinct blocks, each serving its own K/V), partial
overlaps across salts, in-place weight edits under ``no_grad`` end to end, and copies of a model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import pooled
from kv_encoding import batch_kv, check_fetched
from kv_encoding import chain as kv_chain
from tiny_models import build, prompt

import hf_kvpool
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.core.hashing import block_hashes, namespace_key
from hf_kvpool.hf.enable import model_state

BS = 4


@pytest.fixture
def model():
    return build("llama", "sdpa")


def test_same_tokens_under_two_salts_are_distinct_blocks():
    """Pool level: one prompt committed under two namespaces takes two sets of blocks, and each
    namespace's lookup gets its own K/V back (values encode the namespace)."""
    pool = KVPool(block_size=2, backend="torch")
    tokens = [0, 1, 2, 3, 0, 1, 2, 3]
    for ns in (0, 1):
        written = pool.commit(kv_chain(ns, tokens, 2), 0, batch_kv(ns, [tokens], [0]), 0, 0)
        assert written == 4
    assert pool.stats().stored_blocks == 8
    ids = [pool._device.manager.match(kv_chain(ns, tokens, 2), pin=False) for ns in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 4 and not set(ids[0]) & set(ids[1])
    for ns in (0, 1):
        fetched = pool.fetch([kv_chain(ns, tokens, 2)], [0], len(tokens), len(tokens) - 1)
        assert fetched.columns == 7
        check_fetched(fetched, [ns], [tokens], [0])
    pool._device.manager.check()


def test_salt_namespaces_differ_for_every_salt_and_model():
    digest = b"d" * 16
    salts = ["a", "b", "alice", "bob", "tenant-1", "tenant-10", b"\x00", "a\x00"]
    spaces = {namespace_key(digest, s) for s in salts}
    assert len(spaces) == len(salts)
    assert namespace_key(b"e" * 16, "a") != namespace_key(digest, "a")
    tokens = list(range(8))
    keys = {k for s in salts for k, _ in block_hashes(tokens, 4, namespace_key(digest, s))}
    assert len(keys) == 2 * len(salts)


def test_salt_partial_overlap_shares_nothing(model):
    """A salted cache reports no reuse for a prompt that only another salt (or no salt) has seen,
    even when it shares just a prefix of it; its own salt's prompts it reuses."""
    pool = KVPool(block_size=BS)
    base = prompt(24, 1)
    pooled(model, base, cache=PooledCache(model, pool=pool, salt="alice"))
    pooled(model, base, cache=PooledCache(model, pool=pool))  # unsalted
    stored = pool.stats().stored_blocks
    ext = torch.cat([base[:, :18], prompt(6, 2)], dim=1)
    _, cache = pooled(model, ext, cache=PooledCache(model, pool=pool, salt="bob"))
    assert cache.reused_tokens == [0]
    _, cache = pooled(model, base, cache=PooledCache(model, pool=pool, salt=b"carol"))
    assert cache.reused_tokens == [0]
    assert pool.stats().stored_blocks > stored  # bob and carol stored their own blocks
    _, cache = pooled(model, ext, cache=PooledCache(model, pool=pool, salt="alice"))
    assert cache.reused_tokens == [16]
    _, cache = pooled(model, ext, cache=PooledCache(model, pool=pool, salt="bob"))
    assert cache.reused_tokens == [23]
    pool._device.manager.check()


def test_empty_salt_is_not_the_unsalted_namespace(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 3)
    pooled(model, ids, cache=PooledCache(model, pool=pool))
    _, cache = pooled(model, ids, cache=PooledCache(model, pool=pool, salt=""))
    assert cache.reused_tokens == [0]


def test_in_place_weight_edit_under_no_grad_is_not_served_stale(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 4)
    pooled(model, ids, pool)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(1.5)
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [0]
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)  # a layer after every K/V: the K/V are the same, the key is not
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [0]
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [19]


def test_models_with_equal_weights_share_and_others_do_not():
    """Content fingerprints: a model rebuilt with the same weights shares the pool; a different seed,
    a different config value or a different attention implementation does not."""
    pool = KVPool(block_size=BS)
    ids = prompt(20, 5)
    pooled(build("llama", "sdpa"), ids, pool)
    _, cache = pooled(build("llama", "sdpa"), ids, pool)
    assert cache.reused_tokens == [19]
    for other in (
        build("llama", "sdpa", seed=1),
        build("llama", "sdpa", rope_theta=5000.0),
        build("llama", "eager"),
    ):
        _, cache = pooled(other, ids, pool)
        assert cache.reused_tokens == [0]


def test_deepcopy_of_an_enabled_model_gets_one_set_of_hooks(model, monkeypatch):
    import hf_kvpool.hf.registry as registry

    monkeypatch.setattr(registry, "_warned", set())
    pool = KVPool(block_size=BS)
    pooled(model, prompt(12, 6), pool)  # model is enabled
    twin = copy.deepcopy(model)
    hf_kvpool.enable(twin, pool=pool)
    assert model_state(twin).pool is pool
    ids = prompt(20, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "writing to the pool failed"
        pooled(twin, ids, pool)
    # prompt and generated tokens (20 + 8 - 1) were committed: 6 blocks, as for any enabled model
    assert pool.stats().stored_blocks == 4 + 6
    assert len(twin._forward_pre_hooks) == 1 and len(twin._forward_hooks) == 1
