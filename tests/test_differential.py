"""Randomized differential test: PooledCache against DynamicCache on random workloads.

Each case (seeded, reproducible: ``case`` is the seed) picks a tiny architecture, a block size
(1-16), a pool (large, or 1-12 blocks, sometimes with a host tier), a salt, and runs 2-4 generate()
calls whose prompts are new, prefixes or extensions of earlier prompts and outputs, or repeats, in
batches of 1-3 left-padded rows, with random settings (greedy, sampling with a seed, beam search,
num_return_sequences, max_new_tokens 1-10), sometimes through the same PooledCache object. Every
call's output must equal DynamicCache's (``helpers.pooled``: identical tokens, logits within
1e-4), and the reuse is bounded on both sides:

- never more than the longest prefix this salt has already run through the model (whatever the pool
  returns must have been computed before, under that salt: by earlier calls, or in a batch by the
  rows that caught up first);
- with a large pool, at least the full blocks shared with an earlier prompt of that salt.

After every case the bookkeeping is consistent and the counters add up.

CI runs ``HF_KVPOOL_DIFF_CASES`` cases (default 25); ``HF_KVPOOL_SOAK=1`` adds 400 more (marked ``slow``).
"""

from __future__ import annotations

import functools
import os
import random
from collections import Counter

import pytest
import torch
from helpers import pooled
from tiny_models import VOCAB, build

from hf_kvpool import KVPool, PooledCache

N_CASES = int(os.environ.get("HF_KVPOOL_DIFF_CASES", "25"))
SOAK = os.environ.get("HF_KVPOOL_SOAK") == "1"
SOAK_CASES = 400

MODELS = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("qwen2_sliding", "sdpa"),
    ("gpt_neox", "sdpa"),
    ("gemma2_sliding", "eager"),
]
TOTALS: Counter = Counter()  # what the cases exercised (read by the report)


@functools.cache
def model_for(arch: str, attn: str):
    return build(arch, attn)


def block_bytes(model, block_size: int) -> int:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * heads * block_size * head_dim * 4


