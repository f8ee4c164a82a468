"""Benchmark workloads: seeded coding-agent sessions, Mooncake trace replay, ideal hit rates.

Used by ``scripts/bench_agent.py`` and ``scripts/replay_trace.py``; importable from notebooks. Only
numpy and json here (plus transformers for :func:`tiny_llama`, imported when called).

Agent workload (:func:`agent_workload`)
    ``sessions`` concurrent coding-agent sessions, interleaved round-robin. Every session starts
    with the same system prompt and tool descriptions (the shared prefix) and its own task; each
    later turn appends a tool result (file read, test log, diff: 50-3000 tokens, log-uniform) to the
    full history, *including the model's previous answer*, and asks for a short answer (16-128
    tokens). Answers come from the model at run time, so a :class:`AgentSession` builds prompts
    from what was really generated. Everything else is drawn from one seed.

Mooncake traces (:func:`load_mooncake`, :func:`trace_prompt`)
    One JSON object per line with ``input_length``, ``output_length`` and ``hash_ids`` (one id per
    512-token block). Each hash id becomes a fixed pseudo-random run of ``block_tokens`` tokens
    (seeded by the id), so the trace's prefix structure survives a scale-down of the block size.

Ideal hit rates (:class:`PrefixIndex`, :func:`ideal_hits`, :func:`trace_ideal_hits`)
    What an infinite prefix cache with ``block_size``-token blocks could reuse: per call, the
    longest prefix of the prompt made of full blocks that an earlier call held K/V for, capped at
    ``len(prompt) - 1`` (the last prompt token is always computed, to get the next token's logits).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "AgentTurn",
    "AgentWorkload",
    "AgentSession",
    "agent_workload",
    "PrefixIndex",
    "ideal_hits",
    "TraceRequest",
    "load_mooncake",
    "trace_prompt",
    "scaled_length",
    "trace_ideal_hits",
    "tiny_llama",
    "environment",
    "MODEL_SIZES",
    "tiny_qwen3_5",
]

RESERVED_IDS = 3  # token ids 0-2 (pad, bos, eos) are never drawn


# ---------------------------------------------------------------------------- agent sessions
@dataclass(frozen=True)
class AgentTurn:
    """One generate() call of the workload."""

    index: int  # position in call order
    session: int
    turn: int  # 0 = the task, then one per tool result
    new_tokens: np.ndarray  # appended to the session's history before this call
    max_new_tokens: int  # length of the answer


@dataclass(frozen=True)
class AgentWorkload:
    shared_prefix: np.ndarray  # system prompt + tool descriptions (without sharing: only its length is used)
    calls: list[AgentTurn]  # in call order: round-robin over sessions
    sessions: int
    turns: int
    share: bool
    vocab_size: int
    seed: int

    def new_sessions(self) -> list[AgentSession]:
        """Fresh per-session state (one list per benchmark mode)."""
        return [AgentSession(self, s) for s in range(self.sessions)]


@dataclass
class AgentSession:
    """A session's history as a given mode saw it (answers differ if a mode's outputs differ)."""

    workload: AgentWorkload
    session: int
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def prompt(self, call: AgentTurn) -> np.ndarray:
        """The prompt of ``call``: the history so far plus the call's new tokens.

        Without sharing, a prompt of the same length made of fresh tokens (no call shares a
        prefix with any other).
        """
        assert call.session == self.session
        history = self.history if len(self.history) else self.workload.shared_prefix
        prompt = np.concatenate([history, call.new_tokens])
        if not self.workload.share:
            rng = np.random.default_rng([self.workload.seed, 1, call.index])
            prompt = rng.integers(RESERVED_IDS, self.workload.vocab_size, len(prompt), dtype=np.int64)
        return prompt

    def record(self, prompt: np.ndarray, output: np.ndarray) -> None:
        """After a call: the history becomes ``prompt + output`` (the model's answer stays in it)."""
        self.history = np.concatenate([np.asarray(prompt, np.int64), np.asarray(output, np.int64)])


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def agent_workload(
    *,
    sessions: int = 4,
    turns: int = 12,
    system_tokens: int = 1200,
    tool_tokens: int = 800,
    task_tokens: tuple[int, int] = (100, 400),
    result_tokens: tuple[int, int] = (50, 3000),
    answer_tokens: tuple[int, int] = (16, 128),
    vocab_size: int = 4096,
    share: bool = True,
    seed: int = 0,
    token_source=None,
) -> AgentWorkload:
    """A seeded workload of ``sessions`` x ``turns`` calls, interleaved round-robin.

    Turn 0 of a session is the shared prefix (``system_tokens + tool_tokens``, identical in every
    session) plus a task of ``task_tokens`` tokens (uniform); turn ``t > 0`` appends a tool result
    of ``result_tokens`` tokens (log-uniform: many small reads, a few large logs). Each call asks
    for ``answer_tokens`` new tokens (log-uniform). ``share=False`` keeps every length but makes
    each prompt fresh tokens (a workload with no shared prefix at all).

    ``token_source(rng, n) -> ids`` draws the ``n`` token ids of a piece of text (the shared
    prefix, a task, a tool result), e.g. windows of real text (``source_text.TextTokens``) for a real
    model; default: uniform random ids in ``[3, vocab_size)``. Lengths and answer sizes are drawn
    the same way with either source.
    """
    rng = np.random.default_rng(seed)
    draw = token_source or (lambda g, n: g.integers(RESERVED_IDS, vocab_size, n, dtype=np.int64))
    prefix = draw(rng, system_tokens + tool_tokens)
    per_session = []
    for _ in range(sessions):
        seq = []
        for t in range(turns):
            n = (
                int(rng.integers(task_tokens[0], task_tokens[1] + 1))
                if t == 0
                else _log_uniform(rng, *result_tokens)
            )
            tokens = draw(rng, n)
            seq.append((tokens, _log_uniform(rng, *answer_tokens)))
        per_session.append(seq)
    calls = []
    for t in range(turns):
        for s in range(sessions):
            tokens, answer = per_session[s][t]
            calls.append(AgentTurn(len(calls), s, t, tokens, answer))
    return AgentWorkload(prefix, calls, sessions, turns, share, vocab_size, seed)


# ---------------------------------------------------------------------------- ideal hit rate
class PrefixIndex:
    """The full blocks of every sequence added so far, as a trie (exact: no hashing collisions)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._children: dict[tuple[int, bytes], int] = {}

    def _blocks(self, tokens):
        bs = self.block_size
        data = np.ascontiguousarray(tokens, dtype="<i8")
        for j in range(len(data) // bs):
            yield data[j * bs : (j + 1) * bs].tobytes()

    def add(self, tokens) -> None:
        node = 0
        for block in self._blocks(tokens):
            node = self._children.setdefault((node, block), len(self._children) + 1)

    def match(self, tokens) -> int:
        """Leading tokens of ``tokens`` held in full blocks (a multiple of ``block_size``)."""
        node, n = 0, 0
        for block in self._blocks(tokens):
            node = self._children.get((node, block))
            if node is None:
                break
            n += self.block_size
        return n

    @property
    def num_blocks(self) -> int:
        """Distinct blocks stored (the footprint of an infinite cache)."""
        return len(self._children)


def ideal_hits(calls, block_size: int) -> list[int]:
    """Per call, the prompt tokens an infinite prefix cache could serve.

    ``calls`` is a sequence of ``(prompt, cached)`` pairs in call order: ``cached`` is the sequence
    the call leaves K/V for (``prompt + output[:-1]`` for generate(): the last answer token is
    never fed back). Hits are ``min(matched full blocks, len(prompt) - 1)``.
    """
    index = PrefixIndex(block_size)
    out = []
    for prompt, cached in calls:
        out.append(max(0, min(index.match(prompt), len(prompt) - 1)))
        index.add(cached)
    return out


# ---------------------------------------------------------------------------- Mooncake traces
@dataclass(frozen=True)
class TraceRequest:
    timestamp: float  # ms from the start of the trace
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]  # one per original block of the prompt


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake-format JSONL trace (first ``limit`` requests)."""
    out = []
    with open(path) as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            r = json.loads(line)
            out.append(
                TraceRequest(
                    float(r.get("timestamp", 0)),
                    int(r["input_length"]),
                    int(r["output_length"]),
                    tuple(r["hash_ids"]),
                )
            )
    return out


def scaled_length(req: TraceRequest, block_tokens: int, original_block: int = 512) -> int:
    """Prompt length after scaling ``original_block`` tokens per hash id down to ``block_tokens``."""
    n = round(req.input_length * block_tokens / original_block)
    return max(1, min(n, len(req.hash_ids) * block_tokens))


def trace_prompt(
    req: TraceRequest,
    block_tokens: int = 16,
    *,
    vocab_size: int = 4096,
    seed: int = 0,
    original_block: int = 512,
) -> np.ndarray:
    """The request's prompt: each hash id's fixed run of ``block_tokens`` tokens, cut to the scaled length."""
    n = scaled_length(req, block_tokens, original_block)
    runs = [
        np.random.default_rng([seed, h]).integers(RESERVED_IDS, vocab_size, block_tokens, dtype=np.int64)
        for h in req.hash_ids[: -(-n // block_tokens)]
    ]
    return np.concatenate(runs)[:n]


def trace_ideal_hits(
    requests: list[TraceRequest],
    block_tokens: int = 16,
    original_block: int = 512,
    donors: list | None = None,
) -> tuple[list[int], list[int]]:
    """``(hits, lengths)`` per request, in scaled tokens, for an infinite cache of full blocks.

    Computed from the hash ids alone: a request reuses its leading full blocks whose id path an
    earlier request stored, capped at ``length - 1``. With ``block_tokens == original_block`` this
    is the trace's own ideal hit rate. If a list is given as ``donors``, it receives per request
    the index of one earlier request that holds the whole reused prefix (None without hits).
    """
    children: dict[tuple[int, int], int] = {}
    creator: list[int] = [-1]  # node id -> request that first stored it
    hits, lengths = [], []
    for i, req in enumerate(requests):
        n = scaled_length(req, block_tokens, original_block)
        full = req.hash_ids[: n // block_tokens]
        node, matched = 0, 0
        for h in full:
            nxt = children.get((node, h))
            if nxt is None:
                break
            node, matched = nxt, matched + 1
        hits.append(max(0, min(matched * block_tokens, n - 1)))
        lengths.append(n)
        if donors is not None:
            donors.append(creator[node] if hits[-1] > 0 else None)
        node = 0
        for h in full:
            nxt = children.get((node, h))
            if nxt is None:
                nxt = children[(node, h)] = len(creator)
                creator.append(i)
            node = nxt
    return hits, lengths


# ---------------------------------------------------------------------------- models
MODEL_SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "micro": (32, 1, 2, 2, 64),  # pool bookkeeping only (replay hit-rate curves)
    "quick": (256, 4, 4, 2, 768),
    "default": (384, 6, 6, 2, 1024),
}
_COMMON = dict(max_position_embeddings=65536, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llama(size: str = "quick", device="cpu", dtype=None, vocab_size: int = 4096, seed: int = 0):
    """A random-weight Llama built from a config (nothing downloaded), sdpa attention, eval mode.

    EOS is disabled in its generation config, so every call generates exactly ``max_new_tokens``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, inter = MODEL_SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **_COMMON,
    )
    return _build(LlamaForCausalLM, config, device, dtype, seed)


def tiny_qwen3_5(size: str = "quick", device="cpu", dtype=None, vocab_size: int = 4096, seed: int = 0):
    """A random-weight Qwen3.5 text model (gated DeltaNet + full attention, 3 linear layers per full
    one, as the released models), sized like :func:`tiny_llama`; eos disabled."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    hidden, layers, heads, kv_heads, inter = MODEL_SIZES[size]
    layers = max(4, layers // 4 * 4)
    head_dim = hidden // heads
    config = Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"]
        * (layers // 4),
        linear_num_key_heads=heads // 2,
        linear_num_value_heads=heads,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        **_COMMON,
    )
    return _build(AutoModelForCausalLM.from_config, config, device, dtype, seed)


def _build(make, config, device, dtype, seed: int):
    """Random weights from ``seed``, sdpa attention, EOS disabled, eval mode."""
    import torch

    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = make(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def environment(device) -> dict:
    """What a benchmark ran on: versions, platform, threads, device (for its JSON)."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:
        hf_kvpool_version = version("hf-kvpool")
    except PackageNotFoundError:  # run from a checkout that is not installed
        hf_kvpool_version = None

    device = torch.device(device)
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        hf_kvpool=hf_kvpool_version,
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
    )
