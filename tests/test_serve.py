"""``python -m hf_kvpool.serve``: transformers serve with the pool, over HTTP, on SmolLM2-135M-Instruct.

Servers run as subprocesses on free 127.0.0.1 ports, one torch thread each. Two interleaved 3-turn
chats (greedy, through the ``openai`` client) must get the same answers from ``hf_kvpool.serve`` as
from plain ``transformers serve``, and ``/metrics`` must show the pool served prompt tokens; a
client that disconnects mid-stream must leave the server serving and the pool reusable; a request
with the fields routers add must be answered (plain transformers serve says 422); and a chat
through ``sglang-router`` (cache-aware) in front of two replicas must be served and reused.

In process, on a tiny model: a generate() that a streamer aborts with an exception (what
transformers serve does on a disconnect) leaves no block pinned and the pool serving exact K/V.

Skipped when the serving dependencies are missing (``pip install -e '.[serve]'``); the real model
follows ``tests/test_real_model.py``'s rules (``HF_KVPOOL_OFFLINE=1`` skips).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
import torch
from helpers import assert_same, generate, real_model_or_skip, reference
from tiny_models import build, prompt

from hf_kvpool import KVPool, PooledCache

for _name in ("openai", "fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_name, reason=f"{_name} is missing: pip install -e '.[serve]'")

import openai  # noqa: E402
import serve_replicas as sr  # noqa: E402

MAX_TOKENS = 12
ROUTER_FIELDS = {
    "stream_reasoning": True,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "no_stop_trim": False,
    "return_hidden_states": False,
}
QUESTIONS = [
    ["Name one prime number.", "Name a larger one.", "Add the two."],
    ["What colour is the sky?", "And at night?", "Say it in French."],
]


# ---------------------------------------------------------------------------- in process
class _Abort(Exception):
    pass


class _AbortingStreamer:
    """Like transformers serve's DirectStreamer after a disconnect: put() raises once cancelled."""

    def __init__(self, after: int):
        self.puts, self.after = 0, after

    def put(self, value):
        self.puts += 1
        if self.puts > self.after:
            raise _Abort

    def end(self):
        pass


def test_aborted_generate_leaves_the_pool_consistent(one_thread):
    model = build("llama")
    pool = KVPool(block_size=4)
    ids = prompt(22, seed=3)
    with pytest.raises(_Abort):
        generate(
            model, ids, PooledCache(model, pool=pool), max_new_tokens=12, streamer=_AbortingStreamer(after=6)
        )
    blocks = pool._device.manager.blocks()
    assert blocks and all(b.pins == 0 for b in blocks), "a block stayed pinned after the abort"
    # the prompt's 5 full blocks and the generated tokens' completed blocks, no half-written block
    assert pool.stats().stored_blocks >= 5
    # the next call over the same history (the aborted tokens included) is exact and reuses them
    out = reference(model, ids, max_new_tokens=6)
    longer = torch.cat([out.sequences, prompt(5, seed=4)], dim=-1)
    cache = PooledCache(model, pool=pool)
    assert_same(reference(model, longer), generate(model, longer, cache))
    assert cache.reused_tokens[0] >= 20


# ---------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def model_dir():
    from smollm2 import ensure_cached

    return str(real_model_or_skip(lambda: ensure_cached(verbose=False)))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """(hf_kvpool.serve url, plain transformers serve url), started side by side."""
    logs = tmp_path_factory.mktemp("serve")
    ours = sr.start_server(model_dir, log=logs / "ours.log", args=("--pool-capacity", "64M"))
    plain = sr.start_server(model_dir, plain=True, log=logs / "plain.log")
    try:
        for proc, url in (ours, plain):
            try:
                sr.wait_ready(proc, url)
            except Exception:
                print((logs / "ours.log").read_text()[-3000:], (logs / "plain.log").read_text()[-3000:])
                raise
        yield ours[1], plain[1]
    finally:
        sr.stop(ours[0])
        sr.stop(plain[0])


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
    return values


