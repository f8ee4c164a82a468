"""Microbenchmark: the time to commit one completed block while decoding, against the context length.

Not a test: it prints one markdown table and writes JSON. A :class:`~hf_kvpool.hf.tracker.CallTracker`
(what a ``generate()`` call commits with) over a torch ``KVPool``, no model: the prompt's K/V for
``--layers`` layers (2 KV heads x 16 dims, float32: small, so the bookkeeping shows) is committed
as a prefill; then decode steps hand it one column per layer and one token id each, and every
``commit_if_due`` that completes a block is timed (hashing, the pool's bookkeeping, the scatter of
that block, trimming). Reported: the median over ``--blocks`` completed blocks per context, and its
ratio to the shortest context.

    python scripts/bench_commit.py                      # 2k / 32k / 128k tokens
    python scripts/bench_commit.py --contexts 2048 8192 --blocks 32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import environment  # noqa: E402

from hf_kvpool import KVPool  # noqa: E402
from hf_kvpool.core.hashing import block_hashes  # noqa: E402
from hf_kvpool.hf.tracker import CallTracker  # noqa: E402

HEADS, DIM = 2, 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 32768, 131072])
    p.add_argument("--blocks", type=int, default=64, help="completed blocks timed per context")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="docs/results/bench_commit.json")
    return p.parse_args()


def _kind():
    """A full-attention layer as the tracker sees it (no derived streams, no state)."""
    return SimpleNamespace(checkpointed=False, pad_invariant=True, derives=False)


def commit_times(context: int, blocks: int, bs: int, layers: int) -> list[float]:
    """Seconds per completed-block commit at ``context`` tokens of history."""
    g = torch.Generator().manual_seed(context)
    pool = KVPool(
        block_size=bs, capacity_bytes=2 * (context + (blocks + 2) * bs) * layers * 2 * HEADS * DIM * 4
    )
    namespace = b"\x01" * 16
    prompt = torch.randint(1, 50_000, (context,), generator=g).numpy()
    tracker = CallTracker(
        pool,
        namespace,
        None,
        [_kind() for _ in range(layers)],
        [0],
        [prompt],
        [block_hashes(prompt, bs, namespace)],
        0,
    )
    # the prefill: every layer's K and V for the whole prompt, committed at once
    for layer in range(layers):
        kv = torch.randn(1, HEADS, context, DIM, generator=g)
        tracker.record(layer, {"keys": kv, "values": kv.clone()})
    tracker.reach(context)
    tracker.commit_if_due()
    times: list[float] = []
    ids = torch.randint(1, 50_000, (blocks * bs, 1, 1), generator=g)
    column = torch.randn(layers, 2, 1, HEADS, 1, DIM, generator=g)
    for step in range(blocks * bs):
        for layer in range(layers):
            tracker.record(layer, {"keys": column[layer, 0], "values": column[layer, 1]})
        tracker.add_tokens(ids[step])
        start = time.perf_counter()
        written = tracker.commit_if_due()
        took = time.perf_counter() - start
        if written:
            times.append(took)
    assert len(times) == blocks, (len(times), blocks)
    assert pool.stats().stored_blocks == context // bs + blocks
    return times


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)
    commit_times(args.contexts[0], 4, args.block_size, args.layers)  # warm-up
    rows = []
    for context in args.contexts:
        times = commit_times(context, args.blocks, args.block_size, args.layers)
        rows.append(
            dict(
                context=context,
                median_us=statistics.median(times) * 1e6,
                p90_us=np.percentile(times, 90) * 1e6,
            )
        )
    base = rows[0]["median_us"]
    print(
        f"| context (tokens) | commit per completed block, median (us) | p90 (us) | vs {args.contexts[0]} |"
    )
    print("|---:|---:|---:|---:|")
    for r in rows:
        r["ratio"] = r["median_us"] / base
        print(f"| {r['context']:,} | {r['median_us']:.0f} | {r['p90_us']:.0f} | {r['ratio']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                date=dt.date.today().isoformat(),
                args=vars(args),
                environment=environment("cpu"),
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
