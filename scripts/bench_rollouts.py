"""RL rollouts through model.generate(): batches where rows share prompts or sit at different turns.

Two workloads, each run under three modes that alternate step by step (which mode goes first
rotates), on the same prompts:

(a) ``grpo``: each step samples ``G`` completions for each of ``P`` prompts (one batch of P*G
    rows; the prompts share a system prompt, then differ), then updates the weights: a LoRA step
    when peft is installed (the policy's adapter trains), a full-weight SGD step otherwise. A
    weight update changes every K/V, so no mode may reuse across steps.
(b) ``multiturn``: ``B`` agent sessions in one batch, started at different steps (some are at
    their first turn, others at their tenth); each step appends each session's previous answer and
    a tool result to its history and generates the next answer (greedy). Weights do not change.

Modes: ``stateless`` (a DynamicCache per call), ``pooled`` (a PooledCache per call, one KVPool),
``pooled-blocks`` (the same with whole rows off, ``hf_kvpool.hf.catchup.WHOLE_ROWS``: batches start
at a common block boundary; its own KVPool),
``hf-cb`` (transformers' continuous batching with block sharing, the batch submitted at once;
its manager is rebuilt after each weight update so it cannot serve stale blocks).

Per mode: prefill positions computed (counted where tokens enter the model; hf-cb: prompt tokens
minus its prefix matches) against the ideal (an infinite prefix cache with the pool's block size,
emptied at each weight update, serving every row's full blocks but its last token), prompt and
generated tokens per second of generate() time, and time to first token of the batch. Pooled
outputs are checked token for token against stateless.

    python scripts/bench_rollouts.py            # ~5 min on 2 CPU cores; JSON + PNG in results/ (--out DIR)
    python scripts/bench_rollouts.py --quick    # < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache
from workloads import PrefixIndex, environment, tiny_llama

from hf_kvpool import KVPool, PooledCache
from hf_kvpool.hf import catchup

REPO = Path(__file__).resolve().parent.parent
MODES = ("stateless", "pooled", "pooled-blocks", "hf-cb")
PRESETS = {
    "quick": dict(
        prompts=2, group=4, system=200, task=(100, 300), steps=2, sessions=4, turns=4, result=(30, 120)
    ),
    "default": dict(
        prompts=4, group=8, system=400, task=(300, 900), steps=3, sessions=8, turns=8, result=(50, 300)
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row and step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default results/)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- counting and timing
@contextlib.contextmanager
def counting(model):
    """Token positions the model computes (a passive hook on its input embeddings)."""
    seen = [0]

    def count(module, args):
        seen[0] += args[0].numel()

    count.hf_kvpool_passive = True  # it changes no value: pooling stays on
    handle = model.get_input_embeddings().register_forward_pre_hook(count)
    try:
        yield seen
    finally:
        handle.remove()


class FirstToken:
    """A streamer that notes when the first new token arrives (put #2; #1 is the prompt)."""

    def __init__(self):
        self.puts, self.t = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.t = time.perf_counter()

    def end(self):
        pass


def left_pad(rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.as_tensor(r)
        mask[b, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def run_batch(mode: str, model, rows, n_new: int, sample: bool, seed: int, pools, cb) -> dict:
    """One batch through one mode (``pools``: mode -> KVPool): outputs, prefill positions, times."""
    if mode == "hf-cb":
        return cb.run(rows, n_new, sample)
    ids, mask = left_pad(rows, model.device)
    cache = PooledCache(model, pool=pools[mode]) if mode in pools else DynamicCache(config=model.config)
    streamer = FirstToken()
    torch.manual_seed(seed)
    catchup.WHOLE_ROWS = mode != "pooled-blocks"
    with counting(model) as seen:
        t0 = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, cache=cache, max_new_tokens=n_new, min_new_tokens=n_new,
            do_sample=sample, top_k=50 if sample else None, streamer=streamer,
        )  # fmt: skip
        t1 = time.perf_counter()
    decode = len(rows) * (n_new - 1)  # one position per row and decode step
    return dict(
        outputs=[o[ids.shape[1] :].cpu().numpy() for o in out],
        prefill_positions=seen[0] - decode,
        time=t1 - t0,
        ttft=streamer.t - t0,
    )


class ContinuousBatching:
    """transformers' continuous batching (block sharing on); rebuilt when the weights change."""

    def __init__(self, model, block_size: int, max_tokens: int):
        self.model, self.block_size, self.max_tokens = model, block_size, max_tokens
        self.manager = None

    def start(self):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.close()
        gen = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=0)
        cb = ContinuousBatchingConfig(
            allow_block_sharing=True,
            page_size=self.block_size,
            num_blocks=-(-self.max_tokens // self.block_size) + 64,
            max_batch_tokens=2048,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb
        )
        self.manager.start()
        self.matched = 0
        cache = self.manager.batch_processor.cache if self.manager.batch_processor else None
        if cache is not None and hasattr(cache, "search_prefix_match"):
            original = cache.search_prefix_match

            def search_prefix_match(request_id, prompt_ids):
                n = original(request_id, prompt_ids)
                self.matched += n
                return n

            cache.search_prefix_match = search_prefix_match

    def run(self, rows, n_new: int, sample: bool) -> dict:
        if self.manager is None:
            self.start()
        matched0 = self.matched
        t0 = time.perf_counter()
        rids = [
            self.manager.add_request(r.tolist(), max_new_tokens=n_new, record_timestamps=True) for r in rows
        ]
        results, first = {}, None
        while len(results) < len(rids):
            res = self.manager.get_result(timeout=1.0)
            if res is not None and res.is_finished():
                results[res.request_id] = res
            if not self.manager.is_running() or time.perf_counter() - t0 > 1800:
                raise RuntimeError("the continuous batching loop stopped or hung")
        t1 = time.perf_counter()
        for res in results.values():
            stamps = getattr(res, "timestamps", None) or []
            if stamps:
                first = min(first or stamps[0], stamps[0])
        prompt_tokens = sum(len(r) for r in rows)
        return dict(
            outputs=[np.asarray(results[r].generated_tokens) for r in rids],
            prefill_positions=prompt_tokens - (self.matched - matched0),
            time=t1 - t0,
            ttft=(first - t0) if first and first > t0 else float("nan"),
        )

    def close(self):
        if self.manager is not None:
            self.manager.stop(block=True, timeout=10)
            self.manager = None


# ---------------------------------------------------------------------------- workloads
def ideal_positions(rows, index: PrefixIndex) -> int:
    """What an infinite prefix cache computes for these rows, one after the other."""
    total = 0
    for r in rows:
        total += len(r) - max(0, min(index.match(r), len(r) - 1))
        index.add(r[: len(r) - 1])
    return total


def update_weights(model, peft_model, step: int) -> str:
    """One optimizer step that changes the policy (LoRA when available, else one full layer)."""
    params = [p for p in (peft_model or model).parameters() if p.requires_grad] if peft_model else None
    if not params:
        params = list(model.model.layers[0].self_attn.k_proj.parameters())
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=1e-2)
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(step))
    (peft_model or model)(input_ids=ids.to(model.device), labels=ids.to(model.device)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return "lora" if peft_model else "sgd"


def grpo(model, peft_model, args, preset, modes, pools, cb, rng) -> dict:
    vocab = model.config.vocab_size
    system = rng.integers(3, vocab, preset["system"])
    records = {m: [] for m in modes}
    ideal, update = 0, None
    for step in range(preset["steps"]):
        prompts = [
            np.concatenate([system, rng.integers(3, vocab, rng.integers(*preset["task"]))])
            for _ in range(preset["prompts"])
        ]
        rows = [p for p in prompts for _ in range(preset["group"])]
        ideal += ideal_positions(rows, PrefixIndex(args.block_size))  # weights changed: nothing carries over
        order = modes[step % len(modes) :] + modes[: step % len(modes)]
        results = {
            m: run_batch(m, model, rows, args.new_tokens, True, args.seed + step, pools, cb) for m in order
        }
        for m in modes:
            records[m].append(
                dict(step=step, rows=len(rows), prompt_tokens=sum(map(len, rows)), **_drop(results[m]))
            )
        check(results, "grpo", step, sample=True)
        model.eval()
        update = update_weights(model, peft_model, step)
        model.eval()
        cb.close()  # its blocks hold K/V of the old weights
    return dict(records=records, ideal_positions=ideal, weight_update=update)


def multiturn(model, args, preset, modes, pools, cb, rng) -> dict:
    vocab = model.config.vocab_size
    sessions = [rng.integers(3, vocab, rng.integers(200, 500)) for _ in range(preset["sessions"])]
    start = [s % (preset["turns"] // 2 + 1) for s in range(preset["sessions"])]  # staggered starts
    records = {m: [] for m in modes}
    index, ideal = PrefixIndex(args.block_size), 0
    histories: dict[int, np.ndarray] = {}
    steps = preset["turns"] + max(start)
    for step in range(steps):
        active = [s for s in range(len(sessions)) if start[s] <= step < start[s] + preset["turns"]]
        rows = []
        for s in active:
            result = rng.integers(3, vocab, rng.integers(*preset["result"]))
            histories[s] = np.concatenate([histories.get(s, sessions[s]), result])
            rows.append(histories[s])
        ideal += ideal_positions(rows, index)
        order = modes[step % len(modes) :] + modes[: step % len(modes)]
        results = {m: run_batch(m, model, rows, args.new_tokens, False, args.seed, pools, cb) for m in order}
        for m in modes:
            records[m].append(
                dict(step=step, rows=len(rows), prompt_tokens=sum(map(len, rows)), **_drop(results[m]))
            )
        reference = results.get("stateless") or results[modes[0]]
        check(results, "multiturn", step, sample=False)
        for s, out in zip(active, reference["outputs"]):
            histories[s] = np.concatenate([histories[s], out])
            index.add(histories[s][:-1])
    return dict(records=records, ideal_positions=ideal)


def _drop(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "outputs"}


def check(results: dict, name: str, step: int, sample: bool) -> None:
    for mode in [m for m in results if m.startswith("pooled")] if "stateless" in results else []:
        for a, b in zip(results["stateless"]["outputs"], results[mode]["outputs"]):
            if not np.array_equal(a, b):
                raise SystemExit(f"{name} step {step}: {mode} output differs from stateless")


# ---------------------------------------------------------------------------- report
def summarize(part: dict, modes) -> dict:
    out = {}
    for m in modes:
        recs = part["records"][m]
        t = sum(r["time"] for r in recs)
        out[m] = dict(
            prefill_positions=sum(r["prefill_positions"] for r in recs),
            vs_ideal=sum(r["prefill_positions"] for r in recs) / part["ideal_positions"],
            prompt_tokens_per_s=sum(r["prompt_tokens"] for r in recs) / t,
            generated_tokens_per_s=sum(r["rows"] for r in recs) * PARAMS["new_tokens"] / t,
            mean_ttft_s=float(np.nanmean([r["ttft"] for r in recs])),
            time_s=t,
        )
    base = out.get("stateless")
    for m in modes:
        if base:
            out[m]["throughput_vs_stateless"] = out[m]["prompt_tokens_per_s"] / base["prompt_tokens_per_s"]
    return out


PARAMS: dict = {}


def table(name: str, summary: dict, ideal: int) -> str:
    lines = [
        f"**{name}** (ideal prefill positions: {ideal:,})",
        "| mode | prefill positions (vs ideal) | prompt tok/s (vs stateless) | generated tok/s | mean TTFT (s) |",
        "|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        rel = f" ({s['throughput_vs_stateless']:.2f}x)" if "throughput_vs_stateless" in s else ""
        lines.append(
            f"| {m} | {s['prefill_positions']:,} ({s['vs_ideal']:.3f}x) | {s['prompt_tokens_per_s']:,.0f}{rel} "
            f"| {s['generated_tokens_per_s']:,.1f} | {s['mean_ttft_s']:.3f} |"
        )
    return "\n".join(lines)


def plot(summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, summary) in zip(axes, summaries.items()):
        modes = list(summary)
        ax.bar(
            modes,
            [summary[m]["prompt_tokens_per_s"] for m in modes],
            color=[
                {"stateless": "#999", "pooled": "#2a7", "pooled-blocks": "#8c8"}.get(m, "#47c") for m in modes
            ],
        )
        for i, m in enumerate(modes):
            ax.text(
                i,
                summary[m]["prompt_tokens_per_s"],
                f"{summary[m]['vs_ideal']:.2f}x ideal",
                ha="center",
                va="bottom",
            )
        ax.set_title(f"{name}: prompt tokens/s")
        ax.set_ylim(0, 1.15 * max(summary[m]["prompt_tokens_per_s"] for m in modes))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    PARAMS["new_tokens"] = args.new_tokens
    modes = [m for m in args.modes.split(",") if m]
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    model = tiny_llama("quick")
    peft_model = None
    try:
        import peft

        torch.manual_seed(args.seed)
        peft_model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"])
        )
        model = peft_model.get_base_model()
    except ImportError:
        pass
    model.eval()
    pools = {m: KVPool(block_size=args.block_size) for m in modes if m.startswith("pooled")}
    cb = ContinuousBatching(model, args.block_size, max_tokens=200_000)
    t0 = time.perf_counter()
    parts = {
        "grpo": grpo(model, peft_model, args, preset, modes, pools, cb, rng),
        "multiturn": multiturn(model, args, preset, modes, pools, cb, rng),
    }
    cb.close()
    summaries = {name: summarize(part, modes) for name, part in parts.items()}
    print(f"bench_rollouts: {preset} block_size={args.block_size} new_tokens={args.new_tokens} "
          f"weight update={parts['grpo']['weight_update']}")  # fmt: skip
    for name, summary in summaries.items():
        print(table(name, summary, parts[name]["ideal_positions"]))
    g, m = summaries["grpo"], summaries["multiturn"]
    targets = {}
    if "pooled" in g:
        targets["grpo_pooled_vs_ideal<=1.05"] = g["pooled"]["vs_ideal"]
        targets["multiturn_pooled_vs_ideal<=1.05"] = m["pooled"]["vs_ideal"]
    if "pooled" in g and "stateless" in g:
        targets["grpo_pooled_throughput_vs_stateless>=3"] = g["pooled"]["throughput_vs_stateless"]
    if "pooled" in g and "hf-cb" in g:
        targets["grpo_pooled_vs_hfcb_throughput>=1"] = (
            g["pooled"]["prompt_tokens_per_s"] / g["hf-cb"]["prompt_tokens_per_s"]
        )
        targets["multiturn_pooled_vs_hfcb_throughput>=1"] = (
            m["pooled"]["prompt_tokens_per_s"] / m["hf-cb"]["prompt_tokens_per_s"]
        )
    for k, v in targets.items():
        print(f"- target {k}: {v:.3f}")
    whole_vs_blocks = {}
    for name, summary in summaries.items():
        if "pooled" in summary and "pooled-blocks" in summary:
            a, b = summary["pooled"], summary["pooled-blocks"]
            whole_vs_blocks[name] = ratios = {
                k: a[k] / b[k] for k in ("prefill_positions", "time_s", "mean_ttft_s")
            }
            print(f"- {name}, pooled (whole rows) / pooled-blocks: " + ", ".join(
                f"{k} {v:.3f}x" for k, v in ratios.items()))  # fmt: skip
    out = Path(args.out) if args.out else REPO / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = "bench_rollouts_quick" if args.quick else "bench_rollouts"
    result = dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        environment=environment(model.device),
        preset=preset,
        block_size=args.block_size,
        new_tokens=args.new_tokens,
        weight_update=parts["grpo"]["weight_update"],
        summary=summaries,
        targets=targets,
        whole_rows_vs_blocks=whole_vs_blocks,
        records={name: part["records"] for name, part in parts.items()},
        ideal_positions={name: part["ideal_positions"] for name, part in parts.items()},
        seconds=time.perf_counter() - t0,
    )
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
    plot(summaries, out / f"{tag}.png")
    print(f"wrote {out / tag}.json and .png in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
