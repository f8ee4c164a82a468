"""Replay a Mooncake-format trace through a PooledCache: hit rate vs the ideal, vs capacity, and TTFT.

What it measures.

1. Hit rate. The first ``--limit`` requests of the trace (JSONL; see ``../shared/traces/README.md``)
   run in order through ``model.generate(..., cache=PooledCache(...), max_new_tokens=1)`` on a
   *micro* random-weight model (1 layer, hidden 32: the pool's bookkeeping is what is measured, not
   the model). Each hash id becomes a fixed pseudo-random run of ``--block-tokens`` tokens (512 in
   the original trace; prompt lengths scale alike) and the pool's block size is ``--block-tokens``,
   so pool blocks line up with the trace's blocks. The pool's hit rate (prompt tokens served from
   the pool / prompt tokens, from ``PooledCache.reused_tokens``) is reported next to the ideal hit
   rate of an infinite prefix cache, computed from the hash ids alone
   (``scripts/workloads.py``).
2. Hit rate versus capacity: the same replay with pools of several sizes (``--curve``: fractions of
   the trace's footprint, the distinct blocks an infinite cache would hold), plotted to a PNG.
   A capacity of ``n`` blocks is ``KVPool(capacity_bytes=n * bytes_per_block)``, bytes per block
   measured on a probe pool.
   With ``--host-tier F`` and/or ``--redis`` (or ``--remote URL``), every capacity point also runs
   with a host-memory tier of ``F`` x the footprint, and with a Redis tier (a fresh database per
   run; ``--redis`` starts a private ``redis-server`` on a loopback port), so the plot shows what
   the lower tiers add to a small device pool.
3. TTFT stateless vs pooled on ``--ttft-sample`` requests spread evenly over the replayed window,
   on the benchmark model (``--model-size``, or ``--model PATH``): for each sampled request, the
   earlier request that holds its reusable prefix (if any) runs first, untimed, into an emptied pool;
   then the request runs timed with a ``DynamicCache`` and with a ``PooledCache``.

    python scripts/replay_trace.py                                  # whole trace, ~2 min on 2 CPU cores
    python scripts/replay_trace.py --curve 0.02,0.05,0.1,0.25,0.5   # a finer curve (~30 s a point)
    python scripts/replay_trace.py --limit 1000                     # a shorter run
    python scripts/replay_trace.py --limit 1000 --host-tier 1 --redis   # with the lower tiers
    python scripts/replay_trace.py --trace other.jsonl --block-tokens 32 --capacity 5000
    python scripts/replay_trace.py --device cuda --model /path/to/checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from redis_server import local_redis_server
from tqdm import tqdm
from transformers import DynamicCache
from workloads import environment, load_mooncake, tiny_llama, trace_ideal_hits, trace_prompt

import hf_kvpool
from hf_kvpool import KVPool, PooledCache

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake-format JSONL (default: %(default)s)")
    p.add_argument(
        "--block-tokens", type=int, default=16, help="tokens per hash id (512 in the original trace)"
    )
    p.add_argument("--limit", type=int, default=0, help="replay the first N requests (default 0: all)")
    p.add_argument(
        "--capacity",
        default="unlimited",
        help="pool capacity of the main replay: blocks (an int), bytes with a suffix (64MiB, 1GiB), or "
        "'unlimited' (room for every block of the replayed requests)",
    )
    p.add_argument(
        "--curve",
        default="0.1,0.5",
        help="capacities for the curve, as fractions of the footprint",
    )
    p.add_argument(
        "--host-tier",
        type=float,
        default=0.0,
        help="also run with a host tier of this fraction of the footprint",
    )
    p.add_argument(
        "--redis", action="store_true", help="also run with a Redis tier (starts a local redis-server)"
    )
    p.add_argument(
        "--remote", default=None, help="also run with the Redis tier at this URL (its db is flushed)"
    )
    p.add_argument("--ttft-sample", type=int, default=24, help="requests timed stateless vs pooled (0: skip)")
    p.add_argument("--model-size", default="quick", help="built-in model for the TTFT sample")
    p.add_argument("--model", default=None, help="local checkpoint for the TTFT sample (local_files_only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash-id -> tokens map")
    p.add_argument("--out", default=None, help="results folder, or a .json path; default results/")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_capacity(text: str, per_block: int) -> int | None:
    """Capacity in blocks (None: unlimited) from '123', '64MiB', '1GiB', 'unlimited'."""
    t = text.strip().lower()
    if t in ("unlimited", "inf", "none", "0"):
        return None
    for suffix, mult in (("gib", 2**30), ("mib", 2**20), ("kib", 2**10), ("b", 1)):
        if t.endswith(suffix):
            return max(1, int(float(t[: -len(suffix)]) * mult) // per_block)
    return int(t)


def bytes_per_block(model, block_size: int, device) -> int:
    """Bytes one pool block takes for ``model``: from a probe pool filled by one tiny call."""
    probe = KVPool(capacity_bytes=1 << 24, block_size=block_size)
    ids = torch.arange(3, 3 + block_size + 1, device=device)[None]
    model.generate(ids, cache=PooledCache(model, pool=probe), max_new_tokens=1, do_sample=False)
    s = probe.stats()
    return s.capacity_bytes // s.capacity_blocks


@contextlib.contextmanager
def local_redis():
    """A private redis-server for this run; yields its URL."""
    try:
        with local_redis_server() as (url, _):
            yield url
    except FileNotFoundError as exc:
        raise SystemExit(f"--redis: {exc}; or pass --remote URL") from exc


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def replay(model, prompts, block_size, capacity_blocks, per_block, desc, progress, **tiers) -> dict:
    """Run every prompt in order through one fresh pool; per-request reuse and the pool's counters.

    ``tiers``: ``host_capacity_bytes`` and/or ``remote`` for :class:`KVPool`.
    """
    if tiers.get("remote"):
        flush_redis(tiers["remote"])
    pool = KVPool(capacity_bytes=capacity_blocks * per_block, block_size=block_size, **tiers)
    reused = []
    t0 = time.perf_counter()
    for ids in tqdm(prompts, desc=desc, disable=not progress, leave=False):
        cache = PooledCache(model, pool=pool)
        model.generate(ids, cache=cache, max_new_tokens=1, do_sample=False)
        reused.append(int(cache.reused_tokens[0]) if cache.reused_tokens else 0)
    s = pool.stats()
    prompt_tokens = sum(int(p.shape[1]) for p in prompts)
    return dict(
        capacity_blocks=s.capacity_blocks,
        capacity_bytes=s.capacity_bytes,
        hit_rate=sum(reused) / prompt_tokens,
        reused_tokens=sum(reused),
        prompt_tokens=prompt_tokens,
        pool_hit_rate=s.hit_rate,  # over the tokens looked up (1-token prompts are not)
        stored_blocks=s.stored_blocks,
        evicted_blocks=s.evicted_blocks,
        committed_blocks=s.committed_blocks,
        host_hit_blocks=s.host_hit_blocks,
        remote_hit_blocks=s.remote_hit_blocks,
        remote_errors=s.remote_errors,
        seconds=time.perf_counter() - t0,
        reused=reused,
    )


def timed(model, ids, cache, device) -> float:
    """TTFT (s) of a one-token generate(): the prefill plus the first token."""
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=1, do_sample=False)
    sync(device)
    return time.perf_counter() - t0


def ttft_sample(args, requests, ideal, donors, device, progress) -> dict:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype or "auto")
        model = model.to(device).eval()
        vocab = int(model.config.get_text_config().vocab_size)
    else:
        model, vocab = tiny_llama(args.model_size, device=device, dtype=dtype), 4096
    pool = KVPool(block_size=args.block_tokens)
    hf_kvpool.enable(model, pool=pool)

    def ids_of(i):
        p = trace_prompt(requests[i], args.block_tokens, vocab_size=vocab, seed=args.seed)
        return torch.as_tensor(p, device=device)[None]

    n = len(requests)
    picks = sorted({int(round(x)) for x in np.linspace(n // 10, n - 1, args.ttft_sample)})
    for i in picks[:2]:  # warm-up, untimed
        timed(model, ids_of(i), DynamicCache(config=model.config), device)
        timed(model, ids_of(i), PooledCache(model, pool=pool), device)
    rows = []
    for i in tqdm(picks, desc="ttft sample", disable=not progress, leave=False):
        pool.clear()
        if donors[i] is not None:
            model.generate(
                ids_of(donors[i]), cache=PooledCache(model, pool=pool), max_new_tokens=1, do_sample=False
            )
        ids = ids_of(i)
        cache = PooledCache(model, pool=pool)
        t_pooled = timed(model, ids, cache, device)
        t_stateless = timed(model, ids, DynamicCache(config=model.config), device)
        rows.append(
            dict(
                request=i,
                prompt_tokens=int(ids.shape[1]),
                ideal_reused_tokens=ideal[i],
                reused_tokens=int(cache.reused_tokens[0]),
                ttft_stateless_s=t_stateless,
                ttft_pooled_s=t_pooled,
            )
        )
    st = [r["ttft_stateless_s"] for r in rows]
    po = [r["ttft_pooled_s"] for r in rows]
    prompt = sum(r["prompt_tokens"] for r in rows)
    return dict(
        model=args.model or f"tiny_llama:{args.model_size}",
        requests=len(rows),
        hit_rate=sum(r["reused_tokens"] for r in rows) / prompt,
        ttft_stateless_mean_s=statistics.fmean(st),
        ttft_pooled_mean_s=statistics.fmean(po),
        ttft_stateless_p50_s=float(np.median(st)),
        ttft_pooled_p50_s=float(np.median(po)),
        ttft_reduction=1 - sum(po) / sum(st),
        input_throughput_stateless_tok_s=prompt / sum(st),
        input_throughput_pooled_tok_s=prompt / sum(po),
        rows=rows,
    )


def plot(
    curve: list[dict], ideal_rate: float, footprint: int, path: Path, title: str, tiered: dict | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [c["capacity_blocks"] / footprint for c in curve]
    ax.plot(xs, [100 * c["hit_rate"] for c in curve], "o-", label="device pool only (LRU)")
    for label, points in (tiered or {}).items():
        ax.plot(
            [c["capacity_blocks"] / footprint for c in points],
            [100 * c["hit_rate"] for c in points],
            "s--",
            label=label,
        )
    ax.axhline(100 * ideal_rate, color="k", ls="--", label=f"ideal, infinite cache ({100 * ideal_rate:.1f}%)")
    ax.set(
        xscale="log",
        xlabel=f"device pool capacity / trace footprint ({footprint:,} blocks)",
        ylabel="prompt tokens reused (%)",
        title=title,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    progress = not args.no_progress
    t_start = time.perf_counter()

    requests = load_mooncake(args.trace, args.limit or None)
    bt = args.block_tokens
    donors: list = []
    ideal, lengths = trace_ideal_hits(requests, bt, donors=donors)
    ideal512, lengths512 = trace_ideal_hits(requests, 512)
    # distinct full blocks (id paths) of the replayed window = what an infinite cache holds
    paths = set()
    for r, n in zip(requests, lengths):
        for j in range(1, n // bt + 1):
            paths.add(r.hash_ids[:j])
    footprint = len(paths)
    del paths
    ideal_rate = sum(ideal) / sum(lengths)
    print(
        f"replay_trace: {len(requests)} requests of {args.trace}, {bt} tokens per hash id, "
        f"{sum(lengths):,} prompt tokens, footprint {footprint:,} blocks, ideal hit rate {100 * ideal_rate:.2f}% "
        f"(at 512 tokens per block: {100 * sum(ideal512) / sum(lengths512):.2f}%)",
        file=sys.stderr,
    )

    model = tiny_llama("micro", device=device)
    per_block = bytes_per_block(model, bt, device)
    prompts = [
        torch.as_tensor(trace_prompt(r, bt, vocab_size=4096, seed=args.seed), device=device)[None]
        for r in requests
    ]
    main_blocks = parse_capacity(args.capacity, per_block) or footprint + 1
    main_run = replay(model, prompts, bt, main_blocks, per_block, "replay", progress)
    curve = []
    fractions = sorted({float(x) for x in args.curve.split(",") if x.strip()})
    for f in tqdm(fractions, desc="capacity curve", disable=not progress):
        blocks = max(1, int(f * footprint))
        if blocks == main_blocks:
            curve.append({**main_run, "fraction": f})
            continue
        curve.append(
            {**replay(model, prompts, bt, blocks, per_block, f"capacity {f:g}", progress), "fraction": f}
        )
    if main_blocks > footprint:  # the unlimited point of the curve
        curve.append({**main_run, "fraction": main_blocks / footprint})
    else:
        full = replay(model, prompts, bt, footprint + 1, per_block, "unlimited", progress)
        curve.append({**full, "fraction": full["capacity_blocks"] / footprint})
    curve.sort(key=lambda c: c["capacity_blocks"])

    tiered = {}
    tier_configs = []
    if args.host_tier > 0:
        host_bytes = int(args.host_tier * footprint * (per_block + 8 * bt + 32))
        tier_configs.append(
            (f"+ host tier ({args.host_tier:g} x footprint)", dict(host_capacity_bytes=host_bytes))
        )
    with contextlib.ExitStack() as stack:
        url = args.remote or (stack.enter_context(local_redis()) if args.redis else None)
        if url:
            tier_configs.append(("+ Redis tier", dict(remote=url)))
        for label, tier_kwargs in tier_configs:
            points = []
            for c in tqdm(
                [c for c in curve if c["capacity_blocks"] <= footprint], desc=label, disable=not progress
            ):
                run = replay(
                    model, prompts, bt, c["capacity_blocks"], per_block, label, progress, **tier_kwargs
                )
                points.append({**run, "fraction": c["capacity_blocks"] / footprint})
            tiered[label] = points

    ttft = None
    if args.ttft_sample:
        ttft = ttft_sample(args, requests, ideal, donors, device, progress)

    # ---- report
    gap = 100 * (ideal_rate - main_run["hit_rate"])
    print(f"\n### Replay of {Path(args.trace).name}: {len(requests)} requests, {bt} tokens per block\n")
    print(
        "| pool capacity (blocks) | of footprint | hit rate | ideal (infinite) | evicted blocks | replay time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for c in curve:
        mark = " (main)" if c["capacity_blocks"] == main_run["capacity_blocks"] else ""
        print(
            f"| {c['capacity_blocks']:,}{mark} | {c['capacity_blocks'] / footprint:.2f} | {100 * c['hit_rate']:.2f}% "
            f"| {100 * ideal_rate:.2f}% | {c['evicted_blocks']:,} | {c['seconds']:.1f} |"
        )
    unlimited = main_blocks > footprint
    print(
        f"\n- main replay ({'unlimited' if unlimited else f'{main_blocks:,} blocks'}): hit rate "
        f"{100 * main_run['hit_rate']:.2f}% vs ideal {100 * ideal_rate:.2f}% (gap {gap:.2f} pp)"
        + (
            f" -> target 'within 1 pp at unlimited capacity' {'met' if abs(gap) <= 1 else 'MISSED'}"
            if unlimited
            else ""
        )
    )
    mism = sum(a != b for a, b in zip(main_run["reused"], ideal)) if unlimited else None
    if unlimited:
        print(f"- requests whose reuse differs from the ideal: {mism}")
    if tiered:
        print("\n| device capacity (blocks) | device only | " + " | ".join(tiered) + " |")
        print("|---|---|" + "---|" * len(tiered))
        for i, c in enumerate([c for c in curve if c["capacity_blocks"] <= footprint]):
            cells = " | ".join(f"{100 * tiered[label][i]['hit_rate']:.2f}%" for label in tiered)
            print(f"| {c['capacity_blocks']:,} | {100 * c['hit_rate']:.2f}% | {cells} |")
    if ttft:
        print(
            f"\n| TTFT on {ttft['requests']} sampled requests ({ttft['model']}) | mean (s) | p50 (s) | input throughput |\n"
            "|---|---|---|---|\n"
            f"| stateless | {ttft['ttft_stateless_mean_s']:.3f} | {ttft['ttft_stateless_p50_s']:.3f} "
            f"| {ttft['input_throughput_stateless_tok_s']:,.0f} tok/s |\n"
            f"| pooled (hit rate {100 * ttft['hit_rate']:.1f}%) | {ttft['ttft_pooled_mean_s']:.3f} "
            f"| {ttft['ttft_pooled_p50_s']:.3f} | {ttft['input_throughput_pooled_tok_s']:,.0f} tok/s |\n\n"
            f"- TTFT reduction {100 * ttft['ttft_reduction']:.1f}%"
        )

    out = Path(args.out) if args.out else REPO / "results"
    if out.suffix == ".json":
        json_path = out
    else:
        json_path = out / "replay_trace.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path = json_path.with_suffix(".png")
    elapsed = time.perf_counter() - t_start
    main_run_out = {k: v for k, v in main_run.items() if k != "reused"}
    result = dict(
        benchmark="replay_trace",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv[1:],
        args=vars(args),
        environment=environment(device),
        requests=len(requests),
        prompt_tokens=sum(lengths),
        footprint_blocks=footprint,
        bytes_per_block_micro_model=per_block,
        ideal_hit_rate=ideal_rate,
        ideal_hit_rate_512=sum(ideal512) / sum(lengths512),
        main=main_run_out,
        main_unlimited=unlimited,
        gap_pp=gap,
        target_within_1pp=(abs(gap) <= 1) if unlimited else None,
        requests_differing_from_ideal=mism,
        curve=[{k: v for k, v in c.items() if k != "reused"} for c in curve],
        tiered={
            label: [{k: v for k, v in c.items() if k != "reused"} for c in points]
            for label, points in tiered.items()
        },
        ttft=ttft,
        elapsed_s=elapsed,
    )
    json_path.write_text(json.dumps(result, indent=1))
    plot(
        curve,
        ideal_rate,
        footprint,
        png_path,
        f"{Path(args.trace).name}: {len(requests)} requests, {bt} tok/block",
        tiered,
    )
    print(f"- wrote {json_path} and {png_path} in {elapsed:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
