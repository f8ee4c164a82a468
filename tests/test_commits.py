"""Commits at pool level: rows of one step in one call, copies outside the lock (``core/commits.py``)."""

from __future__ import annotations

from kv_encoding import batch_kv, block_bytes, check_fetched
from kv_encoding import chain as kv_chain

from hf_kvpool import KVPool
from hf_kvpool.core.device import RowCommit

BS = 2


def test_identical_rows_of_one_step_write_each_block_once():
    """A group of identical rows (num_return_sequences, GRPO) committing the same new blocks: each is
    reserved and written once, so a pool with room for exactly those blocks evicts nothing."""
    tokens = [0, 1, 2, 3, 0, 1]
    pool = KVPool(block_size=BS, capacity_bytes=3 * block_bytes(BS), backend="torch")
    streams = batch_kv(0, [tokens] * 4, [0] * 4)
    chain = kv_chain(0, tokens, BS)
    jobs = [RowCommit(list(chain), 0, row, 0) for row in range(4)]
    assert pool.commit_rows(jobs, streams) == 3
    stats = pool.stats()
    assert stats.stored_blocks == 3 and stats.evicted_blocks == 0
    assert [job.written for job in jobs] == [3, 0, 0, 0]
    assert all(job.anchor.index == 2 for job in jobs)
    fetched = pool.fetch([chain] * 2, [0, 0], 12, 6)
    assert fetched.columns == 6
    check_fetched(fetched, [0, 0], [tokens] * 2, [0, 0])
    pool._device.manager.check()


def test_a_block_published_while_another_writer_copies_it_is_published_once():
    """Writer A plans (under the lock) and is still copying (outside it) when writer B commits the
    same blocks: A's publish keeps B's blocks and frees its own reservation."""
    tokens = [0, 1, 2, 3]
    pool = KVPool(block_size=BS, backend="torch")
    streams = batch_kv(0, [tokens], [0])
    chain = kv_chain(0, tokens, BS)
    pool.commit(chain[:1], 0, streams, 0, 0)  # allocates; block 0 stored
    device = pool._device
    slow = RowCommit(chain, 0, 0, 0)
    with pool.lock:
        device.plan_row(slow)  # A: reserved block 1, not yet written
    assert slow.plan is not None and len(slow.plan.block_ids) == 1
    assert pool.commit(chain, 0, streams, 0, 0) == 1  # B writes block 1
    device.scatter_rows(streams, [slow])
    with pool.lock:
        device.finish_row(slow)
    assert slow.written == 0 and pool.stats().stored_blocks == 2
    device.manager.check()
    assert not device.manager._reserved
    fetched = pool.fetch([chain], [0], 4, 4)
    assert fetched.columns == 4
    check_fetched(fetched, [0], [tokens], [0])
