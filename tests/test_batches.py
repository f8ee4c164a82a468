"""Batches and sample groups compute each uncached token once (``hf_kvpool/hf/catchup.py``).

Positions computed are counted where they enter the model (the input embeddings). A prefill
computes at most the distinct uncached tokens plus one block per row; every output is identical to
DynamicCache (tokens, logits within 1e-4): greedy, sampling with a seed, beam search,
``num_return_sequences``, left padding.
"""

from __future__ import annotations

import contextlib

import model_zoo as zoo
import pytest
import torch
from helpers import assert_same, generate, left_padded, reference
from tiny_models import build, prompt

from hf_kvpool import KVPool, PooledCache

BS = 16


@contextlib.contextmanager
def counting(model):
    """Count the token positions the model computes (a passive hook on its input embeddings)."""
    seen = [0]

    def count(module, args):
        seen[0] += args[0].numel()

    count.hf_kvpool_passive = True
    handle = model.get_input_embeddings().register_forward_pre_hook(count)
    try:
        yield seen
    finally:
        handle.remove()


def pooled_prefill(model, ids, pool, **kwargs):
    """A one-token generate (the prefill and nothing else), checked against DynamicCache; returns
    (positions computed, reused tokens per row)."""
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    cache = PooledCache(model, pool=pool)
    with counting(model) as seen:
        out = generate(model, ids, cache, max_new_tokens=1, **kwargs)
    assert_same(reference(model, ids, max_new_tokens=1, **kwargs), out)
    return seen[0], cache.reused_tokens


@pytest.fixture(scope="module")
def llama():
    return build("llama", "sdpa")


def test_a_new_row_next_to_a_cached_one(llama):
    pool = KVPool(block_size=BS)
    base = prompt(64, 1)
    pooled_prefill(llama, base, pool)  # 64 tokens of row 0 are pooled (4 blocks: all but none)
    ids = torch.cat([torch.cat([base, prompt(8, 2)], dim=1), prompt(72, 3)])
    computed, reused = pooled_prefill(llama, ids, pool)
    assert computed <= (8 + 72) + 2 * BS  # the distinct uncached tokens + one block per row
    assert computed == 65 + 2 * 8  # the new row alone up to its last boundary (+1), then 8 per row
    assert reused == [64, 64]


def test_num_return_sequences_computes_the_prompt_once(llama):
    pool = KVPool(block_size=BS)
    ids = prompt(64, 4)
    cache = PooledCache(llama, pool=pool)
    with counting(llama) as seen:
        out = generate(llama, ids, cache, max_new_tokens=1, do_sample=True, num_return_sequences=4, seed=7)
    assert_same(reference(llama, ids, max_new_tokens=1, do_sample=True, num_return_sequences=4, seed=7), out)
    assert seen[0] <= 64 + 4 * BS
    # the prompt once (all but its last token, in a catch-up), then one column per row
    assert seen[0] == 63 + 4 and cache.reused_tokens == [63] * 4


def test_a_grpo_group_computes_the_prompt_once(llama):
    pool = KVPool(block_size=BS)
    ids = prompt(80, 5).repeat(6, 1)
    computed, reused = pooled_prefill(llama, ids, pool)
    assert computed <= 80 + 6 * BS
    assert computed == 79 + 6 and reused == [79] * 6
    # sampled completions of a new group, a whole generate(): identical to DynamicCache
    ids = prompt(90, 12).repeat(6, 1)
    cache = PooledCache(llama, pool=pool)
    out = generate(llama, ids, cache, max_new_tokens=12, do_sample=True, seed=3)
    assert_same(reference(llama, ids, max_new_tokens=12, do_sample=True, seed=3), out)
    assert cache.reused_tokens == [89] * 6
    # the blocks each completion finished while decoding were committed (tokens 80-95 of row 2)
    follow = torch.cat([out.sequences[2:3], prompt(5, 13)], dim=1)  # 107 tokens
    _, reused = pooled_prefill(llama, follow, pool)
    assert reused == [96]


