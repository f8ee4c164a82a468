"""A reused PooledCache continues from the buffers it held (``hf/live.py``): same outputs as
DynamicCache, no copy out of the pool, never across namespaces, fine under eviction and threads."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import assert_same, generate, pooled, reference
from tiny_models import build, prompt

from hf_kvpool import KVPool, PooledCache

BS = 4


@pytest.fixture(scope="module")
def model():
    return build("llama")


def _kbuf(cache):
    return cache.layers[0]._kbuf.data_ptr()


def _turns(model, pool, cache, n_turns=3, seed=0, new=9, answer=5):
    """An agent loop on one cache: each prompt is the last prompt + its answer + new tokens."""
    ids = prompt(21, seed)
    results = []
    for turn in range(n_turns):
        out, _ = pooled(model, ids, pool, cache=cache, max_new_tokens=answer)
        results.append((ids.shape[1], cache.reused_tokens[0], _kbuf(cache)))
        ids = torch.cat([out.sequences, prompt(new, seed + 100 + turn)], dim=1)
    return results


def test_continues_from_held_buffers(model, one_thread):
    pool = KVPool(block_size=BS)
    cache = PooledCache(model, pool=pool)
    results = _turns(model, pool, cache)
    for (length, _, ptr), (_, reused, next_ptr) in zip(results, results[1:]):
        assert reused == length + 5 - 1  # the whole previous prompt and answer but its last token
        assert next_ptr == ptr  # the same buffers: nothing gathered out of the pool
    stats = pool.stats()
    assert stats.hit_tokens == sum(r for _, r, _ in results)


def test_diverging_prompt_recomputes_from_the_difference(model, one_thread):
    pool = KVPool(block_size=BS)
    cache = PooledCache(model, pool=pool)
    ids = prompt(30, 1)
    pooled(model, ids, pool, cache=cache)
    edited = ids.clone()
    edited[0, 17] = (edited[0, 17] + 1) % 100 + 3
    pooled(model, edited, pool, cache=cache)
    assert cache.reused_tokens == [17]


def test_evicted_blocks_are_committed_again(model, one_thread):
    pool = KVPool(block_size=BS, capacity_bytes=20 * 2 * 2 * 2 * BS * 16 * 4)  # 20 blocks
    cache = PooledCache(model, pool=pool)
    ids = prompt(41, 2)
    out, _ = pooled(model, ids, pool, cache=cache, max_new_tokens=3)
    pooled(model, prompt(70, 3), pool)  # another session evicts this one's blocks
    follow = torch.cat([out.sequences, prompt(6, 4)], dim=1)
    chain_has = pool.reusable_tokens(
        [pool.chains.chain(follow[0].numpy(), BS, cache._call.tracker.namespace)]
    )[0]
    assert chain_has < 40
    pooled(model, follow, pool, cache=cache, max_new_tokens=3)
    assert cache.reused_tokens == [43]
    namespace = cache._call.tracker.namespace
    assert pool.reusable_tokens([pool.chains.chain(follow[0].numpy(), BS, namespace)])[0] == 48
    pool._device.manager.check()


def test_other_namespace_is_never_served(model, one_thread):
    pool = KVPool(block_size=BS)
    cache = PooledCache(model, pool=pool, salt="a")
    ids = prompt(25, 5)
    out, _ = pooled(model, ids, pool, cache=cache)
    cache._salt = "b"  # the same cache object, now another tenant
    pooled(model, torch.cat([out.sequences, prompt(5, 6)], dim=1), pool, cache=cache)
    assert cache.reused_tokens == [0]


def test_rearranged_cache_is_not_continued(model, one_thread):
    pool = KVPool(block_size=BS)
    cache = PooledCache(model, pool=pool)
    ids = prompt(25, 7)
    out, _ = pooled(model, ids, pool, cache=cache)
    cache.crop(-3)  # the caller changed what the cache holds: tracking ended
    follow = torch.cat([out.sequences, prompt(5, 8)], dim=1)
    ptr = _kbuf(cache)
    pooled(model, follow, pool, cache=cache)
    assert cache.reused_tokens == [32]  # from the pool: 25 + 8 - 1 tokens were committed
    assert _kbuf(cache) != ptr


def test_threads_each_continue_their_own_cache(model, one_thread):
    pool = KVPool(block_size=BS)
    outputs: dict[int, list] = {}
    errors = []

    def session(k: int) -> None:
        try:
            cache = PooledCache(model, pool=pool)
            ids = prompt(17 + k, 10 + k)
            seen = []
            for turn in range(3):
                out = generate(model, ids, cache, max_new_tokens=4)
                seen.append((ids, out, cache.reused_tokens[0]))
                ids = torch.cat([out.sequences, prompt(6, 20 + 3 * k + turn)], dim=1)
            outputs[k] = seen
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seen in outputs.values():
        for turn, (ids, out, reused) in enumerate(seen):
            assert_same(reference(model, ids, max_new_tokens=4), out)
            if turn:
                assert reused == seen[turn - 1][0].shape[1] + 3


def test_a_dropped_cache_frees_its_buffers_at_once(model, one_thread):
    import weakref

    cache = PooledCache(model, pool=KVPool(block_size=BS))
    generate(model, prompt(30, 9), cache, max_new_tokens=3)
    buffer = weakref.ref(cache.layers[0]._kbuf)
    del cache  # no reference cycle: freed without waiting for the garbage collector
    assert buffer() is None
