"""PooledCache gives what DynamicCache gives: greedy tokens identical, logits within tolerance.

Every case runs on every tiny architecture (Llama, Qwen2, Mistral, Phi3, GPT-NeoX, and two with
sliding-window layers), with sdpa and eager attention.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same, generate, pooled, reference
from tiny_models import ARCHS, attn_supported, build, prompt

from hf_kvpool import KVPool, PooledCache

BS = 4
CASES = [(a, attn) for a in ARCHS for attn in ("sdpa", "eager") if attn_supported(a, attn)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{b}" for a, b in CASES])
def model(request):
    arch, attn = request.param
    return build(arch, attn)


@pytest.fixture
def pool():
    return KVPool(block_size=BS)


def test_full_miss(model, pool):
    out, cache = pooled(model, prompt(23, 1), pool)
    assert cache.reused_tokens == [0]
    stats = pool.stats()
    assert stats.hit_tokens == 0 and stats.query_tokens == 23
    # prompt + generated tokens minus the last one are in the cache; their full blocks were committed
    assert stats.stored_blocks == (23 + 8 - 1) // BS


def test_partial_hit(model, pool):
    base = prompt(30, 2)
    pooled(model, base, pool)
    ids = torch.cat([base[:, :22], prompt(9, 3)], dim=1)  # shares 22 tokens: 5 full blocks
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [20]


def test_whole_prompt_cached_still_computes_last_token(model, pool):
    ids = prompt(24, 4)
    pooled(model, ids, pool)
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [23]  # capped at L - 1


def test_left_padded_batch_mixed_hits(model, pool):
    warm = prompt(40, 5)
    pooled(model, warm, pool)
    short = prompt(10, 6)
    ids = torch.cat([warm[:, :40], torch.cat([torch.zeros(1, 30, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    _, cache = pooled(model, ids, pool, attention_mask=mask)
    # C = min(0 + 39, 30 + 0) = 30 columns: row 0 reuses 30 tokens, row 1 (a miss) none
    assert cache.reused_tokens == [30, 0]
    # and the short row's blocks are now pooled too: alone, it hits
    _, cache = pooled(model, short, pool)
    assert cache.reused_tokens == [8]  # its 2 full blocks


def test_sampling_fixed_seed(model, pool):
    ids = prompt(26, 7)
    pooled(model, ids, pool, do_sample=True, top_k=20, seed=3)
    _, cache = pooled(model, ids, pool, do_sample=True, top_k=20, seed=3)
    assert cache.reused_tokens == [24]


def test_beam_search(model, pool):
    ids = prompt(26, 8)
    pooled(model, ids, pool, num_beams=3)
    _, cache = pooled(model, ids, pool, num_beams=3, num_return_sequences=2)
    assert cache.reused_tokens == [24] * 3


def test_num_return_sequences(model, pool):
    ids = prompt(21, 9)
    pooled(model, ids, pool)
    _, cache = pooled(model, ids, pool, do_sample=True, num_return_sequences=3, seed=1)
    assert cache.reused_tokens == [20] * 3


def test_assistant_model(model, pool):
    assistant = build("llama", "sdpa", seed=1)
    ids = prompt(25, 10)
    pooled(model, ids, pool, assistant_model=assistant)
    _, cache = pooled(model, ids, pool, assistant_model=assistant)
    assert cache.reused_tokens[0] > 0


def test_multi_turn_loop(model, pool):
    ids = prompt(18, 11)
    hits = queries = prev_len = 0
    reused = []
    for turn in range(4):
        out, cache = pooled(model, ids, pool, max_new_tokens=6)
        seen_before = 0 if turn == 0 else (prev_len - 1) // BS * BS
        assert cache.reused_tokens == [min(seen_before, ids.shape[1] - 1)]
        reused.append(cache.reused_tokens[0])
        hits += cache.reused_tokens[0]
        queries += ids.shape[1]
        stats = pool.stats()
        assert (stats.hit_tokens, stats.query_tokens, stats.lookups) == (hits, queries, turn + 1)
        prev_len = out.sequences.shape[1]
        ids = torch.cat([out.sequences, prompt(7, 100 + turn)], dim=1)
    assert reused == sorted(reused) and reused[-1] > reused[1] > 0


def test_same_cache_object_reused(model, pool):
    cache = PooledCache(model, pool=pool)
    a, b = prompt(22, 12), prompt(19, 13)
    out_a = generate(model, a, cache)
    assert_same(reference(model, a), out_a)
    out_b = generate(model, b, cache)  # plain HF would silently reuse a's K/V here
    assert_same(reference(model, b), out_b)
    assert cache.reused_tokens == [0]
    ext = torch.cat([out_a.sequences, prompt(5, 14)], dim=1)
    out = generate(model, ext, cache)
    assert_same(reference(model, ext), out)
    assert cache.reused_tokens == [28]


def test_tiny_pool_evicts_every_call(model):
    probe = KVPool(block_size=BS)
    pooled(model, prompt(8, 15), probe)
    per_block = probe.stats().capacity_bytes // probe.stats().capacity_blocks
    pool = KVPool(block_size=BS, capacity_bytes=3 * per_block)
    ids = prompt(14, 16)
    evicted = []
    for turn in range(4):
        out, _ = pooled(model, ids, pool, max_new_tokens=5)
        stats = pool.stats()
        assert stats.capacity_blocks == 3 and stats.stored_blocks <= 3
        evicted.append(stats.evicted_blocks)
        ids = torch.cat([prompt(6, 200 + turn), out.sequences], dim=1)  # new prefix each turn
    assert evicted == sorted(evicted) and evicted[-1] > evicted[1] > 0
    pool._device.manager.check()


def test_cache_and_past_key_values_keywords(model, pool):
    ids = prompt(20, 17)
    pooled(model, ids, pool)
    cache = PooledCache(model, pool=pool)
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, reference(model, ids).sequences)
    assert cache.reused_tokens == [19]
