"""Faults: an exception in the middle of a commit, a gather, an allocation, a spill to the host tier,
a promotion from it, or a forward, leaves the pool consistent and never serves a half-written block.

Each injected fault hits a generate() call whose prompt partly hits the pool (so it gathers) and
adds new blocks (so it commits). A fault that writes first writes *part* of the data and fills the
rest of the blocks it was writing with NaN before raising, so a half-written block, if it were ever
served, would turn the next outputs into NaN. Then:

- ``RuntimeError`` / ``torch.OutOfMemoryError``: the call completes, with DynamicCache's output,
  and warns; ``KeyboardInterrupt``: the call raises it;
- either way: ``check()`` holds, nothing is pinned or reserved, no published block holds a NaN,
  and later calls (the same prompt, its extension, the first prompt) give DynamicCache's output and
  reuse again.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_same, generate, pooled, reference
from kv_encoding import batch_kv, block_bytes, check_fetched
from kv_encoding import chain as kv_chain
from tiny_models import build, prompt

import hf_kvpool.core.paging as paged_copy
import hf_kvpool.hf.registry as registry
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.core.block_store import BlockStore
from hf_kvpool.core.tiers import HostTier

BS = 4
PER_BLOCK = 2 * 2 * 2 * BS * 16 * 4  # tiny Llama: 2 layers x (K, V) x 2 heads x BS x 16 dims, float32

EXCEPTIONS = {
    "RuntimeError": lambda: RuntimeError("injected fault"),
    "OutOfMemoryError": lambda: torch.OutOfMemoryError(
        "injected: CUDA out of memory. Tried to allocate 2.00 GiB"
    ),
    "KeyboardInterrupt": lambda: KeyboardInterrupt(),
}

INJECTED: list[str] = []  # every fault raised (the report counts them)


@pytest.fixture(scope="module")
def model():
    return build("llama", "sdpa")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(registry, "_warned", set())
    # faults are injected on purpose here: the default (warn, compute without the pool) is under test
    monkeypatch.setenv("HF_KVPOOL_STRICT", "0")


class Fault:
    """Counts calls; at the ``at``-th it does ``partial`` (the part written before the fault), then raises."""

    def __init__(self, exc: str, at: int = 1):
        self.exc, self.at, self.calls, self.fired = exc, at, 0, False

    def hit(self, partial=None) -> None:
        self.calls += 1
        if self.calls == self.at and not self.fired:
            self.fired = True
            if partial is not None:
                partial()
            INJECTED.append(self.exc)
            raise EXCEPTIONS[self.exc]()


def _nan_free(pool: KVPool) -> bool:
    ids = [b.block_id for b in pool._device.manager.blocks()]
    return not ids or not any(torch.isnan(g.data[ids]).any() for g in pool._device.store.groups)


def assert_consistent(pool: KVPool) -> None:
    m = pool._device.manager
    if m is None:
        return
    m.check()
    assert all(b.pins == 0 for b in m.blocks()), "a block stays pinned"
    assert not m._reserved, "a block stays reserved"
    assert _nan_free(pool), "a published block holds half-written data"
    stats = pool.stats()
    assert stats.committed_blocks - stats.evicted_blocks == stats.stored_blocks <= stats.capacity_blocks


def run_faulty_call(model, pool, ids, exc: str, **kwargs):
    """generate() under an armed fault: completes like DynamicCache (and warns), or raises KeyboardInterrupt."""
    cache = PooledCache(model, pool=pool)
    if exc == "KeyboardInterrupt":
        with pytest.raises(KeyboardInterrupt):
            generate(model, ids, cache, **kwargs)
        return cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, ids, cache, **kwargs)
    assert_same(reference(model, ids, **kwargs), out)
    assert any("hf_kvpool" in str(w.message) and "failed" in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    return cache


def later_calls_are_correct(model, pool, first, faulty):
    """After the fault: the faulty prompt, its extension and the first prompt, like DynamicCache; reuse is back."""
    _, cache = pooled(model, faulty, pool)
    ext = torch.cat([faulty, prompt(6, 99)], dim=1)
    _, cache = pooled(model, ext, pool)
    assert cache.reused_tokens[0] >= (faulty.shape[1] // BS) * BS - BS
    _, cache = pooled(model, first, pool)
    assert cache.reused_tokens == [first.shape[1] - 1]
    assert_consistent(pool)


def _prompts():
    first = prompt(24, 1)
    faulty = torch.cat([first[:, :13], prompt(11, 2)], dim=1)  # 3 blocks hit, 3 new blocks to commit
    return first, faulty


# ------------------------------------------------------------------------------ scatter (commits)
@pytest.mark.parametrize("exc", list(EXCEPTIONS))
@pytest.mark.parametrize("at", [1, 2], ids=["prefill-commit", "decode-commit"])
def test_fault_mid_scatter(model, monkeypatch, exc, at):
    pool = KVPool(block_size=BS)
    first, faulty = _prompts()
    pooled(model, first, pool)
    stored = pool.stats().stored_blocks
    real = paged_copy.torch_scatter
    fault = Fault(exc, at)

    def scatter(storage, srcs, block_ids, rows, src_cols, **kw):
        def partial():
            k = max(1, block_ids.numel() // 2)  # the first blocks written, the rest garbage
            real(storage, srcs, block_ids[:k], rows[:k], src_cols[:k], **kw)
            storage[block_ids[k:]] = float("nan")
            storage[block_ids[:k], :, :, :, -1] = float("nan")  # and the first ones not quite complete

        fault.hit(partial)
        return real(storage, srcs, block_ids, rows, src_cols, **kw)

    monkeypatch.setattr(paged_copy, "torch_scatter", scatter)
    run_faulty_call(model, pool, faulty, exc)
    assert fault.fired
    monkeypatch.undo()
    assert_consistent(pool)
    if at == 1:  # the faulty call's new blocks were never published
        assert pool.stats().stored_blocks == stored
    later_calls_are_correct(model, pool, first, faulty)


# ------------------------------------------------------------------------------ gather (lookups)
@pytest.mark.parametrize("exc", list(EXCEPTIONS))
def test_fault_mid_gather(model, monkeypatch, exc):
    pool = KVPool(block_size=BS)
    first, faulty = _prompts()
    pooled(model, first, pool)
    hits = pool.stats().hit_tokens
    real = paged_copy.torch_gather
    fault = Fault(exc)

    def gather(storage, block_ids, rows, dst_cols, ntok, out, **kw):
        def partial():
            real(storage, block_ids[:1], rows[:1], dst_cols[:1], ntok[:1], out, **kw)

        fault.hit(partial)
        return real(storage, block_ids, rows, dst_cols, ntok, out, **kw)

    monkeypatch.setattr(paged_copy, "torch_gather", gather)
    cache = run_faulty_call(model, pool, faulty, exc)
    assert fault.fired
    monkeypatch.undo()
    assert_consistent(pool)
    assert pool.stats().hit_tokens == hits  # the failed lookup served nothing
    if exc != "KeyboardInterrupt":
        assert cache.reused_tokens == [0]  # computed in full
    later_calls_are_correct(model, pool, first, faulty)


# ------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("exc", ["OutOfMemoryError", "KeyboardInterrupt"])
def test_fault_allocating_the_pool(model, monkeypatch, exc):
    """The first commit allocates the storage; if that fails the pool stays empty and usable."""
    pool = KVPool(block_size=BS)
    first, faulty = _prompts()
    real_init = BlockStore.__init__
    fault = Fault(exc)

    def init(self, *args, **kwargs):
        fault.hit()
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(BlockStore, "__init__", init)
    run_faulty_call(model, pool, first, exc)
    assert fault.fired and pool._device is None
    assert pool.stats().stored_blocks == 0
    monkeypatch.undo()
    pooled(model, first, pool)
    later_calls_are_correct(model, pool, first, faulty)


# ------------------------------------------------------------------------------ host tier
@pytest.mark.parametrize("exc", ["RuntimeError", "KeyboardInterrupt"])
def test_fault_spilling_to_the_host_tier(model, monkeypatch, exc):
    """A device eviction copies the block to the host tier first; a failure there evicts nothing."""
    pool = KVPool(block_size=BS, capacity_bytes=8 * PER_BLOCK, host_capacity_bytes=100 * PER_BLOCK)
    first, faulty = _prompts()
    pooled(model, first, pool)  # 7 of 8 blocks
    real_put = HostTier.put
    fault = Fault(exc)

    def put(self, entry):
        fault.hit()
        real_put(self, entry)

    monkeypatch.setattr(HostTier, "put", put)
    run_faulty_call(model, pool, faulty, exc)
    assert fault.fired
    monkeypatch.undo()
    assert_consistent(pool)
    later_calls_are_correct(model, pool, first, faulty)


@pytest.mark.parametrize("exc", ["OutOfMemoryError", "KeyboardInterrupt"])
def test_fault_promoting_from_the_host_tier(model, monkeypatch, exc):
    """A hit in the host tier is copied into device blocks; a failure mid-copy publishes none of them."""
    pool = KVPool(block_size=BS, capacity_bytes=6 * PER_BLOCK, host_capacity_bytes=100 * PER_BLOCK)
    first, faulty = _prompts()
    pooled(model, first, pool)
    pooled(model, prompt(30, 3), pool)  # pushes `first` to the host tier
    assert pool.stats().host_stored_blocks > 0
    real_write = BlockStore.write_block
    fault = Fault(exc, at=2)

    def write_block(self, block_id, payload):
        def partial():
            for g in self.groups:
                g.data[block_id] = float("nan")

        fault.hit(partial)
        real_write(self, block_id, payload)

    monkeypatch.setattr(BlockStore, "write_block", write_block)
    cache = run_faulty_call(model, pool, first, exc)
    assert fault.fired
    monkeypatch.undo()
    assert_consistent(pool)
    if exc != "KeyboardInterrupt":
        assert cache.reused_tokens == [0]
    _, cache = pooled(model, first, pool)
    _, cache = pooled(model, first, pool)
    assert cache.reused_tokens == [23]
    assert_consistent(pool)


# ------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("at", [1, 6], ids=["prefill", "decode"])  # 6: just after a decode-time commit
def test_keyboard_interrupt_mid_forward(model, at):
    """Ctrl-C inside the model (raised by a hook on the last decoder layer at the Nth forward): no
    half-recorded K/V reaches the pool, and the interrupted cache object itself works afterwards."""
    pool = KVPool(block_size=BS)
    first, faulty = _prompts()
    pooled(model, first, pool)
    stored = pool.stats().stored_blocks
    fault = Fault("KeyboardInterrupt", at)
    handle = model.model.layers[-1].register_forward_hook(lambda *_: fault.hit())
    try:
        cache = run_faulty_call(model, pool, faulty, "KeyboardInterrupt")
    finally:
        handle.remove()
    assert fault.fired
    assert_consistent(pool)
    if at == 1:
        assert pool.stats().stored_blocks == stored
    pooled(model, faulty, pool, cache=cache)  # the same PooledCache, reused after the interrupt
    later_calls_are_correct(model, pool, first, faulty)


def test_keyboard_interrupt_during_lookup_leaks_no_pins(model, monkeypatch):
    pool = KVPool(block_size=BS)
    first, _ = _prompts()
    pooled(model, first, pool)
    manager = pool._device.manager
    real_match = manager.match
    fault = Fault("KeyboardInterrupt", at=2)
    pinned_at_fault: list[int] = []

    def match(chain, pin=True):
        if pin:  # fetch's look-ups (the catch-up planner's unpinned hints do not count)
            if fault.calls == 1:  # row 1's look-up: row 0's blocks are pinned now
                pinned_at_fault.extend(b.block_id for b in manager.blocks() if b.pins)
            fault.hit()
        return real_match(chain, pin)

    monkeypatch.setattr(manager, "match", match)
    batch = torch.cat([first, first])
    with pytest.raises(KeyboardInterrupt):
        generate(model, batch, PooledCache(model, pool=pool), attention_mask=torch.ones_like(batch))
    monkeypatch.undo()
    assert fault.fired and len(pinned_at_fault) == first.shape[1] // BS  # the fault hit the pinned path
    assert all(b.pins == 0 for b in manager.blocks())  # row 0's pins were released
    pool.clear()  # a pinned pool could never be cleared


# ------------------------------------------------------------------------------ pool level
@pytest.mark.parametrize("exc", list(EXCEPTIONS))
def test_fault_in_the_second_storage_group(monkeypatch, exc):
    """A model whose layers live in two storage tensors: the first is written, the second fails.
    The block is not published; a later commit writes both and fetch returns exactly its K/V."""
    pool = KVPool(block_size=2, capacity_bytes=4 * block_bytes(2), backend="torch")
    tokens = [0, 1, 2, 3, 0, 1]
    layer_kv = batch_kv(0, [tokens], [0])
    chain = kv_chain(0, tokens, 2)
    pool.commit(chain[:1], 0, layer_kv, 0, 0)  # allocate; block 0 is stored
    real = paged_copy.torch_scatter
    fault = Fault(exc, at=2)

    def scatter(storage, srcs, block_ids, rows, src_cols, **kw):
        fault.hit(lambda: storage[block_ids].fill_(float("nan")))
        return real(storage, srcs, block_ids, rows, src_cols, **kw)

    monkeypatch.setattr(paged_copy, "torch_scatter", scatter)
    with pytest.raises(type(EXCEPTIONS[exc]())):
        pool.commit(chain, 0, layer_kv, 0, 0)
    monkeypatch.undo()
    assert_consistent(pool)
    assert pool.stats().stored_blocks == 1
    fetched = pool.fetch([chain], [0], 6, 5)
    assert fetched.columns == 2
    check_fetched(fetched, [0], [tokens], [0])
    assert pool.commit(chain, 0, layer_kv, 0, 0) == 2
    fetched = pool.fetch([chain], [0], 6, 5)
    assert fetched.columns == 5
    check_fetched(fetched, [0], [tokens], [0])
    assert_consistent(pool)


def test_pooled_cache_after_a_failed_call_is_a_plain_cache_until_the_next_generate(model, monkeypatch):
    """A commit failure mid-generation turns that call's commits off (the output is already right);
    the next generate() with the same cache object commits again."""
    pool = KVPool(block_size=BS)
    first, faulty = _prompts()
    cache = PooledCache(model, pool=pool)
    real = paged_copy.torch_scatter
    fault = Fault("RuntimeError", at=1)

    def scatter(*args, **kw):
        fault.hit()
        return real(*args, **kw)

    monkeypatch.setattr(paged_copy, "torch_scatter", scatter)
    with pytest.warns(UserWarning, match="writing to the pool failed"):
        out = generate(model, first, cache)
    assert_same(reference(model, first), out)
    assert pool.stats().stored_blocks == 0
    monkeypatch.undo()
    pooled(model, first, pool, cache=cache)
    assert pool.stats().stored_blocks == (24 + 8 - 1) // BS
    _, cache = pooled(model, first, pool, cache=cache)
    assert cache.reused_tokens == [23]
    assert_consistent(pool)


# ------------------------------------------------------------------------------ strict mode
@pytest.mark.parametrize("how", ["setting", "environment"])
def test_strict_mode_raises_a_commit_failure(model, monkeypatch, how):
    """Strict mode (``KVPool(strict=True)`` or ``HF_KVPOOL_STRICT=1``): the failure reaches the caller."""
    if how == "environment":
        monkeypatch.setenv("HF_KVPOOL_STRICT", "1")
    pool = KVPool(block_size=BS, strict=True if how == "setting" else None)
    assert pool.strict
    first, _ = _prompts()
    real = paged_copy.torch_scatter
    fault = Fault("RuntimeError", at=1)

    def scatter(*args, **kw):
        fault.hit()
        return real(*args, **kw)

    monkeypatch.setattr(paged_copy, "torch_scatter", scatter)
    with pytest.raises(RuntimeError, match="injected fault"):
        generate(model, first, PooledCache(model, pool=pool))
    monkeypatch.undo()
    assert_consistent(pool)


def test_strict_mode_raises_a_fetch_failure(model, monkeypatch):
    pool = KVPool(block_size=BS, strict=True)
    first, faulty = _prompts()
    pooled(model, first, pool)
    real = paged_copy.torch_gather
    fault = Fault("OutOfMemoryError", at=1)

    def gather(*args, **kw):
        fault.hit()
        return real(*args, **kw)

    monkeypatch.setattr(paged_copy, "torch_gather", gather)
    with pytest.raises(torch.OutOfMemoryError):
        generate(model, faulty, PooledCache(model, pool=pool))
    monkeypatch.undo()
    assert_consistent(pool)
    later_calls_are_correct(model, pool, first, faulty)


def test_strict_setting_is_checked():
    with pytest.raises(ValueError, match="strict must be"):
        KVPool(strict="yes")
