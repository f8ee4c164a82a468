"""A real multi-turn agent loop on SmolLM2-135M-Instruct: stateless vs pooled, turn by turn.

Each session is a chat (``tokenizer.apply_chat_template`` re-rendered over the growing message
list every turn, as an agent framework does): a shared system prompt with tool descriptions, a task,
then per turn the model's previous answer (an assistant message, its decoded text) and the output
of a tool call (``read_file``: a real source file of the installed transformers package, cut to a
few hundred tokens) with a question about it. The tool calls follow a fixed plan (a 135M model
does not pick tools reliably); the answers are the model's own, greedy, up to ``--max-new-tokens``
or its end-of-turn token.

Every turn runs twice, order alternating: ``stateless`` (a fresh ``DynamicCache``) and ``pooled``
(a fresh ``PooledCache(model)``, one pool for the whole run). Per turn it prints the model's answer,
TTFT of both, the prompt tokens taken from the pool next to the ideal (an infinite prefix cache of
the same block size), how many tokens of the previous call the re-rendered prompt no longer starts
with, and whether both answers are the same tokens. The history continues with the stateless answer.

Re-rendering tokenizes the model's earlier answers again; where the model generated a split of a
word that the tokenizer would not produce, the prompt leaves the pooled prefix there.
``--keep-ids`` builds each prompt from the previous call's token ids instead (:func:`extend_ids`).

    python scripts/demo_agent.py                 # ~1-3 min on 2 CPU cores (what scripts/demo.sh runs)
    python scripts/demo_agent.py --sessions 2 --turns 4 --max-new-tokens 24 --keep-ids

``agent_loop`` is also what ``notebooks/02_agent_loop.ipynb`` runs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from bench_agent import timed_generate
from source_text import read_excerpt
from transformers import DynamicCache

from hf_kvpool import KVPool, PooledCache

SYSTEM = (
    "You are a coding assistant that reads source code of the Hugging Face transformers library "
    "and answers questions about it briefly. Your tool, read_file(path, start), returns part of a "
    "source file of the installed transformers package."
)


@dataclass(frozen=True)
class ToolStep:
    """One tool call of the plan (a file of the transformers package, from a line on) and the question after it."""

    path: str
    anchor: str
    question: str


# documentation that --context-tokens adds to the system prompt: (file, line to start from)
REFERENCE = ("generation/configuration_utils.py", "class GenerationConfig")

# (task, tool steps in order): session s follows TASKS[s % len(TASKS)]
TASKS = (
    (
        "I want to understand how generate() in transformers decides when to stop. Which parts of the "
        "code should we read?",
        (
            ToolStep(
                "generation/stopping_criteria.py",
                "class MaxLengthCriteria",
                "When does MaxLengthCriteria stop generation?",
            ),
            ToolStep(
                "generation/stopping_criteria.py",
                "class EosTokenCriteria",
                "What does EosTokenCriteria check?",
            ),
            ToolStep(
                "generation/stopping_criteria.py",
                "class MaxTimeCriteria",
                "When does MaxTimeCriteria stop generation?",
            ),
            ToolStep(
                "generation/stopping_criteria.py",
                "class StoppingCriteriaList",
                "How does StoppingCriteriaList combine several criteria?",
            ),
            ToolStep("generation/streamers.py", "class TextStreamer", "What is TextStreamer used for?"),
            ToolStep(
                "generation/logits_process.py",
                "class TemperatureLogitsWarper",
                "What does the temperature do to the logits?",
            ),
        ),
    ),
    (
        "I want to understand how transformers keeps the attention keys and values between decoding "
        "steps. Which parts of the code should we read?",
        (
            ToolStep(
                "cache_utils.py", "class DynamicLayer", "What does the update method of DynamicLayer do?"
            ),
            ToolStep("cache_utils.py", "class DynamicCache", "What is DynamicCache?"),
            ToolStep("cache_utils.py", "class StaticLayer", "How does StaticLayer differ from DynamicLayer?"),
            ToolStep(
                "models/llama/modeling_llama.py",
                "class LlamaAttention",
                "Where does LlamaAttention use the cache?",
            ),
            ToolStep("masking_utils.py", "def causal_mask_function", "What does the causal mask allow?"),
            ToolStep(
                "cache_utils.py", "class DynamicSlidingWindowLayer", "What does the sliding window change?"
            ),
        ),
    ),
)


# ---------------------------------------------------------------------------- chat sessions
@dataclass
class ChatSession:
    """One agent's conversation; ``prompt_ids`` renders the whole message list with the chat template."""

    tokenizer: object
    task: str
    plan: tuple
    tool_tokens: int = 300
    keep_ids: bool = False  # extend the last call's token ids instead of re-rendering everything
    system: str = SYSTEM
    messages: list = field(default_factory=list)
    steps: int = 0
    history: list = field(default_factory=list)  # last prompt + its answer's token ids

    def __post_init__(self):
        self.messages = [{"role": "system", "content": self.system}, {"role": "user", "content": self.task}]

    def prompt_ids(self) -> list[int]:
        if self.keep_ids and self.history:
            return extend_ids(self.tokenizer, self.history, self.messages)
        return render(self.tokenizer, self.messages)

    def add_answer(self, prompt: list[int], answer: list[int]) -> str:
        """Append the model's answer (its decoded text) as an assistant message; returns the text."""
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        self.history = list(prompt) + list(answer)
        return text

    def add_tool_result(self) -> str:
        """Run the plan's next tool call; its output and a question become the next user message.

        Returns the call, as text.
        """
        step = self.plan[self.steps % len(self.plan)]
        self.steps += 1
        code = read_excerpt(step.path, self.tokenizer, self.tool_tokens, anchor=step.anchor)
        call = f"read_file({step.path!r}, start={step.anchor!r})"
        self.messages.append(
            {"role": "user", "content": f"Result of {call}:\n```python\n{code}\n```\n{step.question}"}
        )
        return call


