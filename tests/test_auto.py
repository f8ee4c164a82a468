"""Auto mode: after ``enable(model)``, generate() without a cache pools, and everything else keeps
transformers' behaviour.

Every pooled call is compared with the same call on ``DynamicCache`` (tokens and logits); every
opt-out is compared with the same call on an identical model that was never enabled, and must not
touch the pool (no look-up).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import transformers
from helpers import assert_same, generate, left_padded, reference
from tiny_models import build, prompt
from transformers import DynamicCache, StaticCache

import hf_kvpool
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.hf import compat
from hf_kvpool.hf.enable import model_state

BS = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def auto(model, ids, seed: int = 0, **kwargs):
    """generate() as a tool calls it: no cache."""
    torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 8)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)


def enabled(seed: int = 0, arch: str = "llama", **enable_kwargs):
    model = build(arch, seed=seed)
    hf_kvpool.enable(model, KVPool(block_size=BS), **enable_kwargs)
    return model


def lookups(model) -> int:
    return hf_kvpool.get_pool(model).stats().lookups


def hits(model) -> int:
    return hf_kvpool.get_pool(model).stats().hit_tokens


CASES = {
    "greedy": {},
    "sampling": dict(do_sample=True, top_k=20),
    "beams": dict(num_beams=3),
    "return_sequences": dict(do_sample=True, num_return_sequences=3),
}


@pytest.mark.parametrize("case", CASES)
def test_auto_matches_dynamic_cache_and_reuses(case):
    model, kwargs = enabled(), CASES[case]
    ids = prompt(18, 1)
    out = auto(model, ids, **kwargs)
    assert_same(reference(model, ids, **kwargs), out)
    assert isinstance(out.past_key_values, PooledCache) and lookups(model) == 1
    longer = torch.cat([out.sequences[:1], prompt(5, 2)], dim=1)
    before = hits(model)
    out = auto(model, longer, seed=3, **kwargs)
    assert_same(reference(model, longer, seed=3, **kwargs), out)
    assert hits(model) - before >= 16  # the first call's prompt blocks, at least


def test_auto_left_padded_batch():
    model = enabled()
    a, b = prompt(14, 1), prompt(9, 2)
    ids, mask = left_padded(a, b)
    out = auto(model, ids, attention_mask=mask)
    assert_same(reference(model, ids, attention_mask=mask), out)
    ids, mask = left_padded(torch.cat([a, prompt(3, 3)], 1), torch.cat([b, prompt(6, 4)], 1))
    before = hits(model)
    out = auto(model, ids, attention_mask=mask)
    assert_same(reference(model, ids, attention_mask=mask), out)
    assert hits(model) - before >= 16  # row a: 3 blocks, row b: 2 blocks, limited to a common column


def test_auto_through_peft():
    peft = pytest.importorskip("peft")
    base = build("llama")
    torch.manual_seed(100)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(base, config)
    hf_kvpool.enable(pm, KVPool(block_size=BS))
    ids = prompt(18, 1)
    for _ in range(2):
        torch.manual_seed(0)
        out = pm.generate(input_ids=ids, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
        torch.manual_seed(0)
        ref = pm.generate(
            input_ids=ids,
            max_new_tokens=5,
            output_logits=True,
            return_dict_in_generate=True,
            cache=DynamicCache(config=base.config),
        )
        assert_same(ref, out)
    assert lookups(base) == 2 and hits(base) == 16
    with pm.disable_adapter():  # another namespace: no hit, still exact
        out = pm.generate(input_ids=ids, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
        assert_same(reference(base, ids, max_new_tokens=5), out)
    assert hits(base) == 16


def test_output_types_are_the_default_caches():
    model = enabled()
    ids = prompt(10, 1)
    plain = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert type(plain) is torch.Tensor and lookups(model) == 1
    out = auto(model, ids)
    cache = out.past_key_values
    assert type(out).__name__ == "GenerateDecoderOnlyOutput"
    assert isinstance(cache, DynamicCache)
    # generate() treats it as its own cache: not "user defined", never auto-compiled
    assert cache._is_user_defined is False and cache.is_compileable is False
    # handed back by the caller, it is the caller's cache (reset and re-armed as a PooledCache)
    before = lookups(model)
    torch.manual_seed(0)
    again = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False)
    assert cache._is_user_defined is True and lookups(model) == before + 1
    assert torch.equal(again, out.sequences)


def test_explicit_pooled_cache_is_kept():
    model = enabled()
    ids = prompt(10, 1)
    cache = PooledCache(model, salt="tenant")
    out = model.generate(ids, cache=cache, max_new_tokens=3, return_dict_in_generate=True)
    assert out.past_key_values is cache and cache._is_user_defined is True
    assert lookups(model) == 1


def _opt_outs():
    draft = build("llama", seed=5)
    return {
        "cache=": lambda m: dict(cache=DynamicCache(config=m.config)),
        "past_key_values=": lambda m: dict(past_key_values=DynamicCache(config=m.config)),
        "static": lambda m: dict(cache_implementation="static"),
        "offloaded": lambda m: dict(cache_implementation="offloaded"),
        "use_cache=False": lambda m: dict(use_cache=False),
        "assistant_model": lambda m: dict(assistant_model=draft),
        "prompt_lookup": lambda m: dict(prompt_lookup_num_tokens=3),
    }


OPT_OUTS = _opt_outs()


@pytest.mark.parametrize("name", OPT_OUTS)
def test_opt_outs_are_untouched(name):
    if name == "offloaded" and not torch.cuda.is_available():
        pytest.skip("the offloaded cache needs a CUDA device")
    model, plain = enabled(), build("llama")
    ids = prompt(18, 1)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' own deprecation notes
            out = auto(model, ids, **OPT_OUTS[name](model))
            ref = auto(plain, ids, **OPT_OUTS[name](plain))
        assert_same(ref, out)
        assert type(out.past_key_values) is type(ref.past_key_values)
        assert not isinstance(out.past_key_values, PooledCache)
    assert lookups(model) == 0
    if name == "static":
        assert isinstance(out.past_key_values, StaticCache)


def test_auto_false_keeps_explicit_mode():
    model, plain = enabled(auto=False), build("llama")
    ids = prompt(18, 1)
    out = auto(model, ids)
    assert_same(auto(plain, ids), out)
    assert type(out.past_key_values) is DynamicCache and lookups(model) == 0
    cache = PooledCache(model)
    model.generate(ids, cache=cache, max_new_tokens=2)
    assert lookups(model) == 1
    hf_kvpool.enable(model)  # each call sets the mode
    auto(model, ids)
    assert lookups(model) == 2 and hits(model) == 16


def test_enable_twice_is_idempotent():
    model = enabled()
    state, pool = model_state(model), hf_kvpool.get_pool(model)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert hf_kvpool.enable(model) is model
    assert model_state(model) is state and hf_kvpool.get_pool(model) is pool and state.auto
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    seam = transformers.GenerationMixin._prepare_cache_for_generation
    hf_kvpool.enable(build("llama"))
    assert transformers.GenerationMixin._prepare_cache_for_generation is seam  # wrapped once
    ids = prompt(18, 1)
    auto(model, ids)
    out = auto(model, ids)
    assert_same(reference(model, ids), out)
    assert lookups(model) == 2 and hits(model) == 16


def test_pooled_cache_alone_does_not_turn_auto_on():
    model = build("llama")
    PooledCache(model)
    auto(model, prompt(10, 1))
    assert not model_state(model).auto and lookups(model) == 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_an_enabled_model_stay_auto(how):
    model = enabled()
    ids = prompt(18, 1)
    auto(model, ids)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    for _ in range(2):
        out = auto(twin, ids)
        assert_same(reference(model, ids), out)
    assert model_state(twin) is not model_state(model) and model_state(twin).auto
    assert len(twin._forward_pre_hooks) == 1
    if how == "deepcopy":  # a pool is shared, never copied: the copy hits the original's blocks
        assert hf_kvpool.get_pool(twin) is hf_kvpool.get_pool(model) and lookups(model) == 3
        assert hits(model) == 2 * 16
    else:  # an unpickled model gets a pool of its own
        assert lookups(twin) == 2 and hits(twin) == 16


def test_copy_of_an_explicit_model_stays_explicit():
    model = enabled(auto=False)
    twin = copy.deepcopy(model)
    out = auto(twin, prompt(10, 1))
    assert type(out.past_key_values) is DynamicCache and lookups(model) == 0


def test_encoder_decoder_untouched():
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    plain = copy.deepcopy(model)
    hf_kvpool.enable(model)
    ids = torch.randint(1, 64, (1, 12))
    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    assert_same(plain.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_logits=True), out)
    assert not isinstance(out.past_key_values.self_attention_cache, PooledCache)
    assert lookups(model) == 0


def test_models_the_pool_cannot_serve_are_untouched(monkeypatch):
    # outside the tested transformers versions: the model is unsupported, generate() keeps DynamicCache
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("0.1", "0.2"))
    model, plain = build("llama"), build("llama")
    with pytest.warns(UserWarning, match="auto mode is off"):
        hf_kvpool.enable(model)  # the seam is not installed by this call
    monkeypatch.undo()
    hf_kvpool.enable(build("llama"))  # ... but by another model's: this one must still be left alone
    ids = prompt(18, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = auto(model, ids)
    assert any("cannot reuse K/V" in str(w.message) for w in caught)
    assert_same(auto(plain, ids), out)
    assert type(out.past_key_values) is DynamicCache and lookups(model) == 0


# ---------------------------------------------------------------------------- mixed precision
def extend_under_autocast(model, ids):
    """Two calls under the same autocast, the second extending the first's answer. The second is
    compared with a DynamicCache holding the same K/V (the first call's, cropped to what the pool
    served): bitwise equal; and its tokens with a full recompute under the same autocast (bf16
    logits of a shorter forward differ in the last bits, with DynamicCache too)."""
    dc = DynamicCache(config=model.config)
    ref = generate(model, ids, dc)
    out = auto(model, ids)
    assert_same(ref, out)
    longer = torch.cat([out.sequences, prompt(5, 2)], dim=1)
    before = hits(model)
    out = auto(model, longer)
    served = hits(model) - before
    assert served >= 16
    dc.crop(served - dc.get_seq_length())
    ref = generate(model, longer, dc)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        assert torch.equal(a, b)
    assert torch.equal(reference(model, longer).sequences, out.sequences)


def test_autocast_context_is_part_of_the_key():
    model = enabled()
    ids = prompt(18, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        extend_under_autocast(model, ids)
    pool = hf_kvpool.get_pool(model)
    assert [info.get("autocast") for info in pool.namespaces.values()] == ["cpu:torch.bfloat16"]
    # fp32 calls never take autocast blocks (nor the reverse): no hit, exact, and the pool (laid
    # out for the autocast K/V) says once that it cannot take fp32 K/V instead of raising
    before = hits(model)
    with pytest.warns(UserWarning, match="another autocast setting"):
        for _ in range(2):
            assert_same(reference(model, ids), auto(model, ids))
            assert_same(reference(model, ids), generate(model, ids, PooledCache(model)))
    assert hits(model) == before


def test_fp32_blocks_are_not_served_under_autocast():
    model = enabled()
    ids = prompt(18, 1)
    auto(model, ids)
    before = hits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(reference(model, ids), auto(model, ids))
    assert hits(model) == before


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(True)


def test_accelerate_mixed_precision_forward_is_part_of_the_key(accelerator):
    model = enabled()
    ids = prompt(18, 1)
    auto(model, ids)  # fp32 blocks first
    fp32 = hits(model)
    model = accelerator.prepare(model)  # wraps model.forward in autocast (after the pre-hooks)
    assert compat.autocast_state(model, {"cpu"}) == "forward cpu:torch.bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what the wrapper does, for the reference
            ref = reference(model, ids)
        assert_same(ref, auto(model, ids))
    assert hits(model) == fp32  # the fp32 blocks were not served
    twin = enabled()  # its own pool, filled under the wrapper only
    twin = accelerator.prepare(twin)
    extend_under_autocast(twin, ids)


# ---------------------------------------------------------------------------- training loops
def train_step(model, optimizer, ids):
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_optimizer_steps_free_blocks_of_old_weights(lora):
    model = build("llama")
    if lora:
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(model, config)
    hf_kvpool.enable(model, KVPool(block_size=BS))
    pool = hf_kvpool.get_pool(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids, other = prompt(18, 1), prompt(14, 2)
    if lora:
        with model.disable_adapter():  # the base model's blocks: its weights never change
            auto(model, other)
        base_blocks = pool.stats().stored_blocks
    else:
        base_blocks = 0
    one_call = (18 + 8 - 1) // BS
    for _ in range(4):
        before = hits(model)
        out = auto(model, ids)
        assert_same(reference(model, ids), out)
        assert hits(model) == before  # new weights: nothing to reuse
        assert pool.stats().stored_blocks <= base_blocks + one_call  # one step's worth
        train_step(model, optimizer, ids)
    assert pool.stats().committed_blocks >= base_blocks + 4 * one_call
    if lora:  # the adapter-off namespace kept its blocks through the adapter's training
        with model.disable_adapter():
            before = hits(model)
            assert_same(reference(model, other), auto(model, other))
            assert hits(model) - before == 12


def test_a_frozen_copy_on_the_same_pool_keeps_its_blocks():
    model = build("llama")
    frozen = copy.deepcopy(model)
    pool = KVPool(block_size=BS)
    hf_kvpool.enable(model, pool)
    hf_kvpool.enable(frozen, pool)
    ids = prompt(18, 1)
    auto(model, ids)
    auto(frozen, ids)  # the same weights: the same namespace, a hit
    assert hits(model) == 16
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, optimizer, ids)
    auto(model, ids)  # retires the old weights' namespace, which the frozen copy still computes
    before = hits(frozen)
    assert_same(reference(frozen, ids), auto(frozen, ids))
    assert hits(frozen) - before == 16
