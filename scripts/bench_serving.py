"""Serving benchmark: multi-session agent conversations over HTTP, six server set-ups side by side.

What it measures. Agent sessions (the shape of ``bench_agent.py``'s workload, the content of
``demo_agent.py``'s): a shared system prompt (tool description plus reference documentation), a
task, then per turn the model's previous answer and a tool result (a real source file of the
installed transformers package, ``--tool-tokens`` long) with a question; the chat template is
applied by the server over the growing message list. Each request is a streaming chat completion
through the ``openai`` client (greedy, ``--max-tokens`` answers). All arms' servers run at once;
turn by turn, each arm in turn (the order rotating) serves that turn of every session, from
``--concurrency`` client threads that each run their share of the sessions; so the arms are side
by side on a machine whose load drifts. Every arm serves the same conversations (the questions and
tool outputs are fixed; the answers are the model's own, greedy):

- ``plain``: ``transformers serve`` (one process);
- ``plain-cb``: ``transformers serve --continuous-batching`` (paged cache with its own block
  sharing: the in-library peer);
- ``pool``: ``python -m hf_kvpool.serve``, one process;
- ``pool-2rr``: two replicas, pinned to one core each (``taskset``), behind sglang-router
  ``round_robin``;
- ``pool-2ca``: the same behind sglang-router ``cache_aware`` (follows the conversation), with
  ``--balance-abs-threshold 0`` (``serve_replicas.py`` says why);
- ``pool-2rr-redis``: round-robin, the replicas sharing a private ``redis-server`` as Redis tier.

Per arm: TTFT (request sent to first content token) p50/p95 for first turns and for later turns,
prompt tokens/s (prompt tokens / TTFT, summed), the pool's hit rate (hit / query tokens from the
replicas' ``/metrics``, warm-up excluded), requests per replica (``/metrics``), and how many
answers equal the ``plain`` arm's. Every server gets an untimed warm-up request first. Every
server process runs one torch thread (``OMP_NUM_THREADS=1``): one replica is one core's worth.

Output: a table on stdout, ``docs/results/bench_serving.json`` (every figure and request) and
``docs/results/bench_serving.png``.

    python scripts/bench_serving.py                      # all arms, ~10 min on 2 CPU cores
    python scripts/bench_serving.py --arms plain,pool --sessions 2 --turns 3    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import serve_replicas as sr

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "plain": dict(plain=True, replicas=1),
    # a bounded paged cache (8,192 tokens): by default it takes most of the host's memory on CPU (13 GiB here)
    "plain-cb": dict(
        plain=True,
        replicas=1,
        args=(
            "--continuous-batching",
            "--cb-block-size",
            "32",
            "--cb-num-blocks",
            "256",
            "--cb-max-batch-tokens",
            "2048",
        ),
    ),
    "pool": dict(replicas=1),
    "pool-2rr": dict(replicas=2, policy="round_robin"),
    # the router's default balance threshold (64 requests) puts every session on one replica here
    "pool-2ca": dict(replicas=2, policy="cache_aware", router_args=("--balance-abs-threshold", "0")),
    "pool-2rr-redis": dict(replicas=2, policy="round_robin", redis=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="model id or folder (default: SmolLM2-135M-Instruct, scripts/smollm2.py)",
    )
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument(
        "--concurrency", type=int, default=2, help="client threads (each runs its share of the sessions)"
    )
    p.add_argument("--tool-tokens", type=int, default=200, help="tokens of each tool result")
    p.add_argument(
        "--context-tokens", type=int, default=300, help="reference documentation in the shared system prompt"
    )
    p.add_argument("--max-tokens", type=int, default=16, help="answer length cap")
    p.add_argument("--pool-capacity", default="256M")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "bench_serving.json"))
    p.add_argument("--logs", default=None, help="folder for server and router logs")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- the conversations
def conversations(tokenizer, sessions: int, turns: int, tool_tokens: int, context_tokens: int) -> list[dict]:
    """Per session: the fixed opening messages and, per turn, the user message that follows the answer."""
    from demo_agent import TASKS, system_prompt
    from source_text import read_excerpt

    system = system_prompt(tokenizer, context_tokens)
    out = []
    for s in range(sessions):
        task, plan = TASKS[s % len(TASKS)]
        follow = []
        for t in range(turns - 1):
            step = plan[(t + s // len(TASKS)) % len(plan)]
            code = read_excerpt(step.path, tokenizer, tool_tokens, anchor=step.anchor)
            call = f"read_file({step.path!r}, start={step.anchor!r})"
            follow.append(f"Result of {call}:\n```python\n{code}\n```\n{step.question}")
        out.append(
            {
                "opening": [{"role": "system", "content": system}, {"role": "user", "content": task}],
                "follow": follow,
            }
        )
    return out


def one_request(api, model: str, messages: list, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, parts, usage = None, [], None
    stream = api.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter() - start
    return {
        "ttft_s": ttft if ttft is not None else end,
        "e2e_s": end,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "answer": "".join(parts),
    }


def run_turn(api, model: str, convs: list[dict], chats: dict, turn: int, args) -> list[dict]:
    """Turn ``turn`` of every session: ``args.concurrency`` client threads, each running its share
    of the sessions one after another; ``chats`` (session -> messages) grows with each answer."""
    records, lock, errors = [], threading.Lock(), []

    def client(mine: list[int]):
        try:
            for s in mine:
                if turn:
                    chats[s].append({"role": "user", "content": convs[s]["follow"][turn - 1]})
                rec = one_request(api, model, chats[s], args.max_tokens)
                chats[s].append({"role": "assistant", "content": rec["answer"]})
                with lock:
                    records.append({"session": s, "turn": turn, **rec})
        except Exception as exc:  # reported after the threads end
            errors.append(exc)

    threads = [
        threading.Thread(target=client, args=(list(range(k, len(convs), args.concurrency)),))
        for k in range(args.concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return records


# ---------------------------------------------------------------------------- servers
def scrape(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
    return values


def warm_up(url: str, model: str) -> None:
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
    )


@contextlib.contextmanager
def arm_servers(name: str, model: str, args, logs: Path | None):
    """Yields ``(url to send to, replica urls)`` for an arm."""
    spec = ARMS[name]
    extra = tuple(spec.get("args", ()))
    with contextlib.ExitStack() as stack:
        if spec.get("plain"):
            proc, url = sr.start_server(
                model,
                plain=True,
                args=extra,
                cpus=sr.core_sets(1)[0],
                threads=1,
                log=logs / f"{name}.log" if logs else None,
            )
            stack.callback(sr.stop, proc)
            sr.wait_ready(proc, url)
            yield url, [url]
            return
        redis_url = None
        if spec.get("redis"):
            from redis_server import local_redis_server

            redis_url, _ = stack.enter_context(local_redis_server())
        pool_args = (*extra, "--pool-capacity", args.pool_capacity)
        arm_logs = None
        if logs:
            arm_logs = logs / name
            arm_logs.mkdir(parents=True, exist_ok=True)
        front, urls = stack.enter_context(
            sr.replicas(
                model,
                spec["replicas"],
                policy=spec.get("policy"),
                redis_url=redis_url,
                args=pool_args,
                logs=arm_logs,
                threads=1,  # as the plain arms: one torch thread per server (2 contend on 2 shared cores)
            )
        )
        yield front, urls


def run_arms(arms: list[str], model: str, convs, args, logs) -> dict:
    """Every arm's servers up at once; turn by turn, each arm runs that turn of every session (the
    arms' order rotating from turn to turn), so a slow phase of the shared machine hits all arms."""
    import openai

    with contextlib.ExitStack() as stack:
        servers = {}
        for arm in arms:
            print(f"[{arm}] starting", file=sys.stderr, flush=True)
            servers[arm] = stack.enter_context(arm_servers(arm, model, args, logs))
        for _, urls in servers.values():
            for url in urls:
                warm_up(url, model)
        before = {arm: [scrape(u) for u in urls] for arm, (_, urls) in servers.items()}
        apis = {
            arm: openai.OpenAI(base_url=front + "/v1", api_key="none", timeout=600, max_retries=0)
            for arm, (front, _) in servers.items()
        }
        chats = {arm: {s: list(c["opening"]) for s, c in enumerate(convs)} for arm in arms}
        records = {arm: [] for arm in arms}
        busy = dict.fromkeys(arms, 0.0)
        for turn in range(args.turns):
            order = arms[turn % len(arms) :] + arms[: turn % len(arms)]
            for arm in order:
                t0 = time.perf_counter()
                records[arm] += run_turn(apis[arm], model, convs, chats[arm], turn, args)
                busy[arm] += time.perf_counter() - t0
                print(f"[{arm}] turn {turn} done", file=sys.stderr, flush=True)
        after = {arm: [scrape(u) for u in urls] for arm, (_, urls) in servers.items()}
    results = {}
    for arm in arms:
        delta = [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in a} for a, b in zip(after[arm], before[arm])]
        pooled = any("hf_kvpool_query_tokens_total" in d for d in delta)
        hits = sum(d.get("hf_kvpool_hit_tokens_total", 0) for d in delta)
        queried = sum(d.get("hf_kvpool_query_tokens_total", 0) for d in delta)
        recs = sorted(records[arm], key=lambda r: (r["session"], r["turn"]))
        results[arm] = {
            "records": recs,
            "hit_rate": hits / queried if pooled and queried else None,
            "hit_tokens": hits if pooled else None,
            "query_tokens": queried if pooled else None,
            "remote_hit_blocks": sum(d.get("hf_kvpool_remote_hit_blocks_total", 0) for d in delta)
            if pooled
            else None,
            "requests_per_replica": [int(d.get("hf_kvpool_serve_requests_total", 0)) for d in delta]
            if pooled
            else [len(recs)],
            "wall_s": busy[arm],
        }
    return results