def common_blocks(a: list[int], b: list[int], block_size: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n // block_size


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pads = []
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
        mask[b, length - len(r) :] = 1
        pads.append(length - len(r))
    return ids, mask, pads


def random_settings(rng: random.Random) -> dict:
    kind = rng.choice(["greedy", "greedy", "sample", "sample_n", "beams"])
    kw: dict = {"max_new_tokens": rng.randint(1, 10)}
    if kind == "sample":
        kw.update(do_sample=True, top_k=rng.choice([5, 20, 50]), temperature=rng.choice([0.7, 1.0, 1.5]))
    elif kind == "sample_n":
        kw.update(do_sample=True, top_k=20, num_return_sequences=rng.randint(2, 3))
    elif kind == "beams":
        beams = rng.randint(2, 3)
        kw.update(
            num_beams=beams, num_return_sequences=rng.randint(1, beams), max_new_tokens=rng.randint(1, 6)
        )
    kw["seed"] = rng.randrange(1000)
    return kw


def run_case(case: int) -> None:
    rng = random.Random(case)
    arch, attn = rng.choice(MODELS)
    model = model_for(arch, attn)
    bs = rng.choice([1, 2, 4, 4, 8, 16])
    small = rng.random() < 0.4
    capacity = rng.randint(1, 12) * block_bytes(model, bs) if small else None
    host = rng.randint(4, 40) * block_bytes(model, bs) if small and rng.random() < 0.4 else 0
    pool = KVPool(block_size=bs, capacity_bytes=capacity, host_capacity_bytes=host)
    salts = [None, "tenant-a", b"tenant-b"]
    seen_prompts: dict = {s: [] for s in salts}  # per salt: prompts run (their blocks are committed)
    seen_all: dict = {s: [] for s in salts}  # per salt: every token sequence the model processed
    upper_known = True  # false once a beam search may have committed blocks of beams it did not return
    cache = None
    lookups = queries = hits = 0
    for _ in range(rng.randint(2, 4)):
        salt = rng.choice(salts) if rng.random() < 0.3 else salts[0]
        history = seen_all[salt] + seen_all[None]
        rows = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            mode = rng.choice(["new", "prefix", "extend", "repeat"]) if history else "new"
            suffix = [rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 8))]
            if mode == "new":
                row = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))]
            else:
                base = rng.choice(history)
                if mode == "prefix":
                    row = base[: rng.randint(1, len(base))] + suffix
                elif mode == "extend":
                    row = base + suffix
                else:
                    row = list(base)
            # id 0 is the pad token: generate() would read it as padding (outputs can hold it)
            rows.append([t or 1 for t in row[:60]] or [1])
        ids, mask, pads = left_pad(rows)
        settings = random_settings(rng)
        if cache is None or cache.salt != salt or rng.random() < 0.7:
            cache = PooledCache(model, pool=pool, salt=salt)
        kwargs = dict(settings)
        if len(rows) > 1 or rng.random() < 0.5:
            kwargs["attention_mask"] = mask
        out, cache = pooled(model, ids, pool, cache=cache, **kwargs)

        expand = settings.get("num_beams", settings.get("num_return_sequences", 1))
        reused = cache.reused_tokens
        length = ids.shape[1]
        assert len(reused) == len(rows) * expand
        row_reused = reused[::expand]  # expanded rows are copies of their prompt row
        assert all(reused[b * expand : (b + 1) * expand] == [r] * expand for b, r in enumerate(row_reused))
        for b, (row, r) in enumerate(zip(rows, row_reused)):
            assert 0 <= r <= len(row) - 1, (b, r, len(row))
            if upper_known:
                # only what this salt already ran through the model can come from the pool: earlier
                # calls, and in a batch the rows that caught up first (each up to its last block
                # boundary before its last token, or whole: all of it but its last token, taken
                # from its catch-up; hf_kvpool/hf/catchup.py)
                batched = len(rows) * expand > 1
                caught_up = [o[: (len(o) - 1) // bs * bs] for o in rows] if batched else []
                ub = max([common_blocks(row, s, bs) for s in seen_all[salt] + caught_up], default=0) * bs
                assert r <= ub or (batched and r == len(row) - 1), (
                    f"row {b} reused {r} tokens but only {ub} were ever computed under salt {salt!r}"
                )
        if not small:
            lb = [max([common_blocks(row, s, bs) for s in seen_prompts[salt]], default=0) for row in rows]
            c_lb = min(min(p + k * bs for p, k in zip(pads, lb)), length - 1)
            for r, p in zip(row_reused, pads):
                assert r >= max(0, c_lb - p), (row_reused, c_lb, pads)
        if length >= 2:
            lookups += 1
            queries += sum(map(len, rows)) * expand
            hits += sum(reused)
        TOTALS["calls"] += 1
        TOTALS["rows"] += len(rows) * expand
        TOTALS["reused_tokens"] += sum(reused)
        # what the model processed: every prompt; generated tokens but the last (not for beams)
        seen_prompts[salt].extend(rows)
        seen_all[salt].extend(rows)
        if "num_beams" in settings:
            upper_known = False
        else:
            for r, seq in enumerate(out.sequences.tolist()):
                seen_all[salt].append(seq[pads[r // expand] : -1])
        if pool._device is not None:  # None until something was committed (e.g. one-token prompts)
            m = pool._device.manager
            m.check()
            assert all(b.pins == 0 for b in m.blocks()) and not m._reserved
    stats = pool.stats()
    assert (stats.lookups, stats.query_tokens, stats.hit_tokens) == (lookups, queries, hits)
    assert stats.stored_blocks <= stats.capacity_blocks
    assert stats.committed_blocks - stats.evicted_blocks == stats.stored_blocks
    TOTALS["cases"] += 1
    TOTALS["cases_with_reuse"] += hits > 0


@pytest.mark.parametrize("case", range(N_CASES))
def test_random_case_matches_dynamic_cache(case):
    run_case(case)


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak run: set HF_KVPOOL_SOAK=1")
@pytest.mark.parametrize("case", range(10_000, 10_000 + SOAK_CASES) if SOAK else [])
def test_random_case_matches_dynamic_cache_soak(case):
    run_case(case)
