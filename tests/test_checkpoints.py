"""Checkpoints of recurrent state travel like blocks: eviction, the host and Redis tiers, snapshots.

A hybrid (Qwen3-Next: gated DeltaNet + attention) and an all-recurrent model (Mamba-2: no K/V at
all, checkpoints only). Every call is compared with DynamicCache (tokens, logits within 1e-4).
"""

from __future__ import annotations

import shutil

import model_zoo as zoo
import pytest
import torch
from helpers import assert_same, generate, left_padded, reference

from hf_kvpool import KVPool, PooledCache

BS = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["qwen3_next", "mamba2"])
def model(request):
    return zoo.build(request.param)


def run(model, ids, pool, max_new_tokens=6) -> tuple[torch.Tensor, list[int]]:
    cache = PooledCache(model, pool=pool)
    mask = torch.ones_like(ids)
    out = generate(model, ids, cache, attention_mask=mask, max_new_tokens=max_new_tokens)
    assert_same(reference(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens), out)
    return out.sequences, cache.reused_tokens


def test_prompt_and_last_decoded_boundary_are_checkpointed(model):
    pool = KVPool(block_size=BS)
    seq, _ = run(model, zoo.prompt(21, seed=1), pool, max_new_tokens=20)  # decodes past 24, 32 and 40
    stats = pool.stats()
    # the prompt's last boundary (16) and the last one reached while decoding (40): the decode
    # checkpoints at 24 and 32 were rolled away
    assert stats.stored_checkpoints == 2
    assert stats.checkpoint_bytes > 0 and stats.capacity_checkpoints > 0
    _, reused = run(model, torch.cat([seq, zoo.prompt(3, seed=2)], dim=1), pool)
    assert reused == [40] and pool.stats().checkpoint_hits == 1


def test_checkpoint_bytes_do_not_grow_with_the_context(model):
    sizes = []
    for length in (20, 60):
        pool = KVPool(block_size=BS)
        run(model, zoo.prompt(length, seed=3), pool, max_new_tokens=1)
        sizes.append([(s.name, s.nbytes) for s in pool.layout[1]])
    assert sizes[0] == sizes[1] and sizes[0]


def test_a_full_checkpoint_store_drops_the_least_recently_used(model):
    probe = KVPool(block_size=BS)
    run(model, zoo.prompt(20, seed=4), probe, max_new_tokens=1)
    stats = probe.stats()
    slot = stats.checkpoint_bytes // stats.capacity_checkpoints
    # room for 2 checkpoints (a quarter of the capacity holds them) and more blocks than used here
    pool = KVPool(block_size=BS, capacity_bytes=8 * slot + 4)
    first = zoo.prompt(18, seed=5)
    seq, _ = run(model, first, pool, max_new_tokens=1)
    for seed in (6, 7):
        run(model, zoo.prompt(18, seed=seed), pool, max_new_tokens=1)
    assert pool.stats().stored_checkpoints == 2
    _, reused = run(model, torch.cat([seq, zoo.prompt(4, seed=8)], dim=1), pool, max_new_tokens=1)
    assert reused == [0]  # its checkpoint was dropped (its blocks alone cannot restore the state)
    # that call checkpointed 16 again, dropping the least recently used (seed 6's): seed 7's stays
    _, reused = run(model, torch.cat([zoo.prompt(18, seed=7), zoo.prompt(4, seed=9)], dim=1), pool)
    assert reused == [16]
    pool._device.manager.check()


def test_host_tier_carries_checkpoints(model):
    """A block evicted from the device pool goes to the host tier with its checkpoint."""
    probe = KVPool(block_size=BS)
    run(model, zoo.prompt(20, seed=4), probe, max_new_tokens=1)
    stats = probe.stats()
    if not probe.layout[0]:
        pytest.skip("no per-token state: blocks are bookkeeping only and never evicted before checkpoints")
    slot = stats.checkpoint_bytes // stats.capacity_checkpoints
    pool = KVPool(block_size=BS, capacity_bytes=8 * slot + 4, host_capacity_bytes=1 << 26)
    blocks = pool.settings.sizes(*probe.layout)[0]
    n = blocks // 2 + 1  # full blocks of each prompt: two do not fit
    first = zoo.prompt(n * BS + 7, seed=10)
    run(model, first, pool, max_new_tokens=1)
    run(model, zoo.prompt(n * BS + 7, seed=11), pool, max_new_tokens=1)  # evicts first's tail
    assert pool.stats().evicted_blocks > 0
    _, reused = run(model, torch.cat([first, zoo.prompt(4, seed=14)], dim=1), pool)
    assert reused == [n * BS] and pool.stats().host_hit_blocks > 0


def test_snapshot_carries_checkpoints(model, tmp_path):
    pool = KVPool(block_size=BS)
    first = zoo.prompt(26, seed=15)
    run(model, first, pool, max_new_tokens=1)
    pool.save(tmp_path / "pool.safetensors")
    loaded = KVPool.load(tmp_path / "pool.safetensors", model=model)
    assert loaded.stats().stored_checkpoints == pool.stats().stored_checkpoints > 0
    _, reused = run(model, torch.cat([first, zoo.prompt(4, seed=16)], dim=1), loaded)
    assert reused == [24]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_tier_carries_checkpoints(model):
    from redis_server import local_redis_server

    with local_redis_server() as (url, _):
        writer = KVPool(block_size=BS, remote=url, remote_timeout=2.0)
        first = zoo.prompt(26, seed=17)
        run(model, first, writer, max_new_tokens=1)
        reader = KVPool(block_size=BS, remote=url, remote_timeout=2.0)  # another process's pool
        run(model, zoo.prompt(9, seed=18), reader, max_new_tokens=1)  # lays out its storage
        _, reused = run(model, torch.cat([first, zoo.prompt(4, seed=19)], dim=1), reader)
        assert reused == [24] and reader.stats().remote_hit_blocks == 3


def test_left_padded_batch_split_at_a_common_boundary(model):
    """Rows whose padding lines up on blocks: the prefill splits at their common boundary (the
    second forward spans several columns, with the padding mask cut to match) and checkpoints both."""
    pool = KVPool(block_size=BS)
    long, short = zoo.prompt(40, seed=20), zoo.prompt(24, seed=21)
    ids, mask = left_padded(long, short)  # 16 pads
    cache = PooledCache(model, pool=pool)
    out = generate(model, ids, cache, attention_mask=mask, max_new_tokens=3)
    assert_same(reference(model, ids, attention_mask=mask, max_new_tokens=3), out)
    # the split at column 32 (the long row's 32, the short one's 16), then the prefill's end at 40
    # (40 and 24): every one on a block boundary of its row
    assert pool.stats().stored_checkpoints == 4
    _, reused = run(model, torch.cat([short, zoo.prompt(2, seed=22)], dim=1), pool)
    assert reused == [24]
