"""Reuse on every decoder family transformers 5.24 ships (tiny random configs, ``model_zoo.py``).

For each model type: three turns where each prompt extends the last output (tokens identical to
``DynamicCache``, logits within 1e-4, and every full block of the previous call's sequence reused),
and a left-padded batch of two rows (identical; reuse where the family allows it with padding).
"""

from __future__ import annotations

import model_zoo as zoo
import pytest
import torch
from helpers import assert_same, generate, left_padded, reference

import hf_kvpool.hf.catchup as catchup
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.hf.enable import model_state

BS = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def turn(model, ids, pool, **kwargs):
    cache = PooledCache(model, pool=pool)
    mask = torch.ones_like(ids)  # random models generate the pad id too: say every column is real
    kwargs.setdefault("max_new_tokens", 6)
    out = generate(model, ids, cache, attention_mask=mask, **kwargs)
    assert_same(reference(model, ids, attention_mask=mask, **kwargs), out)
    return out, cache


@pytest.mark.parametrize("model_type", zoo.MODEL_TYPES)
def test_three_turns_reuse_every_full_block(model_type, monkeypatch):
    model = zoo.build(model_type)
    if model_state_of(model).single_steps:
        # Mamba-1 mixers continue one token per forward after a restore; the cost model would
        # recompute these short prompts instead (tests/test_integration.py checks that choice)
        monkeypatch.setitem(catchup.FORWARD_COST_TOKENS, "cpu", 1)
    pool = KVPool(block_size=BS)
    ids, held = zoo.prompt(21, seed=1), 0
    for n in range(3):
        out, cache = turn(model, ids, pool)
        assert cache.reused_tokens == [min(held // BS * BS, ids.shape[1] - 1)], n
        held = out.sequences.shape[1] - 1  # the cache holds every token but the last generated one
        ids = torch.cat([out.sequences, zoo.prompt(7, seed=10 + n)], dim=1)
    assert cache.reused_tokens[0] >= 32


@pytest.mark.parametrize("model_type", zoo.MODEL_TYPES)
def test_left_padded_batch_of_two(model_type):
    model = zoo.build(model_type)
    state = model_state_of(model)
    pool = KVPool(block_size=BS)
    warm = zoo.prompt(33, seed=2)
    turn(model, warm, pool, max_new_tokens=2)
    short = zoo.prompt(9, seed=3)
    ids, mask = left_padded(warm, short)  # 24 pads
    cache = PooledCache(model, pool=pool)
    out = generate(model, ids, cache, attention_mask=mask, max_new_tokens=5)
    assert_same(reference(model, ids, attention_mask=mask, max_new_tokens=5), out)
    if state.checkpointed or not state.pad_invariant:
        # state at a boundary holds for a row's own alignment: the short row (24 pads, a miss) has
        # none at a column where the long one has one; V4's compressors see the pads
        assert cache.reused_tokens == [0, 0]
    else:
        assert cache.reused_tokens == [24, 0]  # C = min(0 + 32, 24 + 0) columns


def test_minimax_v1_says_it_takes_no_outside_cache():
    model = zoo.build("minimax")
    ids = zoo.prompt(12, seed=4)
    with pytest.raises(ValueError, match="takes no cache but its own"):
        PooledCache(model)
    import hf_kvpool

    hf_kvpool.enable(model)
    with pytest.warns(UserWarning, match="raises in the model: call generate\\(\\) without cache="):
        with pytest.raises(ValueError, match="MiniMax uses cache of its own"):
            model.generate(ids, cache=PooledCache(), max_new_tokens=2)
    assert model.generate(ids, max_new_tokens=2).shape == (1, 14)  # without a cache: as always


def model_state_of(model):
    PooledCache(model)  # enables it
    return model_state(model)
