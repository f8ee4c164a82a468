"""A commit's steps and the pool's lock around them (:meth:`KVPool.commit_rows`).

1. *plan*, under the lock: per row, reserve the blocks its chain lacks (``DeviceTier.plan_row``;
   a row whose missing blocks overlap an earlier row's waits for the next round);
2. *scatter*, outside it: write every row's new blocks in one copy. Reserved blocks are invisible to
   look-ups and never evicted, and each plan pins its parent, so nothing else reads or moves them;
3. *finish*, under the lock: publish (a block another writer published meanwhile is not published
   twice), attach checkpoints, drop the ones they replace;
4. for the Redis tier: pin what was written, copy it to the host and send it outside the lock, unpin.

A failure in 1 or 2 returns every reserved block unpublished.
"""

from __future__ import annotations

import threading

import torch

from .device import DeviceTier, RowCommit
from .tiers import Tiers

__all__ = ["commit_rows"]


def commit_rows(
    lock: threading.RLock,
    device: DeviceTier,
    tiers: Tiers | None,
    jobs: list[RowCommit],
    streams: list[torch.Tensor],
    namespace: bytes,
) -> int:
    """Commit ``jobs`` (rows of ``streams``); returns the blocks written.

    Rows whose missing blocks overlap an earlier row's (identical rows of a group, a shared system
    prompt) wait for a second round, where they find those blocks published: no block is reserved
    or written twice."""
    left = jobs
    while left:  # each round plans at least its first row
        left = _round(lock, device, tiers, left, streams, namespace)
    return sum(job.written for job in jobs)


def _round(
    lock, device: DeviceTier, tiers, jobs: list[RowCommit], streams, namespace: bytes
) -> list[RowCommit]:
    """One plan / scatter / finish round; returns the rows left for the next one."""
    planned: set[bytes] = set()
    now: list[RowCommit] = []
    later: list[RowCommit] = []
    with lock:
        try:
            for job in jobs:
                end = len(job.chain) if job.end is None else job.end
                if any(job.chain[j][0] in planned for j in range(job.data_from, end)):
                    later.append(job)
                    continue
                device.plan_row(job)
                now.append(job)
                if job.plan is not None:
                    planned.update(job.chain[job.plan.first + i][0] for i in range(len(job.plan.block_ids)))
        except BaseException:
            device.abort_rows(now)
            raise
    try:
        device.scatter_rows(streams, now)
    except BaseException:
        with lock:
            device.abort_rows(now)
        raise
    remote = tiers is not None and tiers.remote is not None
    pinned = []
    with lock:
        for job in now:
            updated = device.finish_row(job)
            if remote and updated:
                pinned += device.pin_entries(updated)
    if pinned:
        try:
            tiers.write_through(namespace, device.read_entries(pinned))
        finally:
            with lock:
                device.manager.unpin([blk.block_id for blk, _, _ in pinned])
    return later