def interleaved_chats(url: str, model: str) -> list[str]:
    """Two 3-turn chats, turn by turn in alternation; the answers in the order asked."""
    api = client(url)
    chats = [
        [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
        for _ in QUESTIONS
    ]
    answers = []
    for turn in range(3):
        for chat, questions in zip(chats, QUESTIONS):
            chat.append({"role": "user", "content": questions[turn]})
            reply = api.chat.completions.create(
                model=model, messages=chat, max_tokens=MAX_TOKENS, temperature=0
            )
            answer = reply.choices[0].message.content
            chat.append({"role": "assistant", "content": answer})
            answers.append(answer)
    return answers


def test_chats_equal_plain_serve_and_reuse(servers, model_dir):
    ours, plain = servers
    before = metrics(ours)
    expected = interleaved_chats(plain, model_dir)
    got = interleaved_chats(ours, model_dir)
    assert got == expected
    after = metrics(ours)
    hits = after["hf_kvpool_hit_tokens_total"] - before.get("hf_kvpool_hit_tokens_total", 0)
    queried = after["hf_kvpool_query_tokens_total"] - before.get("hf_kvpool_query_tokens_total", 0)
    assert 0 < hits < queried
    # turns 2 and 3 of each chat extend a prompt the pool holds: most of the prompt tokens are reused
    assert hits / queried > 0.4, (hits, queried)
    assert after["hf_kvpool_committed_blocks_total"] > 0
    assert after["hf_kvpool_pool_bytes"] > 0


def test_disconnect_mid_stream(servers, model_dir):
    ours, _ = servers
    api = client(ours)
    messages = [{"role": "user", "content": "Count from one to one hundred, in words, one number per line."}]
    stream = api.chat.completions.create(
        model=model_dir,
        messages=messages,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()  # the client goes away; the server's streamer aborts generate() at its next token
    before = metrics(ours)
    messages.append({"role": "assistant", "content": "One"})
    messages.append({"role": "user", "content": "Go on."})
    reply = api.chat.completions.create(
        model=model_dir, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content
    after = metrics(ours)
    # the aborted request's prompt stayed in the pool, readable: the next turn reuses its full blocks
    assert after["hf_kvpool_hit_tokens_total"] - before["hf_kvpool_hit_tokens_total"] >= 16


def test_router_fields_accepted(servers, model_dir):
    ours, plain = servers
    body = {
        "model": model_dir,
        "messages": [{"role": "user", "content": "Hi!"}],
        "max_tokens": 4,
        **ROUTER_FIELDS,
    }

    def post(url):
        request = urllib.request.Request(
            url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    assert post(plain)[0] == 422  # what this works around: transformers serve refuses them
    status, reply = post(ours)
    assert status == 200 and reply["choices"][0]["message"]["content"]
    body["ignore_eos"] = True  # honoured: generation runs to max_tokens
    status, reply = post(ours)
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    body["return_hidden_states"] = True
    assert post(ours)[0] == 400


@pytest.mark.skipif(
    sr.router_binary() is None, reason="sglang-router is not installed: pip install -e '.[serve]'"
)
def test_through_cache_aware_router(model_dir, tmp_path):
    with sr.replicas(model_dir, 2, policy="cache_aware", args=("--pool-capacity", "64M"), logs=tmp_path) as (
        front,
        urls,
    ):
        api = client(front)
        chats = [[{"role": "user", "content": q[0]}] for q in QUESTIONS]
        for turn in range(2):
            for i, chat in enumerate(chats):
                if turn:
                    chat.append({"role": "user", "content": QUESTIONS[i][turn]})
                stream = api.chat.completions.create(
                    model=model_dir, messages=chat, max_tokens=MAX_TOKENS, temperature=0, stream=bool(i)
                )
                answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices) if i else None
                answer = answer if i else stream.choices[0].message.content
                assert answer
                chat.append({"role": "assistant", "content": answer})
        per_replica = [metrics(url) for url in urls]
    assert sum(m.get("hf_kvpool_serve_requests_total", 0) for m in per_replica) == 4
    # each session's second turn went where its first did (the router follows the conversation)
    assert sum(m["hf_kvpool_hit_tokens_total"] for m in per_replica) > 0