def system_prompt(tokenizer, context_tokens: int = 0) -> str:
    """:data:`SYSTEM`, plus ``context_tokens`` of reference documentation (the ``GenerationConfig``
    docstring) when > 0: a longer prefix that every session shares."""
    if context_tokens <= 0:
        return SYSTEM
    doc = read_excerpt(REFERENCE[0], tokenizer, context_tokens, anchor=REFERENCE[1])
    return f"{SYSTEM}\n\nReference ({REFERENCE[0]}):\n```python\n{doc}\n```"


def render(tokenizer, messages) -> list[int]:
    """The usual way: the chat template over the whole message list, tokenized."""
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def extend_ids(tokenizer, history: list[int], messages) -> list[int]:
    """The next prompt without re-tokenizing the past: ``history`` (the last prompt plus the token ids
    generated, as they are) followed by the tokens of the text the template puts after them.

    Re-rendering tokenizes the model's answer again, and a model does not always generate the
    tokenizer's own split of its text (``Stop|ping`` where the tokenizer says ``St|opping``): the
    prompt then leaves the pooled prefix at that token. Falls back to :func:`render` when the
    template's text does not start with the history's text.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    done = tokenizer.decode(history)
    if not text.startswith(done):
        return render(tokenizer, messages)
    return list(history) + tokenizer(text[len(done) :], add_special_tokens=False)["input_ids"]


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def expected_reuse(prompt, earlier, block_size: int) -> int:
    """What an infinite prefix cache serves: the longest prefix shared with a sequence held earlier
    (a call holds K/V of its prompt and its answer minus the last token), in full blocks, capped at
    ``len(prompt) - 1``."""
    match = max((common_prefix(prompt, seq) for seq in earlier), default=0)
    return max(0, min(match // block_size * block_size, len(prompt) - 1))


# ---------------------------------------------------------------------------- the loop
def run_stateless(model, ids, max_new_tokens):
    return timed_generate(
        model, ids, DynamicCache(config=model.config), max_new_tokens, ids.device, exact=False
    )


def run_pooled(model, ids, max_new_tokens, pool):
    cache = PooledCache(model, pool=pool)
    out = timed_generate(model, ids, cache, max_new_tokens, ids.device, exact=False)
    return (*out, int(cache.reused_tokens[0]))


def agent_loop(
    model,
    tokenizer,
    *,
    sessions: int = 1,
    turns: int = 6,
    max_new_tokens: int = 48,
    tool_tokens: int = 300,
    context_tokens: int = 0,
    keep_ids: bool = False,
    pool: KVPool | None = None,
) -> Iterator[dict]:
    """Yield one record per call, sessions interleaved round-robin; see the module docstring."""
    pool = pool or KVPool(block_size=16)
    device = next(model.parameters()).device
    bs = pool.block_size
    system = system_prompt(tokenizer, context_tokens)
    chats = [
        ChatSession(
            tokenizer, *TASKS[s % len(TASKS)], tool_tokens=tool_tokens, keep_ids=keep_ids, system=system
        )
        for s in range(sessions)
    ]
    held: list[list[int]] = []  # every call's prompt + answer[:-1]: what the pool was given
    last: dict[int, list[int]] = {}
    for turn in range(turns):
        for s, chat in enumerate(chats):
            tool = chat.add_tool_result() if turn else None
            prompt = chat.prompt_ids()
            ids = torch.tensor([prompt], device=device)
            first = "pooled" if (turn + s) % 2 else "stateless"
            if first == "pooled":
                pooled = run_pooled(model, ids, max_new_tokens, pool)
            stateless = run_stateless(model, ids, max_new_tokens)
            if first == "stateless":
                pooled = run_pooled(model, ids, max_new_tokens, pool)
            answer = stateless[0].tolist()
            text = chat.add_answer(prompt, answer)
            prev = last.get(s)
            kept = None if prev is None else common_prefix(prompt, prev)
            yield dict(
                session=s,
                turn=turn,
                tool=tool,
                prompt_tokens=len(prompt),
                new_tokens=len(answer),
                text=text,
                ttft_stateless=stateless[1],
                ttft_pooled=pooled[1],
                latency_stateless=stateless[2],
                latency_pooled=pooled[2],
                reused=pooled[3],
                ideal=expected_reuse(prompt, held, bs),
                # tokens of the previous call that this prompt does not start with, and the reuse that costs
                rerender_lost=None if prev is None else len(prev) - kept,
                rerender_cost=0 if prev is None else (len(prev) // bs - kept // bs) * bs,
                identical=bool(np.array_equal(stateless[0], pooled[0])),
            )
            last[s] = prompt + answer[:-1]
            held.append(last[s])


# ---------------------------------------------------------------------------- printing
def describe(r: dict) -> str:
    head = f"[session {r['session']} turn {r['turn']}]"
    tool = f" {r['tool']}" if r["tool"] else " task"
    answer = textwrap.fill(
        r["text"].strip() or "(empty)", 100, initial_indent="  model: ", subsequent_indent="         "
    )
    lost = "" if not r["rerender_lost"] else f", {r['rerender_lost']} tokens of the last call re-tokenized"
    return (
        f"{head}{tool}\n{answer}\n"
        f"  prompt {r['prompt_tokens']:>5} tok | TTFT stateless {r['ttft_stateless']:6.2f} s, "
        f"pooled {r['ttft_pooled']:6.2f} s ({r['ttft_stateless'] / r['ttft_pooled']:4.1f}x) | "
        f"reused {r['reused']:>5} (ideal {r['ideal']}{lost}) | "
        f"{'identical' if r['identical'] else 'DIFFERENT'} ({r['new_tokens']} tokens)"
    )


def summary(records: list[dict]) -> str:
    total = {k: sum(r[k] for r in records) for k in ("ttft_stateless", "ttft_pooled", "reused", "ideal")}
    prompt = sum(r["prompt_tokens"] for r in records)
    lost = [r["rerender_lost"] for r in records if r["rerender_lost"] is not None]
    cost = sum(r["rerender_cost"] for r in records)
    same = sum(r["identical"] for r in records)
    return (
        f"TTFT total: stateless {total['ttft_stateless']:.2f} s, pooled {total['ttft_pooled']:.2f} s "
        f"({total['ttft_stateless'] / total['ttft_pooled']:.1f}x faster)\n"
        f"prompt tokens taken from the pool: {total['reused']:,} of {prompt:,} "
        f"({total['reused'] / prompt:.1%}; ideal {total['ideal'] / prompt:.1%})\n"
        f"prompts left the previous call's tokens early: {sum(lost)} tokens over {len(lost)} turns "
        f"({cost} fewer tokens reused)\n"
        f"answers identical to DynamicCache (tokens): {same}/{len(records)}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1, help="concurrent agents sharing the system prompt")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--tool-tokens", type=int, default=300, help="tokens of each tool result")
    p.add_argument(
        "--context-tokens",
        type=int,
        default=0,
        help="reference documentation added to the shared system prompt",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the benchmark)")
    p.add_argument(
        "--keep-ids",
        action="store_true",
        help="extend the last call's token ids with the new messages' tokens instead of re-rendering the chat",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from smollm2 import load_smollm2

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f} s; torch threads {args.threads}\n")
    warm = torch.tensor(
        [tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], return_dict=False)]
    )
    pool = KVPool(block_size=16)
    run_stateless(model, warm, 2)  # untimed warm-ups (the first PooledCache also fingerprints the weights)
    run_pooled(model, warm, 2, pool)
    pool.clear()
    records = []
    for r in agent_loop(
        model,
        tokenizer,
        sessions=args.sessions,
        turns=args.turns,
        max_new_tokens=args.max_new_tokens,
        tool_tokens=args.tool_tokens,
        context_tokens=args.context_tokens,
        keep_ids=args.keep_ids,
        pool=pool,
    ):
        print(describe(r), flush=True)
        records.append(r)
    print("\n" + summary(records))
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    return 0 if all(r["identical"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