# ---------------------------------------------------------------------------- report
def pct(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(result: dict, reference: list[dict] | None) -> dict:
    recs = result["records"]
    first = [r["ttft_s"] for r in recs if r["turn"] == 0]
    later = [r["ttft_s"] for r in recs if r["turn"] > 0]
    prompt = sum(r["prompt_tokens"] or 0 for r in recs)
    same = None
    if reference is not None:
        ref = {(r["session"], r["turn"]): r["answer"] for r in reference}
        same = sum(ref.get((r["session"], r["turn"])) == r["answer"] for r in recs)
    return {
        "requests": len(recs),
        "ttft_first_p50_s": pct(first, 50),
        "ttft_first_p95_s": pct(first, 95),
        "ttft_later_p50_s": pct(later, 50),
        "ttft_later_p95_s": pct(later, 95),
        "prompt_tokens": prompt,
        "prompt_tokens_per_s": prompt / sum(r["ttft_s"] for r in recs),
        "mean_prompt_tokens_later": statistics.fmean(r["prompt_tokens"] or 0 for r in recs if r["turn"] > 0)
        if later
        else None,
        "hit_rate": result["hit_rate"],
        "remote_hit_blocks": result["remote_hit_blocks"],
        "requests_per_replica": result["requests_per_replica"],
        "answers_equal_plain": same,
        "busy_s": result["wall_s"],
    }


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(summary: dict) -> str:
    base = summary.get("plain", {}).get("ttft_later_p50_s")
    rows = [
        "| arm | TTFT p50 first (s) | TTFT p50 / p95 later (s) | later vs plain | prompt tok/s | hit rate | requests per replica | answers = plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        speed = base / s["ttft_later_p50_s"] if base and s["ttft_later_p50_s"] else None
        same = "-" if s["answers_equal_plain"] is None else f"{s['answers_equal_plain']}/{s['requests']}"
        rows.append(
            f"| {arm} | {fmt(s['ttft_first_p50_s'])} | {fmt(s['ttft_later_p50_s'])} / {fmt(s['ttft_later_p95_s'])} | "
            f"{fmt(speed, '.2f')}x | {fmt(s['prompt_tokens_per_s'], '.0f')} | "
            f"{fmt(s['hit_rate'] * 100 if s['hit_rate'] is not None else None, '.1f')}% | "
            f"{'/'.join(map(str, s['requests_per_replica']))} | "
            f"{same} |"
        )
    return "\n".join(rows)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    x = range(len(arms))
    a.bar([i - 0.2 for i in x], [summary[k]["ttft_later_p50_s"] for k in arms], 0.4, label="p50")
    a.bar([i + 0.2 for i in x], [summary[k]["ttft_later_p95_s"] for k in arms], 0.4, label="p95")
    a.set(title="TTFT, turns after the first (s)", yscale="log")
    b.bar(x, [(summary[k]["hit_rate"] or 0) * 100 for k in arms], color="tab:green")
    b.set(title="pool hit rate (% of prompt tokens)", ylim=(0, 100))
    width = 0.8 / max(len(summary[k]["requests_per_replica"]) for k in arms)
    for r in range(max(len(summary[k]["requests_per_replica"]) for k in arms)):
        c.bar(
            [i - 0.4 + width * (r + 0.5) for i in x],
            [
                summary[k]["requests_per_replica"][r] if r < len(summary[k]["requests_per_replica"]) else 0
                for k in arms
            ],
            width,
            label=f"replica {r}",
        )
    c.set(title="requests per replica")
    for ax in (a, b, c):
        ax.set_xticks(list(x), arms, rotation=25, ha="right")
        ax.grid(alpha=0.3, axis="y")
    a.legend()
    c.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    if any(ARMS[a].get("policy") for a in arms) and sr.router_binary() is None:
        raise SystemExit(f"the routed arms need {sr.ROUTER}: pip install {sr.ROUTER}=={sr.ROUTER_VERSION}")
    if args.model is None:
        from smollm2 import ensure_cached

        args.model = str(ensure_cached())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    convs = conversations(tokenizer, args.sessions, args.turns, args.tool_tokens, args.context_tokens)
    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    results = run_arms(arms, args.model, convs, args, logs)
    summary = {}
    for arm in arms:
        reference = results["plain"]["records"] if "plain" in results and arm != "plain" else None
        summary[arm] = summarize(results[arm], reference)
    text = table(summary)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(sr.core_sets(1)[0].split(','))} cores, torch {torch.__version__} CPU",
        "transformers": transformers.__version__,
        "router": f"{sr.ROUTER} {sr.ROUTER_VERSION}",
        "model": args.model,
        "workload": {
            k: getattr(args, k)
            for k in (
                "sessions",
                "turns",
                "concurrency",
                "tool_tokens",
                "context_tokens",
                "max_tokens",
                "pool_capacity",
            )
        },
    }
    out.write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "table": text,
                "records": {a: r["records"] for a, r in results.items()},
            },
            indent=1,
        )
    )
    title = f"{args.sessions} agent sessions x {args.turns} turns, {args.concurrency} clients, SmolLM2-135M over HTTP ({meta['date']})"
    plot(summary, out.with_suffix(".png"), title)
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
