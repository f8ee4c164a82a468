"""Concurrency: many threads share one model and one pool.

- 8 threads call ``generate()`` with PooledCache on one model at once, on prompts that overlap (a
  shared system prefix, shared user turns, extensions of each other; single rows, left-padded batches,
  beam search; two of the threads under a salt), with a large pool, with a pool small enough to evict
  during the run, and with that small pool over a host tier. Every output
  equals the same call run alone with DynamicCache; the pool's counters add up (one lookup per call,
  query tokens = prompt tokens, hit tokens = what the caches report reused, committed - evicted =
  stored); the bookkeeping is consistent and nothing stays pinned.
- 8 threads hammer a 6-block KVPool directly with commits and fetches of encoded K/V
  (``kv_encoding.py``): every fetch returns exactly its tokens' K/V, whatever the others evict.

Each test carries a timeout, so a deadlock fails instead of hanging. ``HF_KVPOOL_SOAK=1`` runs longer
versions (marked ``slow``).
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter

import pytest
import torch
from helpers import assert_same, generate, reference
from kv_encoding import batch_kv, block_bytes, check_fetched
from kv_encoding import chain as kv_chain
from tiny_models import build, prompt

from hf_kvpool import KVPool, PooledCache
from hf_kvpool.core.block_store import BlockStore, StreamSpec

SOAK = os.environ.get("HF_KVPOOL_SOAK") == "1"
THREADS = 8
CALLS = 6  # generate() calls per thread in CI
TOTALS: Counter = Counter()  # what the tests exercised (read by the report)
BS = 4
# one block of the tiny Llama: 2 layers of 2 kv heads x 16 dims, float32
BLOCK_BYTES = BlockStore.block_bytes([StreamSpec(torch.device("cpu"), torch.float32, 2, 16)] * 4, BS)


@pytest.fixture(scope="module")
def model():
    return build("llama", "sdpa")


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[-1] for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, length - r.shape[-1] :] = r
        mask[b, length - r.shape[-1] :] = 1
    return ids, mask


def make_jobs(calls_per_thread: int, seed: int) -> list[list[dict]]:
    """Per thread, a list of generate() calls whose prompts overlap with other threads' prompts."""
    rng = random.Random(seed)
    system = prompt(16, 1000)[0]
    turns = [prompt(9, 1001 + i)[0] for i in range(4)]
    jobs: list[list[dict]] = []
    for t in range(THREADS):
        mine = []
        for c in range(calls_per_thread):
            kind = rng.choice(["single", "single", "batch", "beams"])
            user = turns[rng.randrange(len(turns))]
            tail = prompt(rng.randrange(1, 6), 2000 + 100 * t + c)[0]
            row = torch.cat([system, user[: rng.randrange(2, 10)], tail])
            job: dict = {"max_new_tokens": rng.randrange(3, 9)}
            if kind == "batch":
                other = torch.cat([system[: rng.randrange(4, 17)], turns[rng.randrange(len(turns))]])
                job["ids"], job["attention_mask"] = _left_pad([row, other])
            else:
                job["ids"] = row[None]
            if kind == "beams":
                job.update(num_beams=2, num_return_sequences=2, max_new_tokens=4)
            mine.append(job)
        jobs.append(mine)
    return jobs


def _kwargs(job: dict) -> dict:
    return {k: v for k, v in job.items() if k != "ids"}


def _query_tokens(job: dict) -> int:
    mask = job.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else job["ids"].numel()
    return tokens * job.get("num_beams", 1)


def run_threads(target, n: int, timeout: float) -> None:
    errors: list[BaseException] = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: B036 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]


