"""The persistent and shared tiers: host memory, safetensors snapshots, Redis."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pooled
from tiny_models import build, prompt

from hf_kvpool import KVPool
from hf_kvpool.core.snapshot import SnapshotError

BS = 4


@pytest.fixture(scope="module")
def model():
    return build("llama", "sdpa")


def block_bytes(model) -> int:
    probe = KVPool(block_size=BS)
    pooled(model, prompt(8, 99), probe)
    s = probe.stats()
    return s.capacity_bytes // s.capacity_blocks


# ---------------------------------------------------------------------------- host tier
def _three_calls(model, pool):
    """a, then b (which pushes a out of a 10-block device pool), then a again."""
    a, b = prompt(30, 1), prompt(30, 2)
    pooled(model, a, pool)
    pooled(model, b, pool)
    _, cache = pooled(model, a, pool)
    return cache.reused_tokens


def test_host_tier_serves_what_the_device_evicted(model):
    per_block = block_bytes(model)
    unbounded = _three_calls(model, KVPool(block_size=BS))
    pool = KVPool(block_size=BS, capacity_bytes=10 * per_block, host_capacity_bytes=200 * per_block)
    assert _three_calls(model, pool) == unbounded and unbounded[0] >= 24
    stats = pool.stats()
    assert stats.evicted_blocks > 0 and stats.host_hit_blocks > 0
    pool._device.manager.check()


def test_without_host_tier_evicted_blocks_are_gone(model):
    per_block = block_bytes(model)
    unbounded = _three_calls(model, KVPool(block_size=BS))
    bounded = _three_calls(model, KVPool(block_size=BS, capacity_bytes=10 * per_block))
    assert bounded[0] < unbounded[0] - 8  # the evicted blocks are recomputed


# ---------------------------------------------------------------------------- snapshots
def test_snapshot_round_trip(model, tmp_path):
    pool = KVPool(block_size=BS)
    ids = prompt(26, 3)
    pooled(model, ids, pool)
    path = tmp_path / "pool.safetensors"
    saved = pool.save(path)
    assert saved == pool.stats().stored_blocks > 0
    loaded = KVPool.load(path, model=model)
    assert loaded.stats().stored_blocks == saved
    _, cache = pooled(model, ids, loaded)
    assert cache.reused_tokens == [24]
    loaded._device.manager.check()


def test_snapshot_survives_a_process_restart(model, tmp_path):
    path = tmp_path / "pool.safetensors"
    ids = prompt(26, 4)
    pool = KVPool(block_size=BS)
    pooled(model, ids, pool)
    pool.save(path)
    code = f"""
import sys, torch
sys.path.insert(0, "tests")
from tiny_models import build, prompt
from hf_kvpool import KVPool, PooledCache
model = build("llama", "sdpa")
pool = KVPool.load({str(path)!r}, model=model)
cache = PooledCache(model, pool=pool)
model.generate(prompt(26, 4), cache=cache, max_new_tokens=4, do_sample=False)
print(cache.reused_tokens[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "24"


def test_snapshot_of_another_model_is_refused(model, tmp_path):
    pool = KVPool(block_size=BS)
    pooled(model, prompt(12, 5), pool)
    pool.save(tmp_path / "a.safetensors")
    with pytest.raises(SnapshotError, match="another model"):
        KVPool.load(tmp_path / "a.safetensors", model=build("llama", "sdpa", seed=7))


def test_damaged_snapshots_give_clear_errors(model, tmp_path):
    pool = KVPool(block_size=BS)
    pooled(model, prompt(20, 6), pool)
    path = tmp_path / "p.safetensors"
    pool.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="truncated or corrupted"):
        KVPool.load(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a byte of K/V data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(SnapshotError, match="checksum"):
        KVPool.load(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a snapshot at all")
    with pytest.raises(SnapshotError):
        KVPool.load(tmp_path / "junk.safetensors")


def test_crash_mid_save_keeps_the_previous_snapshot(model, tmp_path, monkeypatch):
    import safetensors.torch

    pool = KVPool(block_size=BS)
    pooled(model, prompt(20, 7), pool)
    path = tmp_path / "p.safetensors"
    pool.save(path)
    before = path.read_bytes()
    pooled(model, prompt(20, 8), pool)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pool.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind


def test_pool_cannot_be_pickled():
    import pickle

    with pytest.raises(TypeError, match="pool.save"):
        pickle.dumps(KVPool())


# ---------------------------------------------------------------------------- Redis
@pytest.fixture
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
    pytest.importorskip("redis")
    from redis_server import local_redis_server

    with local_redis_server(maxmemory="64mb") as (url, proc):
        yield url, proc


def test_two_pools_share_through_redis(model, redis_url):
    url, _ = redis_url
    a = KVPool(block_size=BS, remote=url)
    b = KVPool(block_size=BS, remote=url)
    ids = prompt(26, 9)
    pooled(model, ids, a)
    _, cache = pooled(model, ids, b)  # b has stored nothing yet: its first call reads Redis
    assert cache.reused_tokens == [24]
    assert b.stats().remote_hit_blocks == 6 and b.stats().remote_errors == 0


def test_a_fresh_process_reuses_through_redis_on_its_first_call(model, redis_url):
    """A new replica (a fresh process, nothing committed) reads what another process wrote."""
    url, _ = redis_url
    ids = prompt(26, 11)
    pooled(model, ids, KVPool(block_size=BS, remote=url))
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import pooled
from tiny_models import build, prompt
from hf_kvpool import KVPool
model = build("llama", "sdpa")
pool = KVPool(block_size={BS}, remote={url!r})
_, cache = pooled(model, prompt(26, 11), pool)  # tokens and logits equal to DynamicCache's
print(cache.reused_tokens, pool.stats().remote_hit_blocks)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "[24] 6"


def test_a_fresh_recurrent_model_reuses_through_redis(redis_url):
    """The first look-up of a pool lays out checkpoint storage too (a hybrid with recurrent state)."""
    from model_zoo import build as build_family

    url, _ = redis_url
    model = build_family("qwen3_5")
    ids = prompt(26, 13)
    pooled(model, ids, KVPool(block_size=BS, remote=url))
    fresh = KVPool(block_size=BS, remote=url)
    _, cache = pooled(model, ids, fresh)
    assert cache.reused_tokens == [24]
    assert fresh.stats().remote_hit_blocks == 6 and fresh.stats().checkpoint_hits == 1


def test_redis_killed_mid_run_generation_goes_on(model, redis_url):
    url, proc = redis_url
    pool = KVPool(block_size=BS, remote=url, remote_timeout=0.2)
    ids = prompt(22, 13)
    pooled(model, ids, pool)
    proc.kill()
    proc.wait(timeout=10)
    for seed in (14, 15):
        _, cache = pooled(model, prompt(22, seed), pool)  # outputs still equal DynamicCache's
    assert pool.stats().remote_errors >= 1
    _, cache = pooled(model, ids, pool)  # the device tier still serves
    assert cache.reused_tokens == [20]


def test_garbage_in_redis_is_a_miss(model, redis_url):
    import redis

    url, _ = redis_url
    a = KVPool(block_size=BS, remote=url)
    ids = prompt(18, 16)
    pooled(model, ids, a)
    client = redis.Redis.from_url(url)
    for key in client.keys("hfkv:*"):
        client.set(key, b"HFKVBLK1" + b"\x00" * 20)  # right magic, broken header
    b = KVPool(block_size=BS, remote=url)
    pooled(model, prompt(8, 17), b)
    _, cache = pooled(model, ids, b)
    assert cache.reused_tokens == [0]
