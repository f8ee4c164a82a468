"""The tools people run on transformers, unmodified, with ``hf_kvpool.enable(model)`` as the only change.

Each tool calls ``model.generate()`` itself, without a cache. Run plain, then with the model
enabled (a fresh pool), on the same inputs: the outputs must be identical (greedy text; TRL's
sampled rollouts under the same seed) and the pool must serve prompt tokens (hit tokens > 0).
Positions are counted where tokens enter the model (``bench_clients.Meter``, passive hooks).

The pipeline chat and the lm-eval few-shot prompts run on the real SmolLM2-135M-Instruct
(``scripts/smollm2.py``; ``HF_KVPOOL_OFFLINE=1`` skips them when it cannot be fetched). smolagents
(a ~2.4k-token system prompt per step) and TRL (training steps) run on a random-weight 2-layer
Llama with SmolLM2's tokenizer and chat template (``bench_clients.tiny_checkpoint``), to stay
bounded on 2 CPU cores; ``scripts/bench_clients.py`` runs all four on the real model.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import pooled, real_model_or_skip
from smollm2 import load_smollm2

import hf_kvpool

pytest.importorskip("trl")
pytest.importorskip("smolagents")
pytest.importorskip("lm_eval")

import bench_clients as bc  # noqa: E402  (scripts/, after the skips: it needs the tools)


@pytest.fixture(scope="module")
def threads():
    """One torch thread for the module (two collapse on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2(threads):
    return real_model_or_skip(load_smollm2)


@pytest.fixture(scope="module")
def tiny_dir(smollm2, tmp_path_factory):
    return bc.tiny_checkpoint(tmp_path_factory.mktemp("tiny-smollm2-tokenizer"), smollm2[1])


def check_reuse(plain: dict, enabled: dict) -> None:
    assert plain["hit_tokens"] == 0
    assert enabled["hit_tokens"] > 0, enabled
    # what the pool served is what the model did not compute
    assert enabled["prefill_positions"] < plain["prefill_positions"]
    assert enabled["prompt_tokens"] == plain["prompt_tokens"]
    assert enabled["prefill_positions"] >= enabled["ideal_positions"]


def test_pipeline_chat(smollm2):
    model, tok = smollm2
    turns = bc.chat_turns(tok, tokens=60)
    plain = bc.run_pipeline(model, tok, False, turns, max_new_tokens=8)
    fresh = load_smollm2()[0]  # enable() is for good: the module's model stays plain
    enabled = bc.run_pipeline(fresh, tok, True, turns, max_new_tokens=8)
    assert enabled["outputs"] == plain["outputs"]
    assert plain["calls"] == enabled["calls"] == 3
    check_reuse(plain, enabled)
    # turns 2 and 3 start with the previous turn's prompt and answer: most of it is served
    assert enabled["prefill_positions"] <= 0.6 * plain["prefill_positions"]


def test_lm_eval_generate_until(smollm2):
    model, tok = smollm2
    requests = bc.fewshot_requests(tok, n=8, shots=6, max_gen_toks=6)
    plain = bc.run_lm_eval(model, tok, False, requests)
    fresh = load_smollm2()[0]  # enable() is for good: the module's model stays plain
    enabled = bc.run_lm_eval(fresh, tok, True, bc.fewshot_requests(tok, n=8, shots=6, max_gen_toks=6))
    assert enabled["outputs"] == plain["outputs"]
    assert len(plain["outputs"]) == 8 and plain["calls"] == enabled["calls"] == 2  # batches of 4
    check_reuse(plain, enabled)
    # the second batch takes the few-shot prefix from the pool (the first computes it: its rows are
    # distinct and none is in the pool yet, so catching up does not pay in the cost model)
    second_plain, second = plain["records"][1], enabled["records"][1]
    assert second["prefill"] <= 0.25 * second_plain["prefill"]


def test_smolagents_code_agent(tiny_dir):
    agent_model = bc.smolagents_model(tiny_dir, max_new_tokens=12)
    plain = bc.run_smolagents(agent_model, False, steps=2)
    enabled = bc.run_smolagents(agent_model, True, steps=2)  # the same model object, now enabled
    assert enabled["outputs"] == plain["outputs"]
    assert plain["calls"] == enabled["calls"] >= 3  # two steps and the final answer
    check_reuse(plain, enabled)
    # step 2 re-renders step 1's prompt (system prompt, task) first: served from the pool
    first, second = enabled["records"][:2]
    assert second["prefill"] < len(second["prompts"][0]) - len(first["prompts"][0]) + 16 + 16
    # what re-tokenizing step 1's (stripped) answer cost, measured, not assumed
    loss = enabled["retokenized"][0]
    assert loss["common"] >= loss["previous_prompt"] - 1


def test_trl_grpo_rollouts(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_dir)

    plain = bc.run_trl(load, tok, False, steps=2, new_tokens=4)
    enabled = bc.run_trl(load, tok, True, steps=2, new_tokens=4)
    assert len(plain["losses"]) == len(enabled["losses"]) == 2
    assert all(math.isfinite(x) for x in enabled["losses"])
    # the weights change after step 1: step 2's rollouts match only if nothing stale was served
    assert len(enabled["outputs"]) == 2 and len(enabled["outputs"][0]) == 16
    assert enabled["outputs"] == plain["outputs"]
    assert enabled["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert enabled["hit_tokens"] > 0
    assert enabled["prefill_positions"] <= 0.5 * plain["prefill_positions"]
    # the same 4 prompts both steps, new weights in step 2: nothing of step 1 may be served
    first, second = (call["prefill"] for call in enabled["records"])
    assert second == first


def test_fused_optimizer_step_changes_the_namespace(threads):
    """Fused AdamW (the Trainer's default) writes weights without bumping version counters; after
    its step the pool must not serve K/V of the old weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = LlamaForCausalLM(config).eval()
    hf_kvpool.enable(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ids = torch.randint(0, 100, (1, 40))
    pooled(model, ids)
    _, cache = pooled(model, ids)
    assert cache.reused_tokens == [32]  # the same weights: served
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, fused=True)
    model(ids).logits.sum().backward()
    optimizer.step()
    _, cache = pooled(model, ids)  # equal to DynamicCache with the new weights
    assert cache.reused_tokens == [0]
