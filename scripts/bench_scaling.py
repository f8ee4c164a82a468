"""The pool's own cost against context length: pooled vs a kept DynamicCache vs stateless.

Sections (each call timed alone; modes alternate call by call, rotating which goes first; medians):

- ``tiny``: a tiny random Llama (hidden 64, 2 layers, 2 KV heads of 16), so the pool's own work
  shows: a prompt of ``L`` cached tokens + 16 new ones, ``max_new_tokens=1``, for L = 2k..128k.
  ``oracle``: a ``DynamicCache`` the caller kept holding the L tokens (cropped back after each
  call); ``pooled``: a fresh ``PooledCache`` per call on a pool holding the L tokens; ``pooled-live``:
  one ``PooledCache`` reused call after call (it may continue from what it held); ``stateless``:
  a fresh ``DynamicCache`` (only up to ``--stateless-max``: attention over 128k tokens takes minutes).
  Every call has its own 16 new tokens, so no mode finds another's.
- ``decode``: per L, ms per generated token (pooled vs DynamicCache) and the time to commit one
  completed block while decoding (``CallTracker.commit_if_due`` calls that write blocks).
- ``smollm2``: the seed regime on the real model (``scripts/smollm2.py``): one session of real text,
  ~6k tokens of history, each turn +200 tokens and the previous answer; TTFT per turn of pooled,
  pooled-live and oracle (order rotating), stateless on the first ``--stateless-turns`` turns.
- ``rss``: resident memory over ``--rss-calls`` calls on a small evicting pool.

    python scripts/bench_scaling.py --quick        # smoke: L = 2k, 8k, no SmolLM2 (~1 min)
    python scripts/bench_scaling.py                # everything (~15 min on 2 CPU cores)
    python scripts/bench_scaling.py --sections tiny,decode --lengths 2048,131072

Writes ``docs/results/bench_scaling.json`` (``--out``) and a log-log plot next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_agent import timed_generate
from transformers import DynamicCache
from workloads import environment

import hf_kvpool
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.hf import tracker as tracker_module

SECTIONS = ("tiny", "decode", "smollm2", "rss")
NEW = 16  # new tokens per call (tiny section)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="L = 2k, 8k; 3 reps; no SmolLM2; 100 RSS calls")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--lengths", default="2048,8192,32768,131072")
    p.add_argument("--reps", type=int, default=5, help="timed calls per mode and length")
    p.add_argument("--stateless-max", type=int, default=8192, help="largest L with a stateless call")
    p.add_argument("--decode-tokens", type=int, default=33)
    p.add_argument("--turns", type=int, default=5, help="SmolLM2 turns measured")
    p.add_argument("--stateless-turns", type=int, default=2, help="SmolLM2 turns with a stateless call")
    p.add_argument("--history", type=int, default=6000, help="SmolLM2 history before the first turn")
    p.add_argument("--rss-calls", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results/bench_scaling.json")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.reps, args.rss_calls = "2048,8192", 3, 100
        if args.sections == ",".join(SECTIONS):
            args.sections = "tiny,decode,rss"
    return args


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def tiny_model(max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len + 1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def fill(model, pool: KVPool, ids: np.ndarray, chunk: int = 1024) -> DynamicCache:
    """Put ``ids`` in ``pool`` (forwards of ``chunk`` tokens on a PooledCache) and return a
    DynamicCache holding the same K/V (the oracle's)."""
    cache = PooledCache(model, pool=pool)
    t = torch.as_tensor(ids)[None]
    for s in range(0, t.shape[1], chunk):
        model(input_ids=t[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    oracle = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        oracle.update(layer.keys.clone(), layer.values.clone(), i)
    return oracle


def crop_to(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def rotate(modes: list, k: int) -> list:
    k %= len(modes)
    return modes[k:] + modes[:k]


# ---------------------------------------------------------------------------- tiny
def run_tiny(model, lengths, args) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for L in lengths:
        pool = KVPool(block_size=16, capacity_bytes=max(256 << 20, 3 * L * 2 * 2 * 2 * 16 * 4))
        base = rng.integers(3, 4096, L, dtype=np.int64)
        t0 = time.perf_counter()
        oracle = fill(model, pool, base)
        fill_s = time.perf_counter() - t0
        live = PooledCache(model, pool=pool)
        times: dict[str, list[float]] = {"oracle": [], "pooled": [], "pooled-live": [], "stateless": []}
        outs: dict[str, list] = {m: [] for m in times}
        modes = ["oracle", "pooled", "pooled-live"] + (["stateless"] if L <= args.stateless_max else [])
        for rep in range(args.reps + 1):  # rep 0: warm-up, not counted
            for mode in rotate(modes, rep):
                suffix = rng.integers(3, 4096, NEW, dtype=np.int64)
                ids = torch.as_tensor(np.concatenate([base, suffix]))[None]
                if mode == "oracle":
                    cache = oracle
                elif mode == "pooled":
                    cache = PooledCache(model, pool=pool)
                elif mode == "pooled-live":
                    cache = live
                else:
                    cache = DynamicCache(config=model.config)
                out, ttft, lat = timed_generate(model, ids, cache, 1, torch.device("cpu"))
                if mode == "oracle":
                    crop_to(oracle, L)
                if mode.startswith("pooled") and rep > 0:
                    outs[mode].append(cache.reused_tokens[0])
                if rep > 0:
                    times[mode].append(lat)
                del cache
        row = dict(L=L, fill_s=fill_s, **{f"{m}_ms": med(v) * 1e3 for m, v in times.items() if v})
        row["pooled/oracle"] = row["pooled_ms"] / row["oracle_ms"]
        row["pooled-live/oracle"] = row["pooled-live_ms"] / row["oracle_ms"]
        row["reused"] = {m: sorted(set(v)) for m, v in outs.items() if v}
        row["samples_ms"] = {m: [x * 1e3 for x in v] for m, v in times.items() if v}
        rows.append(row)
        print(
            f"tiny L={L:>6}: oracle {row['oracle_ms']:.1f} ms, pooled {row['pooled_ms']:.1f} ms "
            f"({row['pooled/oracle']:.2f}x), pooled-live {row['pooled-live_ms']:.1f} ms "
            f"({row['pooled-live/oracle']:.2f}x)"
            + (f", stateless {row['stateless_ms']:.1f} ms" if "stateless_ms" in row else ""),
            flush=True,
        )
        del oracle, live, pool
    return rows


# ---------------------------------------------------------------------------- decode
class TokenTimes:
    """A streamer noting when each new token arrives."""

    def __init__(self):
        self.t: list[float] = []
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts >= 2:
            self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


class CommitTimer:
    """Times ``CallTracker.commit_if_due`` calls that write blocks while decoding."""

    def __init__(self):
        self.times: list[float] = []
        self._orig = tracker_module.CallTracker.commit_if_due

    def __enter__(self):
        orig, times = self._orig, self.times

        def timed(tracker):
            t0 = time.perf_counter()
            written = orig(tracker)
            if written and tracker.decoding:
                times.append(time.perf_counter() - t0)
            return written

        tracker_module.CallTracker.commit_if_due = timed
        return self

    def __exit__(self, *exc):
        tracker_module.CallTracker.commit_if_due = self._orig


def run_decode(model, lengths, args) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    n = args.decode_tokens
    reps = max(2, args.reps // 2)
    for L in lengths:
        pool = KVPool(block_size=16, capacity_bytes=max(256 << 20, 3 * L * 2 * 2 * 2 * 16 * 4))
        base = rng.integers(3, 4096, L, dtype=np.int64)
        oracle = fill(model, pool, base)
        per_token: dict[str, list[float]] = {"pooled": [], "dynamic": []}
        commits: list[float] = []
        for rep in range(reps + 1):
            for mode in rotate(["pooled", "dynamic"], rep):
                ids = torch.as_tensor(np.concatenate([base, rng.integers(3, 4096, NEW, dtype=np.int64)]))[
                    None
                ]
                cache = PooledCache(model, pool=pool) if mode == "pooled" else oracle
                streamer = TokenTimes()
                with CommitTimer() as timer:
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        past_key_values=cache,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        streamer=streamer,
                    )
                if mode == "dynamic":
                    crop_to(oracle, L)
                if rep > 0:
                    per_token[mode].append((streamer.t[-1] - streamer.t[0]) / (len(streamer.t) - 1))
                    if mode == "pooled":
                        commits.extend(timer.times)
        row = dict(
            L=L,
            pooled_ms_per_token=med(per_token["pooled"]) * 1e3,
            dynamic_ms_per_token=med(per_token["dynamic"]) * 1e3,
            commit_block_ms=med(commits) * 1e3,
            commit_samples=len(commits),
        )
        rows.append(row)
        print(
            f"decode L={L:>6}: pooled {row['pooled_ms_per_token']:.2f} ms/token, DynamicCache "
            f"{row['dynamic_ms_per_token']:.2f} ms/token, commit of one block {row['commit_block_ms']:.3f} ms",
            flush=True,
        )
        del oracle, pool
    if rows:
        rows[0]["commit_vs_first"] = 1.0
        for r in rows[1:]:
            r["commit_vs_first"] = r["commit_block_ms"] / rows[0]["commit_block_ms"]
    return rows


# ---------------------------------------------------------------------------- smollm2
def run_smollm2(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2 import load_smollm2
    from source_text import TextTokens

    model, tokenizer = load_smollm2()
    model.generation_config.eos_token_id = None
    text = TextTokens(tokenizer).ids
    n_answer = 8
    history = text[: args.history].copy()
    cursor = args.history
    pool_a, pool_b = KVPool(block_size=16), KVPool(block_size=16)
    dev = torch.device("cpu")
    # set-up (untimed): the history in both pools and in the oracle's cache
    fill_cache = PooledCache(model, pool=pool_a)
    out, _, _ = timed_generate(model, torch.as_tensor(history)[None], fill_cache, n_answer, dev)
    held = np.concatenate([history, out])
    oracle = DynamicCache(config=model.config)
    for i, layer in enumerate(fill_cache.layers):
        oracle.update(layer.keys.clone(), layer.values.clone(), i)
    live = PooledCache(model, pool=pool_b)
    timed_generate(model, torch.as_tensor(history)[None], live, n_answer, dev)
    del fill_cache
    history = held
    turns = []
    for turn in range(args.turns):
        history = np.concatenate([history, text[cursor : cursor + 200]])
        cursor += 200
        ids = torch.as_tensor(history)[None]
        modes = ["pooled", "pooled-live", "oracle"] + (["stateless"] if turn < args.stateless_turns else [])
        rec = dict(turn=turn, prompt_tokens=len(history))
        answers = {}
        for mode in rotate(modes, turn):
            cache = {
                "pooled": lambda: PooledCache(model, pool=pool_a),
                "pooled-live": lambda: live,
                "oracle": lambda: oracle,
                "stateless": lambda: DynamicCache(config=model.config),
            }[mode]()
            out, ttft, lat = timed_generate(model, ids, cache, n_answer, dev)
            answers[mode] = out
            rec[f"{mode}_ttft_s"], rec[f"{mode}_latency_s"] = ttft, lat
            if mode.startswith("pooled"):
                rec[f"{mode}_reused"] = int(cache.reused_tokens[0])
        rec["same_answers"] = all(np.array_equal(a, answers["oracle"]) for a in answers.values())
        rec["pooled/oracle"] = rec["pooled_ttft_s"] / rec["oracle_ttft_s"]
        rec["pooled-live/oracle"] = rec["pooled-live_ttft_s"] / rec["oracle_ttft_s"]
        history = np.concatenate([history, answers["oracle"]])
        turns.append(rec)
        print(
            f"smollm2 turn {turn} ({len(ids[0])} tokens): oracle {rec['oracle_ttft_s'] * 1e3:.0f} ms, pooled "
            f"{rec['pooled_ttft_s'] * 1e3:.0f} ms ({rec['pooled/oracle']:.3f}x), pooled-live "
            f"{rec['pooled-live_ttft_s'] * 1e3:.0f} ms ({rec['pooled-live/oracle']:.3f}x)"
            + (f", stateless {rec['stateless_ttft_s'] * 1e3:.0f} ms" if "stateless_ttft_s" in rec else ""),
            flush=True,
        )
    stateless = med([t["stateless_ttft_s"] for t in turns if "stateless_ttft_s" in t])
    summary = {
        "pooled/oracle": med([t["pooled/oracle"] for t in turns]),
        "pooled-live/oracle": med([t["pooled-live/oracle"] for t in turns]),
        "stateless/pooled TTFT": stateless / med([t["pooled_ttft_s"] for t in turns]),
        "stateless/pooled-live TTFT": stateless / med([t["pooled-live_ttft_s"] for t in turns]),
        "same_answers": all(t["same_answers"] for t in turns),
    }
    return dict(turns=turns, summary=summary)


# ---------------------------------------------------------------------------- rss
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def run_rss(model, args) -> dict:
    """Calls of one growing agent-like session and of fresh prompts on a 2 MiB pool (it evicts)."""
    pool = KVPool(block_size=16, capacity_bytes=2 << 20)
    rng = np.random.default_rng(2)
    shared = rng.integers(3, 4096, 256, dtype=np.int64)
    live = PooledCache(model, pool=pool)
    history = shared
    samples = []
    for i in range(args.rss_calls):
        if len(history) > 1500:
            history = shared
        history = np.concatenate([history, rng.integers(3, 4096, 48, dtype=np.int64)])
        cache = live if i % 2 else PooledCache(model, pool=pool)
        out, _, _ = timed_generate(model, torch.as_tensor(history)[None], cache, 4, torch.device("cpu"))
        history = np.concatenate([history, out])
        if i % 25 == 0 or i == args.rss_calls - 1:
            samples.append((i, rss_mib()))
    s = pool.stats()
    first = samples[min(2, len(samples) - 1)][1]
    result = dict(
        samples=samples,
        growth_mib=samples[-1][1] - first,
        evicted_blocks=s.evicted_blocks,
        calls=args.rss_calls,
    )
    print(
        f"rss: {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MiB over {args.rss_calls} calls "
        f"(growth after call 50: {result['growth_mib']:+.1f} MiB), {s.evicted_blocks} blocks evicted",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------- output
def table(results: dict) -> str:
    lines = []
    if results.get("tiny"):
        lines += [
            "| L | oracle ms | pooled ms | pooled/oracle | pooled-live ms | pooled-live/oracle | stateless ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["tiny"]:
            st = f"{r['stateless_ms']:.1f}" if "stateless_ms" in r else "-"
            lines.append(
                f"| {r['L']:,} | {r['oracle_ms']:.1f} | {r['pooled_ms']:.1f} | {r['pooled/oracle']:.2f} | "
                f"{r['pooled-live_ms']:.1f} | {r['pooled-live/oracle']:.2f} | {st} |"
            )
    if results.get("decode"):
        lines += [
            "",
            "| L | pooled ms/token | DynamicCache ms/token | commit one block ms | vs first L |",
            "|---|---|---|---|---|",
        ]
        for r in results["decode"]:
            lines.append(
                f"| {r['L']:,} | {r['pooled_ms_per_token']:.2f} | {r['dynamic_ms_per_token']:.2f} | "
                f"{r['commit_block_ms']:.3f} | {r['commit_vs_first']:.2f} |"
            )
    if results.get("smollm2"):
        s = results["smollm2"]["summary"]
        lines += [
            "",
            "SmolLM2 seed regime (median per turn): " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()),
        ]
    if results.get("rss"):
        r = results["rss"]
        lines += [
            "",
            f"RSS over {r['calls']} calls: {r['growth_mib']:+.1f} MiB after warm-up, {r['evicted_blocks']} evicted",
        ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tiny = results.get("tiny") or []
    for mode, style in (("oracle", "k-o"), ("pooled", "b-s"), ("pooled-live", "g-^"), ("stateless", "r--x")):
        pts = [(r["L"], r[f"{mode}_ms"]) for r in tiny if f"{mode}_ms" in r]
        if pts:
            axes[0].plot(*zip(*pts), style, label=mode)
    axes[0].set(
        xscale="log", yscale="log", xlabel="cached tokens L", ylabel="ms per call (+16 tokens, 1 new)"
    )
    axes[0].set_title("tiny Llama: time per call")
    axes[0].legend()
    dec = results.get("decode") or []
    if dec:
        axes[1].plot(
            [r["L"] for r in dec], [r["pooled_ms_per_token"] for r in dec], "b-s", label="pooled decode"
        )
        axes[1].plot(
            [r["L"] for r in dec],
            [r["dynamic_ms_per_token"] for r in dec],
            "k-o",
            label="DynamicCache decode",
        )
        axes[1].plot(
            [r["L"] for r in dec], [r["commit_block_ms"] for r in dec], "m-^", label="commit one block"
        )
        axes[1].set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms")
        axes[1].set_title("decoding")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    results: dict = dict(args=vars(args), environment=environment("cpu"), date=time.strftime("%Y-%m-%d"))
    model = tiny_model(max(lengths) + 64) if set(sections) & {"tiny", "decode", "rss"} else None
    if model is not None:
        hf_kvpool.enable(model)
    with torch.no_grad():
        if "tiny" in sections:
            results["tiny"] = run_tiny(model, lengths, args)
        if "decode" in sections:
            results["decode"] = run_decode(model, lengths, args)
        if "smollm2" in sections:
            results["smollm2"] = run_smollm2(args)
        if "rss" in sections:
            results["rss"] = run_rss(model, args)
    text = table(results)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
