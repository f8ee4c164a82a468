"""Benchmark: several threads generating at once on one model and one pool, against one thread.

Not a test: it prints one markdown table and writes JSON. The work: ``--threads`` agent sessions
on a tiny random-weight Llama (``workloads.tiny_llama``), each ``--calls`` greedy ``generate()``
calls with a fresh ``PooledCache`` on one shared ``KVPool``: a shared system prompt of
``--system`` tokens, then per session a growing history (each call's prompt is the previous output
plus ``--turn`` new tokens), ``--new`` tokens generated per call. The same sessions run

- ``1 thread``: one after the other on one thread;
- ``N threads``: each session on its own thread, all at once;

each on a fresh pool, torch at one intra-op thread per Python thread (so threads, not torch's pool,
share the cores), ``--repeats`` times alternating, best wall time kept. Throughput = tokens
generated / wall time; the ratio N threads / 1 thread shows how much of the work overlaps (the
model's forwards release the GIL; the pool's lock serialises what runs under it). The pool's lock
is timed too (a wrapper around it): seconds it was held, summed over threads, as a share of the
wall time, a measure of what the threads must do one at a time that noise on a shared machine
disturbs less than throughput. The outputs of both runs are compared token for token.

    python scripts/bench_threads.py                  # 4 threads
    python scripts/bench_threads.py --threads 4 --calls 4 --system 1024
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import environment, tiny_llama  # noqa: E402

from hf_kvpool import KVPool, PooledCache  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--calls", type=int, default=4, help="generate() calls per session")
    p.add_argument("--system", type=int, default=768, help="shared system prompt tokens")
    p.add_argument("--turn", type=int, default=96, help="new prompt tokens per call")
    p.add_argument("--new", type=int, default=24, help="tokens generated per call")
    p.add_argument("--size", default="quick", help="workloads.MODEL_SIZES entry")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--label", default="", help="a name for this code version, kept in the JSON")
    p.add_argument("--out", default="docs/results/bench_threads.json")
    return p.parse_args()


class TimedLock:
    """The pool's RLock, timing how long it is held (outermost acquisitions only)."""

    def __init__(self, lock):
        self._lock, self.held, self._depth, self._since = lock, 0.0, threading.local(), {}

    def __enter__(self):
        self._lock.acquire()
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        if depth == 0:
            self._since[threading.get_ident()] = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._depth.n -= 1
        if self._depth.n == 0:
            self.held += time.perf_counter() - self._since.pop(threading.get_ident())
        self._lock.release()


def session(model, pool: KVPool, system: torch.Tensor, seed: int, args) -> tuple[int, list[torch.Tensor]]:
    """One agent session; returns (tokens generated, outputs)."""
    g = torch.Generator().manual_seed(seed)
    ids = system
    outs = []
    for _ in range(args.calls):
        ids = torch.cat([ids, torch.randint(3, 4096, (1, args.turn), generator=g)], dim=1)
        out = model.generate(
            ids, cache=PooledCache(model, pool=pool), max_new_tokens=args.new, do_sample=False
        )
        outs.append(out)
        ids = out
    return args.calls * args.new, outs


def run(model, system, args, threads: int) -> tuple[float, list[list[torch.Tensor]]]:
    """Wall seconds for every session (on ``threads`` threads: 1 or one per session), and outputs."""
    pool = KVPool(block_size=16)
    pool._lock = timed = TimedLock(pool._lock)
    results: list = [None] * args.threads
    errors: list[BaseException] = []

    def work(indices):
        torch.set_num_threads(1)
        try:
            for i in indices:
                results[i] = session(model, pool, system, 100 + i, args)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    groups = [list(range(args.threads))] if threads == 1 else [[i] for i in range(args.threads)]
    workers = [threading.Thread(target=work, args=(g,)) for g in groups]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    run.lock_held = timed.held
    return wall, [outs for _, outs in results]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    model = tiny_llama(args.size)
    system = torch.randint(3, 4096, (1, args.system), generator=torch.Generator().manual_seed(0))
    generated = args.threads * args.calls * args.new
    session(model, KVPool(block_size=16), system[:, :64], 0, argparse.Namespace(**{**vars(args), "calls": 1}))
    best = {1: float("inf"), args.threads: float("inf")}
    held = dict(best)
    outputs = {}
    for _ in range(args.repeats):
        for threads in (1, args.threads):
            wall, outs = run(model, system, args, threads)
            if wall < best[threads]:
                best[threads], held[threads] = wall, run.lock_held
            outputs[threads] = outs
    identical = all(
        torch.equal(a, b) for s1, sn in zip(outputs[1], outputs[args.threads]) for a, b in zip(s1, sn)
    )
    rows = [
        dict(threads=t, wall_s=w, tokens_per_s=generated / w, lock_held_s=held[t], lock_share=held[t] / w)
        for t, w in best.items()
    ]
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(
        f"| threads | wall (s) | generated tokens/s | vs 1 thread | lock held, s (share of wall) | {args.label}"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | {r['lock_held_s']:.3f} ({r['lock_share']:.1%}) |"
        )
    print(f"outputs identical across runs: {identical}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                date=dt.date.today().isoformat(),
                label=args.label,
                args=vars(args),
                environment=environment("cpu"),
                rows=rows,
                ratio=ratio,
                identical=identical,
            ),
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