def concurrent_generate(
    model, capacity_blocks: int | None, calls_per_thread: int, seed: int, host_blocks: int = 0
):
    jobs = make_jobs(calls_per_thread, seed)
    refs = [[reference(model, job["ids"], **_kwargs(job)) for job in mine] for mine in jobs]
    capacity = None if capacity_blocks is None else capacity_blocks * BLOCK_BYTES
    pool = KVPool(block_size=BS, capacity_bytes=capacity, host_capacity_bytes=host_blocks * BLOCK_BYTES)
    results: list[list] = [[None] * calls_per_thread for _ in range(THREADS)]
    start = threading.Barrier(THREADS)
    in_flight = [0, 0]  # now, most at once
    count_lock = threading.Lock()

    def worker(t: int) -> None:
        start.wait()
        for c, job in enumerate(jobs[t]):
            cache = PooledCache(model, pool=pool, salt=None if t % 4 else "tenant")  # 2 threads salted
            with count_lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
            out = generate(model, job["ids"], cache, **_kwargs(job))
            with count_lock:
                in_flight[0] -= 1
            results[t][c] = (out, list(cache.reused_tokens))

    run_threads(worker, THREADS, timeout=300)
    assert in_flight[1] > 1, "the calls never overlapped"
    hit = 0
    for t in range(THREADS):
        for c in range(calls_per_thread):
            out, reused = results[t][c]
            assert_same(refs[t][c], out)
            job = jobs[t][c]
            assert len(reused) == job["ids"].shape[0] * job.get("num_beams", 1)
            assert all(0 <= r < job["ids"].shape[1] for r in reused)
            hit += sum(reused)
    stats = pool.stats()
    calls = THREADS * calls_per_thread
    assert stats.lookups == calls
    assert stats.query_tokens == sum(_query_tokens(j) for mine in jobs for j in mine)
    assert stats.hit_tokens == hit and stats.hit_tokens + stats.miss_tokens == stats.query_tokens
    assert stats.stored_blocks <= stats.capacity_blocks
    assert stats.committed_blocks - stats.evicted_blocks == stats.stored_blocks
    pool._device.manager.check()
    assert all(b.pins == 0 for b in pool._device.manager.blocks()) and not pool._device.manager._reserved
    if capacity_blocks is not None:
        assert stats.capacity_blocks == capacity_blocks
    TOTALS["generate_calls"] += calls
    TOTALS["prompt_rows"] += sum(j["ids"].shape[0] for mine in jobs for j in mine)
    TOTALS["max_in_flight"] = max(TOTALS["max_in_flight"], in_flight[1])
    return stats


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "capacity_blocks, host_blocks",
    [(None, 0), (10, 0), (10, 200)],
    ids=["large-pool", "evicting-pool", "evicting-pool-host-tier"],
)
def test_threads_generate_like_dynamic_cache_run_one_by_one(model, capacity_blocks, host_blocks):
    stats = concurrent_generate(
        model, capacity_blocks, CALLS, seed=(capacity_blocks or 0) + host_blocks, host_blocks=host_blocks
    )
    if capacity_blocks is None:
        assert stats.hit_tokens > 0  # the shared system prefix was reused
    else:
        assert stats.evicted_blocks > 0
    if host_blocks:
        assert stats.host_hit_blocks > 0


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak run: set HF_KVPOOL_SOAK=1")
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("capacity_blocks", [None, 6, 10, 30] if SOAK else [])
def test_threads_generate_soak(model, capacity_blocks):
    for seed in range(5):
        concurrent_generate(model, capacity_blocks, calls_per_thread=12, seed=100 + seed)


# ------------------------------------------------------------------------------- pool level
BASES = [[0, 1, 2, 3] * 4, [0, 1, 2, 3, 3, 2, 1, 0] * 2, [3, 3, 0, 1] * 4, [2, 2, 2, 1] * 4]


def hammer_pool(ops_per_thread: int, capacity: int, block_size: int = 2) -> dict:
    pool = KVPool(block_size=block_size, capacity_bytes=capacity * block_bytes(block_size), backend="torch")
    counts = [dict(commits=0, fetches=0, hit_tokens=0) for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        rng = random.Random(t)
        start.wait()
        for _ in range(ops_per_thread):
            rows = [
                BASES[rng.randrange(len(BASES))][: rng.randrange(2, 17)] for _ in range(rng.randrange(1, 3))
            ]
            ns = [rng.randrange(2)] * len(rows)
            length = max(map(len, rows))
            pads = [length - len(r) for r in rows]
            chains = [kv_chain(n, r, block_size) for n, r in zip(ns, rows)]
            if rng.random() < 0.5:
                layer_kv = batch_kv(ns[0], rows, pads)
                for b, c in enumerate(chains):
                    pool.commit(c, 0, layer_kv, b, pads[b])
                counts[t]["commits"] += 1
            else:
                fetched = pool.fetch(chains, pads, sum(map(len, rows)), length - 1)
                counts[t]["fetches"] += 1
                if fetched.columns:
                    check_fetched(fetched, ns, rows, pads)
                    counts[t]["hit_tokens"] += sum(max(0, fetched.columns - p) for p in pads)

    run_threads(worker, THREADS, timeout=300)
    stats = pool.stats()
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert stats.lookups == total["fetches"] and stats.hit_tokens == total["hit_tokens"]
    assert stats.stored_blocks <= capacity
    assert stats.committed_blocks - stats.evicted_blocks == stats.stored_blocks
    pool._device.manager.check()
    assert all(b.pins == 0 for b in pool._device.manager.blocks()) and not pool._device.manager._reserved
    TOTALS["pool_ops"] += THREADS * ops_per_thread
    TOTALS["pool_fetches"] += total["fetches"]
    return total


@pytest.mark.timeout(120)
def test_threads_hammer_a_tiny_pool():
    total = hammer_pool(ops_per_thread=300, capacity=6)
    assert total["hit_tokens"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak run: set HF_KVPOOL_SOAK=1")
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("capacity", [1, 3, 6, 24] if SOAK else [])
def test_threads_hammer_a_tiny_pool_soak(capacity):
    hammer_pool(ops_per_thread=3000, capacity=capacity)
