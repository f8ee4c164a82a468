"""The tools people run on transformers, unmodified, with and without ``hf_kvpool.enable(model)``.

Each tool calls ``model.generate()`` itself and never passes a cache; the only change in the
enabled runs is ``hf_kvpool.enable(model)`` (its own fresh ``KVPool`` per run). Per tool, the same
inputs run plain and enabled, alternated (plain, enabled, plain, enabled...), on separate model
objects loaded from the same checkpoint:

- ``pipeline``: ``transformers.pipeline("text-generation")``, a 3-turn chat (message lists, greedy);
- ``smolagents``: a ``CodeAgent`` on ``TransformersModel`` (a local model folder as ``model_id``),
  a few steps with a trivial tool, greedy;
- ``lm-eval``: ``HFLM(pretrained=model, tokenizer=tok, batch_size=4).generate_until`` on 8
  prompts that share a long few-shot prefix (``Instance`` objects built here, no dataset);
- ``trl``: ``GRPOTrainer`` without vLLM, LoRA, 4 prompts x G=4, a couple of steps, a trivial reward.

What is counted (``Meter``, passive hooks: ``hook.hf_kvpool_passive = True``, so pooling stays on):
token positions the model computes, where tokens enter it (a pre-hook on the input embeddings,
which sees the trimmed inputs), split by generate() call: a call is one cache object; its first
forward is its prefill, the rest are decode steps (one position per row); forwards nested in
another (hf_kvpool's catch-up of a batch's distinct rows) count as that call's prefill. Forwards
without a cache (TRL's training forwards) are not counted. Per call it also records each row's
prompt (the untrimmed input, without left padding) and the tokens fed back while decoding, from
which ``ideal`` is the prefill positions of a perfect token-level prefix cache: per row, its prompt
length minus the longest prefix held earlier (by any earlier row's prompt, or an earlier call's
prompt and generated tokens), at least one position per row. hit tokens: ``get_pool(model).stats()``.

Output: a markdown table on stdout and JSON (every figure, per-call records) in
``docs/results/bench_clients.json`` (``--out``).

    python scripts/bench_clients.py                  # SmolLM2-135M-Instruct, every tool
    python scripts/bench_clients.py --tools pipeline,lm-eval --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

import hf_kvpool
from hf_kvpool import KVPool

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("pipeline", "smolagents", "lm-eval", "trl")
SYSTEM = "You are a coding assistant that reads transformers source code. Answer briefly."


# ---------------------------------------------------------------------------- counting
def base_model(model):
    """The transformers model under a PEFT wrapper (the module whose forward generate() runs)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class Meter:
    """Positions a model computes per generate() call (see the module docstring); passive hooks."""

    def __init__(self, model):
        self.model = base_model(model)
        self.calls: list[dict] = []
        self._seen = weakref.WeakKeyDictionary()  # cache object -> its call record
        self._stack: list[tuple[dict | None, str]] = []
        self._handles = []

    def __enter__(self):
        top, embed = self.model, self.model.get_input_embeddings()
        for hook in (self._enter, self._leave, self._embed):
            hook.__func__.hf_kvpool_passive = True  # changes no value: pooling stays on
        self._handles = [
            top.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True),
            top.register_forward_hook(self._leave, with_kwargs=True, always_call=True),
            embed.register_forward_pre_hook(self._embed),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _enter(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache is None or ids is None:  # a forward outside generate() (training, scoring)
            self._stack.append((None, "other"))
        elif self._stack and self._stack[-1][0] is not None:  # nested: a catch-up inside a prefill
            self._stack.append((self._stack[-1][0], "prefill"))
        elif cache in self._seen:
            call = self._seen[cache]
            call["fed_back"].append(ids[:, -1].tolist())
            self._stack.append((call, "decode"))
        else:
            mask = kwargs.get("attention_mask")
            rows = []
            for b in range(ids.shape[0]):
                row = ids[b] if mask is None else ids[b][mask[b].bool()]
                rows.append(row.tolist())
            now = time.perf_counter()
            call = dict(prompts=rows, fed_back=[], prefill=0, decode=0, start=now, end=now)
            self._seen[cache] = call
            self.calls.append(call)
            self._stack.append((call, "prefill"))

    def _leave(self, module, args, kwargs, output):
        call, _ = self._stack.pop()
        if call is not None:
            call["end"] = time.perf_counter()

    def _embed(self, module, args):
        if self._stack and self._stack[-1][0] is not None:
            call, part = self._stack[-1]
            call[part] += args[0].numel()

    def summary(self) -> dict:
        return dict(
            calls=len(self.calls),
            prefill_positions=sum(c["prefill"] for c in self.calls),
            decode_positions=sum(c["decode"] for c in self.calls),
            prompt_tokens=sum(len(r) for c in self.calls for r in c["prompts"]),
            generate_s=sum(c["end"] - c["start"] for c in self.calls),
            ideal_positions=ideal_positions(self.calls),
        )


def ideal_positions(calls: list[dict]) -> int:
    """Prefill positions of a perfect token-level prefix cache over these calls (module docstring)."""
    held: set[int] = set()

    def prefixes(tokens):
        h = 0
        for t in tokens:
            h = hash((h, t))
            yield h

    total = 0
    for call in calls:
        for row in call["prompts"]:
            matched = 0
            for h in prefixes(row):
                if h not in held:
                    break
                matched += 1
            total += len(row) - min(matched, len(row) - 1)
            held.update(prefixes(row))
        for b, row in enumerate(call["prompts"]):
            held.update(prefixes(row + [step[b] for step in call["fed_back"]]))
    return total


def retokenized_loss(calls: list[dict]) -> list[dict]:
    """Per call after the first (batch 1): how much of the previous call's prompt + generated tokens
    (its last generated token excluded: never fed back) the new prompt does not start with."""
    out = []
    for prev, call in zip(calls, calls[1:]):
        before = prev["prompts"][0] + [s[0] for s in prev["fed_back"]]
        prompt = call["prompts"][0]
        n = min(len(before), len(prompt))
        common = next((i for i in range(n) if before[i] != prompt[i]), n)
        out.append(
            dict(
                previous=len(before),
                previous_prompt=len(prev["prompts"][0]),
                common=common,
                lost=len(before) - common,
            )
        )
    return out


@contextlib.contextmanager
def one_run(model, enabled: bool):
    """Meter the model; enabled: ``hf_kvpool.enable(model)`` with a fresh pool (hit tokens counted)."""
    pool = KVPool() if enabled else None
    if enabled:
        hf_kvpool.enable(model, pool=pool)
    with Meter(model) as meter:
        result = dict(meter=meter)
        t0 = time.perf_counter()
        yield result
        result["time_s"] = time.perf_counter() - t0
    result.update(meter.summary())
    result["hit_tokens"] = pool.stats().hit_tokens if enabled else 0
    del result["meter"]
    result["records"] = meter.calls


# ---------------------------------------------------------------------------- the tools
def chat_turns(tokenizer, tokens: int = 120) -> list[str]:
    from source_text import read_excerpt

    first = read_excerpt(
        "generation/stopping_criteria.py", tokenizer, tokens, anchor="class MaxLengthCriteria"
    )
    second = read_excerpt(
        "generation/stopping_criteria.py", tokenizer, tokens, anchor="class EosTokenCriteria"
    )
    return [
        f"read_file returned:\n```python\n{first}\n```\nWhen does MaxLengthCriteria stop generation?",
        f"read_file returned:\n```python\n{second}\n```\nWhat does EosTokenCriteria check?",
        "Summarize both classes in one sentence.",
    ]


def run_pipeline(model, tokenizer, enabled: bool, turns: list[str], max_new_tokens: int = 16) -> dict:
    """A chat through ``pipeline("text-generation")``: the message list grows with each answer."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "system", "content": SYSTEM}]
    answers = []
    with one_run(model, enabled) as run:
        for text in turns:
            messages.append({"role": "user", "content": text})
            out = pipe(messages, max_new_tokens=max_new_tokens, do_sample=False)
            messages = out[0]["generated_text"]
            answers.append(messages[-1]["content"])
    run["outputs"] = answers
    return run


def smolagents_model(model_dir, max_new_tokens: int):
    from smolagents import TransformersModel

    return TransformersModel(
        model_id=str(model_dir), device_map="cpu", max_new_tokens=max_new_tokens, do_sample=False
    )


def run_smolagents(agent_model, enabled: bool, steps: int = 3, task: str | None = None) -> dict:
    """A ``CodeAgent`` with one trivial tool for ``steps`` steps (plus its final-answer call)."""
    from smolagents import ActionStep, CodeAgent, tool

    @tool
    def add(a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        return a + b

    agent = CodeAgent(tools=[add], model=agent_model, max_steps=steps, verbosity_level=0)
    task = task or "What is 17 + 25? Use the add tool, then give the final answer."
    with one_run(agent_model.model, enabled) as run:
        final = agent.run(task)
    outputs = [s.model_output for s in agent.memory.steps if isinstance(s, ActionStep)]
    run["outputs"] = outputs + [str(final)]
    run["retokenized"] = retokenized_loss(run["records"])
    return run


def fewshot_requests(tokenizer, n: int = 8, shots: int = 12, max_gen_toks: int = 8):
    """``n`` generate_until Instances sharing a few-shot prefix of ``shots`` solved examples."""
    from lm_eval.api.instance import Instance

    def example(i):
        a, b = 3 * i + 7, 5 * i + 11
        return f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n"

    prefix = "Answer each arithmetic question with a number.\n\n" + "".join(example(i) for i in range(shots))
    contexts = [prefix + f"Question: What is {11 * j + 4} plus {7 * j + 9}?\nAnswer:" for j in range(n)]
    kwargs = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]


def run_lm_eval(model, tokenizer, enabled: bool, requests) -> dict:
    """``HFLM(pretrained=model, tokenizer=tok, batch_size=4).generate_until(requests)``."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    with one_run(model, enabled) as run:
        run["outputs"] = lm.generate_until(requests, disable_tqdm=True)
    return run


GRPO_PROMPTS = [f"Name a prime number between {10 * i} and {10 * i + 20}." for i in range(1, 5)]
GRPO_PREFIX = (
    "You are a careful assistant. Read the question, think about it, and answer in a few words. "
    "Keep answers short, plain and correct.\n\nQuestion: "
)


def run_trl(load, tokenizer, enabled: bool, steps: int = 2, new_tokens: int = 4, seed: int = 0) -> dict:
    """``GRPOTrainer`` (no vLLM, LoRA) for ``steps`` steps on 4 prompts x G=4; ``load()`` -> a fresh model.

    The rollouts are read where a user reads them: the reward function gets ``completion_ids``."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    rollouts = []

    def reward_ids(completions, completion_ids, **kwargs):
        """Trivial, but it varies within a group (an equal reward everywhere trains nothing)."""
        rollouts.append([list(c) for c in completion_ids])
        return [float(sum(c) % 7) for c in completion_ids]

    torch.manual_seed(seed)
    model = load()
    dataset = Dataset.from_dict({"prompt": [GRPO_PREFIX + p for p in GRPO_PROMPTS]})
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=16,
            num_generations=4,
            max_completion_length=new_tokens,
            max_steps=steps,
            learning_rate=1e-3,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            seed=seed,
            disable_tqdm=True,
        )
        peft = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        with one_run(model, enabled) as run:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=reward_ids,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft,
            )
            trainer.train()
    run["outputs"] = rollouts
    # every step's weights are new: nothing carries over from one rollout call to the next
    run["ideal_positions"] = sum(ideal_positions([call]) for call in run["records"])
    run["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return run


def tiny_checkpoint(path: Path, tokenizer, seed: int = 0) -> Path:
    """A random-weight Llama (2 layers, 64 wide) with ``tokenizer`` (SmolLM2's: a chat template)
    saved in ``path``: what a tool loads by name, at a fraction of the real model's cost."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- the benchmark
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    p.add_argument(
        "--model",
        default="smollm2",
        choices=["smollm2", "tiny"],
        help="tiny: random weights, SmolLM2's tokenizer",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="plain/enabled pairs per tool (the order alternates)"
    )
    p.add_argument("--agent-steps", type=int, default=3, help="smolagents: max_steps")
    p.add_argument("--trl-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON path (default docs/results/bench_clients.json)")
    return p.parse_args(argv)


class Tool:
    """One tool's plain and enabled runs on the same inputs (separate model objects)."""

    def __init__(self, name: str, args, model_dir: Path, tokenizer, load):
        self.name, self.args, self.tokenizer, self.load = name, args, tokenizer, load
        if name == "smolagents":
            self.models = {e: smolagents_model(model_dir, max_new_tokens=32) for e in (False, True)}
        elif name in ("pipeline", "lm-eval"):
            self.models = {e: load() for e in (False, True)}
        self.turns = chat_turns(tokenizer)
        self.requests = fewshot_requests(tokenizer)

    def run(self, enabled: bool) -> dict:
        a, tok = self.args, self.tokenizer
        if self.name == "pipeline":
            return run_pipeline(self.models[enabled], tok, enabled, self.turns)
        if self.name == "smolagents":
            return run_smolagents(self.models[enabled], enabled, steps=a.agent_steps)
        if self.name == "lm-eval":
            return run_lm_eval(self.models[enabled], tok, enabled, self.requests)
        return run_trl(self.load, tok, enabled, steps=a.trl_steps)


def summarize(name: str, runs: list[dict]) -> dict:
    plain = [r for r in runs if not r["enabled"]]
    enabled = [r for r in runs if r["enabled"]]
    first_p, first_e = plain[0], enabled[0]
    t_p = sum(r["time_s"] for r in plain) / len(plain)
    t_e = sum(r["time_s"] for r in enabled) / len(enabled)
    out = dict(
        tool=name,
        calls=first_p["calls"],
        prompt_tokens=first_p["prompt_tokens"],
        prefill_plain=first_p["prefill_positions"],
        prefill_enabled=first_e["prefill_positions"],
        prefill_ratio=first_e["prefill_positions"] / first_p["prefill_positions"],
        ideal=first_p["ideal_positions"],
        hit_tokens=first_e["hit_tokens"],
        time_plain_s=t_p,
        time_enabled_s=t_e,
        time_ratio=t_e / t_p,
        generate_plain_s=sum(r["generate_s"] for r in plain) / len(plain),
        generate_enabled_s=sum(r["generate_s"] for r in enabled) / len(enabled),
        identical=all(r["outputs"] == first_p["outputs"] for r in runs),
    )
    if name == "smolagents":  # what re-rendering the stripped answers cost
        steps = [x for x in first_e["retokenized"] if x["common"] >= x["previous_prompt"]]
        out["answer_tokens_lost"] = sum(x["lost"] for x in steps)
        out["answer_tokens_fed_back"] = sum(x["previous"] - x["previous_prompt"] for x in steps)
    return out


def slim(run: dict) -> dict:
    """A run for the JSON: per call its rows' prompt lengths and figures, not every token id."""
    calls = [
        dict(
            prompt_lengths=[len(r) for r in c["prompts"]],
            decode_steps=len(c["fed_back"]),
            prefill=c["prefill"],
            decode=c["decode"],
            generate_s=c["end"] - c["start"],
        )
        for c in run["records"]
    ]
    return {**run, "records": calls}


def table(rows: list[dict]) -> str:
    lines = [
        "| tool | generate() calls | prompt tokens | prefill positions plain | enabled (x plain) | ideal | "
        "hit tokens | time plain (s) | enabled (s, x plain) | in generate() plain (s) | enabled (s, x plain) | "
        "identical outputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tool']} | {r['calls']} | {r['prompt_tokens']:,} | {r['prefill_plain']:,} | "
            f"{r['prefill_enabled']:,} ({r['prefill_ratio']:.2f}x) | {r['ideal']:,} | {r['hit_tokens']:,} | "
            f"{r['time_plain_s']:.1f} | {r['time_enabled_s']:.1f} ({r['time_ratio']:.2f}x) | "
            f"{r['generate_plain_s']:.1f} | {r['generate_enabled_s']:.1f} "
            f"({r['generate_enabled_s'] / r['generate_plain_s']:.2f}x) | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from smollm2 import ensure_cached, load_smollm2
    from workloads import environment

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"unknown tools {sorted(unknown)}; choose from {TOOLS}")
    model_dir = ensure_cached()
    tokenizer = load_smollm2()[1]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model_dir = tiny_checkpoint(Path(tmp), tokenizer)

        def load():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
            )
            return model.eval()

        results, records = [], {}
        for name in tools:
            tool = Tool(name, args, model_dir, tokenizer, load)
            runs = []
            for rep in range(args.repeats):
                for enabled in (False, True) if rep % 2 == 0 else (True, False):
                    run = tool.run(enabled)
                    run["enabled"] = enabled
                    runs.append(run)
                    print(
                        f"{name} {'enabled' if enabled else 'plain'}: {run['time_s']:.1f} s, "
                        f"prefill {run['prefill_positions']:,}, hit tokens {run['hit_tokens']:,}",
                        file=sys.stderr,
                        flush=True,
                    )
            results.append(summarize(name, runs))
            records[name] = [slim(r) for r in runs]
            del tool
    print(table(results))
    for r in results:
        if "answer_tokens_lost" in r:
            print(
                f"smolagents: of {r['answer_tokens_fed_back']} generated tokens the next steps render back, "
                f"{r['answer_tokens_lost']} are not a prefix of the next prompt (stripped and re-tokenized)"
            )
    out = Path(args.out) if args.out else REPO / "docs" / "results" / "bench_clients.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv[1:],
        args=vars(args),
        environment=environment("cpu")
        | {pkg: _version(pkg) for pkg in ("trl", "smolagents", "lm_eval", "peft", "accelerate", "datasets")},
        summary=results,
        runs=records,
    )
    out.write_text(json.dumps(payload, indent=1))
    out.with_suffix(".txt").write_text(table(results) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["identical"] for r in results) else 1


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