def test_beam_search_expansion_is_computed_once(llama):
    pool = KVPool(block_size=BS)
    ids = prompt(50, 6)
    cache = PooledCache(llama, pool=pool)
    with counting(llama) as seen:
        out = generate(llama, ids, cache, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert_same(reference(llama, ids, max_new_tokens=4, num_beams=3, num_return_sequences=2), out)
    assert cache.reused_tokens == [49] * 3
    assert seen[0] <= 50 + 3 * BS + 3 * 3  # prefill, then 3 beams x 3 decode steps
    assert seen[0] == 49 + 3 + 3 * 3


def test_left_padded_rows_at_different_turns(llama):
    pool = KVPool(block_size=BS)
    session = prompt(90, 7)
    pooled_prefill(llama, session, pool)  # a session at a later turn: 80 of its tokens are pooled
    later = torch.cat([session, prompt(10, 8)], dim=1)  # 100 tokens
    new = prompt(40, 9)  # a session starting
    ids, mask = left_padded(later, new)  # 60 pads
    computed, reused = pooled_prefill(llama, ids, pool, attention_mask=mask)
    assert computed <= (20 + 40) + 2 * BS
    # the new row's padding already lets the batch start at column 60; catching both rows up to
    # 92 would cost two forwards and 65 tokens to save 64 positions: not done
    assert reused == [60, 0] and computed == 2 * 40


def test_a_catch_up_for_a_few_tokens_does_not_pay(llama):
    pool = KVPool(block_size=BS)
    a, b = prompt(40, 10), prompt(40, 11)
    pooled_prefill(llama, a, pool)
    pooled_prefill(llama, b[:, :19], pool)  # b's first block is pooled, 16 tokens short of the rest
    ids = torch.cat([a, b])
    computed, reused = pooled_prefill(llama, ids, pool)
    # catching b up to 32 would cost one forward (64 token-equivalents) to save 2 x 16 positions
    assert reused == [16, 16] and computed == 2 * 24


def test_hybrid_group_with_aligned_rows(one_thread):
    model = zoo.build("qwen3_next")
    pool = KVPool(block_size=BS)
    ids = zoo.prompt(70, seed=12).repeat(3, 1)
    computed, reused = pooled_prefill(model, ids, pool)
    assert reused == [64] * 3  # a checkpoint at 64 for the one distinct row serves all three
    assert computed <= 70 + 3 * BS


def test_hybrid_rows_whose_padding_does_not_line_up_are_computed_in_full(one_thread):
    model = zoo.build("qwen3_next")
    pool = KVPool(block_size=BS)
    long, short = zoo.prompt(60, seed=13), zoo.prompt(41, seed=14)
    ids, mask = left_padded(long, short)  # 19 pads
    pooled_prefill(model, long, pool)
    _, reused = pooled_prefill(model, ids, pool, attention_mask=mask)
    assert reused == [0, 0]  # no column where both rows hold a checkpoint (19 pads: not a block multiple)
    # but both rows' prefixes went to the pool: alone, the short one now reuses
    _, reused = pooled_prefill(model, torch.cat([short, zoo.prompt(3, seed=15)], dim=1), pool)
    assert reused == [32]


def test_all_recurrent_group_catches_up_once(one_thread):
    """Mamba-2 (no attention, no K/V: checkpoints only) in a group of identical rows."""
    model = zoo.build("mamba2")
    pool = KVPool(block_size=BS)
    ids = zoo.prompt(50, seed=16).repeat(4, 1)
    computed, reused = pooled_prefill(model, ids, pool)
    assert reused == [48] * 4
    assert computed <= 50 + 4 * BS


@pytest.mark.parametrize("capacity", ["unlimited", "two-blocks"])
def test_whole_rows_of_two_groups_with_padding(llama, capacity):
    """Two groups, left-padded to one length: every distinct row catches up to its last token but
    one, the batch computes one column per row. With a pool of two blocks the catch-ups' blocks are
    evicted before the batch reads them: its columns come from the catch-up caches instead."""
    probe = KVPool(block_size=BS)
    pooled_prefill(llama, prompt(20, 1), probe)
    per_block = probe.stats().capacity_bytes // probe.stats().capacity_blocks
    pool = KVPool(block_size=BS, capacity_bytes=2 * per_block if capacity == "two-blocks" else None)
    a, b = prompt(70, 14), prompt(60, 15)
    ids, mask = left_padded(a, a, b, b)  # 10 pads on the b rows
    cache = PooledCache(llama, pool=pool)
    with counting(llama) as seen:
        out = generate(llama, ids, cache, attention_mask=mask, max_new_tokens=20)
    assert_same(reference(llama, ids, attention_mask=mask, max_new_tokens=20), out)
    assert cache.reused_tokens == [69, 69, 59, 59]
    assert seen[0] == 69 + 59 + 4 + 4 * 19  # two catch-ups, one column per row, 19 decode steps
    pool._device.manager.check()
    if capacity == "unlimited":
        # what the batch computed and decoded was committed: alone, row 2 reuses its full blocks
        follow = torch.cat([out.sequences[2:3, 10:], prompt(3, 16)], dim=1)  # 82 tokens, 79 cached
        _, reused = pooled_prefill(llama, follow, pool)
        assert reused == [64]


def test_whole_rows_off_starts_the_batch_at_a_common_boundary(llama, monkeypatch):
    """``catchup.WHOLE_ROWS = False`` (what bench_rollouts' pooled-blocks mode measures): the group's
    prompt is caught up to its last block boundary, then every row computes its last 16 tokens."""
    from hf_kvpool.hf import catchup

    monkeypatch.setattr(catchup, "WHOLE_ROWS", False)
    pool = KVPool(block_size=BS)
    computed, reused = pooled_prefill(llama, prompt(80, 5).repeat(6, 1), pool)
    assert reused == [64] * 6 and computed == 65 + 6 * 16
