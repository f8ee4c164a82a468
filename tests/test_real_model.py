"""A real model end to end: SmolLM2-135M-Instruct (from PyPI, ``scripts/smollm2.py``) in a chat loop.

Four turns of a chat whose template is re-rendered every turn over the growing message list (the
model's answer appended as an assistant message, then a new user message or tool output). Each
turn's ``generate()`` with ``PooledCache`` must equal the same call with ``DynamicCache`` (tokens,
and logits within 1e-4), and must reuse exactly what the previous call left in the pool: the
longest common prefix of this prompt and the previous prompt + answer (minus the answer's last
token, which is never fed back), in full blocks, capped at ``len(prompt) - 1``. The same chat with
the prompt built from the previous call's token ids (``demo_agent.extend_ids``) keeps every one.

If the model is not cached and cannot be downloaded these tests fail, saying what to do; with
``HF_KVPOOL_OFFLINE=1`` they are skipped instead.
"""

from __future__ import annotations

import pytest
import torch
from demo_agent import common_prefix, extend_ids, render
from helpers import assert_same, generate, real_model_or_skip, reference
from source_text import read_excerpt

from hf_kvpool import KVPool, PooledCache

MAX_NEW = 16
BS = 16
SYSTEM = "You are a coding assistant that reads transformers source code. Answer briefly."


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer), loaded once; one torch thread meanwhile (two collapse on a shared 2-core machine)."""
    from smollm2 import load_smollm2

    loaded = real_model_or_skip(load_smollm2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield loaded
    torch.set_num_threads(threads)


def user_turns(tokenizer) -> list[str]:
    """The user side: a tool output and a question, a yes/no question (a short answer that ends with
    the end-of-turn token), another tool output and question, a follow-up."""
    first = read_excerpt("generation/stopping_criteria.py", tokenizer, 160, anchor="class MaxLengthCriteria")
    second = read_excerpt("generation/stopping_criteria.py", tokenizer, 160, anchor="class EosTokenCriteria")
    return [
        f"read_file returned:\n```python\n{first}\n```\nWhen does MaxLengthCriteria stop generation?",
        "Answer with one word, yes or no: can generation stop before max_length?",
        f"read_file returned:\n```python\n{second}\n```\nWhat does EosTokenCriteria check?",
        "Summarize both classes in one sentence.",
    ]


def expected_reuse(prompt, held) -> int:
    """Full blocks of the longest common prefix with what the previous call left, capped at L - 1."""
    return max(0, min(common_prefix(prompt, held) // BS * BS, len(prompt) - 1))


def run_chat(model, tokenizer, keep_ids: bool, check_reference: bool = True) -> list[dict]:
    """The four turns, one pool; per turn what was reused, expected, and lost to re-tokenizing."""
    pool = KVPool(block_size=BS)
    messages = [{"role": "system", "content": SYSTEM}]
    history, held, rows = [], [], []
    for text in user_turns(tokenizer):
        messages.append({"role": "user", "content": text})
        prompt = (
            extend_ids(tokenizer, history, messages) if history and keep_ids else render(tokenizer, messages)
        )
        ids = torch.tensor([prompt])
        cache = PooledCache(model, pool=pool)
        out = generate(model, ids, cache, max_new_tokens=MAX_NEW)
        if check_reference:
            assert_same(reference(model, ids, max_new_tokens=MAX_NEW), out)
        answer = out.sequences[0, len(prompt) :].tolist()
        rows.append(
            dict(
                prompt=len(prompt),
                reused=cache.reused_tokens[0],
                expected=expected_reuse(prompt, held) if held else 0,
                lost=len(held) - common_prefix(prompt, held) if held else 0,
                answer=answer,
            )
        )
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
        history, held = prompt + answer, prompt + answer[:-1]
    return rows


def report(rows) -> str:
    return "\n".join(
        f"turn {i}: prompt {r['prompt']}, reused {r['reused']} (expected {r['expected']}), "
        f"{r['lost']} tokens of the previous call not in this prompt, answer {len(r['answer'])} tokens"
        for i, r in enumerate(rows)
    )


def test_chat_template_turns_equal_dynamic_cache_and_reuse_the_previous_call(smollm2):
    model, tokenizer = smollm2
    rows = run_chat(model, tokenizer, keep_ids=False)
    print(report(rows))
    assert rows[0]["reused"] == 0
    for i, r in enumerate(rows[1:], 1):
        assert r["reused"] == r["expected"], report(rows)
        # the template re-renders the earlier messages as before: at least the previous prompt is kept
        assert r["reused"] >= rows[i - 1]["prompt"] // BS * BS, report(rows)
    # an answer that stopped at the end-of-turn token is in the chat (the re-render adds "\n" after it)
    assert any(r["answer"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") for r in rows), report(rows)


def test_prompt_from_kept_token_ids_reuses_every_previous_token(smollm2):
    model, tokenizer = smollm2
    rows = run_chat(model, tokenizer, keep_ids=True, check_reference=False)
    print(report(rows))
    for r in rows[1:]:
        assert r["lost"] == 0 and r["reused"] == r["expected"], report(rows)
