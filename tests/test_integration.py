"""The edges of the integration: direct forwards, inputs_embeds, unenabled models, wrong models,
weight updates, salts, accelerate dispatch."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_same, generate, pooled, reference
from tiny_models import build, prompt
from transformers import DynamicCache

import hf_kvpool
from hf_kvpool import KVPool, PooledCache
from hf_kvpool.hf.enable import model_state

BS = 4


@pytest.fixture
def model():
    return build("llama", "sdpa")


def test_direct_forward_returns_every_position(model):
    pool = KVPool(block_size=BS)
    ids = prompt(21, 1)
    pooled(model, ids, pool)  # the prefix is in the pool now
    ref = model(input_ids=ids, cache=DynamicCache(config=model.config))
    cache = PooledCache(model, pool=pool)
    out = model(ids, cache=cache)  # positional input_ids too
    assert out.logits.shape == ref.logits.shape == (1, 21, 128)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 21 and cache.reused_tokens == [0]


def test_direct_forward_commits_for_later_calls(model):
    pool = KVPool(block_size=BS)
    ids = prompt(17, 2)
    model(input_ids=ids, past_key_values=PooledCache(model, pool=pool))
    assert pool.stats().stored_blocks == 4
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [16]


def test_inputs_embeds_runs_without_reuse(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 3)
    pooled(model, ids, pool)
    embeds = model.get_input_embeddings()(ids)
    cache = PooledCache(model, pool=pool)
    torch.manual_seed(0)
    out = model.generate(inputs_embeds=embeds, cache=cache, max_new_tokens=6, do_sample=False)
    torch.manual_seed(0)
    ref = model.generate(
        inputs_embeds=embeds, cache=DynamicCache(config=model.config), max_new_tokens=6, do_sample=False
    )
    assert torch.equal(out, ref)
    assert cache.reused_tokens == []


def test_never_enabled_model_behaves_like_dynamic_cache(monkeypatch):
    import hf_kvpool.hf.registry as registry

    monkeypatch.setattr(registry, "_warned", set())
    model = build("qwen2", "sdpa", seed=5)
    ids = prompt(15, 4)
    with pytest.warns(UserWarning, match="hf_kvpool.enable"):
        out = generate(model, ids, PooledCache())
    assert_same(reference(model, ids), out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        generate(model, ids, PooledCache())


def test_enable_then_bare_pooled_cache(model):
    assert hf_kvpool.enable(model) is model
    assert hf_kvpool.enable(model) is model  # idempotent: one set of hooks
    assert len(model._forward_pre_hooks) == 1
    pool = hf_kvpool.get_pool(model)
    pool.clear()
    ids = prompt(18, 5)
    pooled(model, ids, cache=PooledCache())
    _, cache = pooled(model, ids, cache=PooledCache())
    assert pool.block_size == 16  # the default
    assert cache.reused_tokens == [16] and cache.pool is pool and cache.model is model


def test_cache_for_another_model_is_refused(model):
    other = build("llama", "sdpa", seed=9)
    cache = PooledCache(model)
    with pytest.raises(ValueError, match="bound to another model"):
        other.generate(prompt(10, 6), cache=cache, max_new_tokens=2)  # other is not enabled
    hf_kvpool.enable(other)
    with pytest.raises(ValueError, match="bound to another model"):
        other.generate(prompt(10, 6), cache=cache, max_new_tokens=2)


def test_weights_updated_in_place_are_not_served_stale(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 7)
    pooled(model, ids, pool)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [0]
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [19]
    model.load_state_dict(build("llama", "sdpa", seed=3).state_dict())
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [0]


def test_weights_changed_after_data_write(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 8)
    pooled(model, ids, pool)
    model.lm_head.weight.data.mul_(2)  # bypasses version counters
    model.model.layers[0].self_attn.k_proj.weight.data.mul_(2)
    hf_kvpool.weights_changed(model)
    _, cache = pooled(model, ids, pool)
    assert cache.reused_tokens == [0]


def test_salts_share_nothing(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 9)
    pooled(model, ids, cache=PooledCache(model, pool=pool, salt="alice"))
    _, cache = pooled(model, ids, cache=PooledCache(model, pool=pool, salt="bob"))
    assert cache.reused_tokens == [0]
    _, cache = pooled(model, ids, cache=PooledCache(model, pool=pool, salt="alice"))
    assert cache.reused_tokens == [19]


def test_two_models_share_a_pool_without_mixing():
    a, b = build("llama", "sdpa", seed=0), build("llama", "sdpa", seed=1)
    pool = KVPool(block_size=BS)
    ids = prompt(20, 10)
    pooled(a, ids, pool)
    _, cache = pooled(b, ids, pool)
    assert cache.reused_tokens == [0]


def test_pool_of_another_layout_is_refused(model):
    pool = KVPool(block_size=BS)
    pooled(model, prompt(12, 11), pool)
    other = build("llama", "sdpa", num_key_value_heads=4)
    with pytest.raises(ValueError, match="another layout"):
        generate(other, prompt(12, 11), PooledCache(other, pool=pool))


def test_token_ids_out_of_range(model):
    ids = prompt(10, 12)
    ids[0, 3] = 500
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        generate(model, ids, PooledCache(model))


def test_fingerprint_is_content_based_and_stable_across_processes(model):
    digest = model_state(hf_kvpool.enable(model)).fingerprint.digest()
    twin = build("llama", "sdpa")
    assert model_state(hf_kvpool.enable(twin)).fingerprint.digest() == digest
    code = (
        "import sys; sys.path.insert(0, 'tests'); import hf_kvpool; from tiny_models import build; "
        "from hf_kvpool.hf.enable import model_state; m = hf_kvpool.enable(build('llama', 'sdpa')); "
        "print(model_state(m).fingerprint.digest().hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest.hex()


def test_fingerprint_is_cheap_when_nothing_changed(model):
    fp = model_state(hf_kvpool.enable(model)).fingerprint
    first = fp.digest()
    hashed = fp.hashed_tensors
    assert fp.digest() == first and fp.hashed_tensors == hashed  # nothing hashed again
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert fp.digest() != first
    assert fp.hashed_tensors == hashed + 1  # only the tensor that changed


def test_deepcopy_shares_the_pool(model):
    import copy

    cache = PooledCache(model, pool=KVPool(block_size=BS))
    generate(model, prompt(10, 13), cache)
    twin = copy.deepcopy(cache)
    assert twin.pool is cache.pool and twin.model is model
    assert torch.equal(twin.layers[0].keys, cache.layers[0].keys)
    assert twin.layers[0].keys is not cache.layers[0].keys


def test_unsupported_layer_kind_falls_back_with_one_warning(monkeypatch):
    import hf_kvpool.hf.kinds.base as kinds_base

    monkeypatch.setattr(kinds_base, "_BY_CLASS", {})  # no kind known: every layer is unsupported
    model = build("llama", "sdpa", seed=3)
    ids = prompt(12, 14)
    ref = reference(model, ids)
    hf_kvpool.enable(model)
    with pytest.warns(UserWarning, match="cannot reuse K/V: its cache layer 0 is a DynamicLayer"):
        out = generate(model, ids, PooledCache())
    assert_same(ref, out)
    assert hf_kvpool.get_pool(model).stats().capacity_bytes == 0  # found before any storage


def test_mamba1_model_reuses_one_token_at_a_time(monkeypatch):
    """Falcon-Mamba's torch scan ignores a stored state: after a restore it goes one token per
    forward, which pays only when few tokens are left (the cost model); both ways match DynamicCache."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    import hf_kvpool.hf.catchup as catchup

    config = FalconMambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    torch.manual_seed(0)
    model = FalconMambaForCausalLM(config).eval()
    pool = KVPool(block_size=BS)
    ids = prompt(22, 14)
    out, _ = pooled(model, ids, pool, max_new_tokens=6)
    ext = torch.cat([out.sequences, prompt(3, 15)], dim=1)  # 31 tokens; the last call reached 26
    monkeypatch.setitem(catchup.FORWARD_COST_TOKENS, "cpu", 1)  # a device where forwards are cheap
    _, cache = pooled(model, ext, pool)
    assert cache.reused_tokens == [24]  # the checkpoint at the last block boundary it decoded past
    monkeypatch.undo()  # this CPU: a forward costs 16 token positions
    _, cache = pooled(model, ext, pool)
    assert cache.reused_tokens == [0]  # 2 one-token forwards cost more than recomputing 28 tokens
    fresh = KVPool(block_size=BS)
    _, cache = pooled(model, ext, fresh)  # from an empty state: the prefill splits at 28 ...
    monkeypatch.setitem(catchup.FORWARD_COST_TOKENS, "cpu", 1)
    _, cache = pooled(model, ext, fresh)
    assert cache.reused_tokens == [28]  # ... and puts a checkpoint there


@pytest.mark.parametrize("offload", ["cpu_offload", "disk"])
def test_accelerate_dispatched_model(tmp_path, offload):
    """accelerate's hooks wrap forward and keep offloaded weights off the modules (meta tensors)."""
    from accelerate import cpu_offload, dispatch_model

    plain = build("llama", "sdpa", num_hidden_layers=3)
    model = build("llama", "sdpa", num_hidden_layers=3)
    if offload == "cpu_offload":
        model = cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        device_map = {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.layers.2": "cpu",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "cpu",
        }
        model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    attn = model.model.layers[1].self_attn
    assert hasattr(attn.k_proj, "_hf_hook") or hasattr(model.model.layers[1], "_hf_hook")
    assert attn.k_proj.weight.device.type == "meta"
    pool = KVPool(block_size=BS)
    ids = prompt(22, 15)
    cache = PooledCache(model, pool=pool)
    out = generate(model, ids, cache)
    assert_same(reference(plain, ids), out)
    cache = PooledCache(model, pool=pool)
    out = generate(model, ids, cache)
    assert_same(reference(plain, ids), out)
    assert cache.reused_tokens == [20]  # the prompt's 5 full blocks
    # the fingerprint read the offloaded weights: it equals the plain model's
    assert (
        model_state(model).fingerprint.digest() == model_state(hf_kvpool.enable(plain)).fingerprint.digest()
    )


def test_use_cache_false_neither_reuses_nor_disables(model):
    pool = KVPool(block_size=BS)
    ids = prompt(20, 16)
    pooled(model, ids, pool)
    out = generate(model, ids, PooledCache(model, pool=pool), use_cache=False)
    assert_same(reference(model, ids, use_cache=False), out)
    _, cache = pooled(model, ids, pool)  # reuse still works afterwards
    assert cache.reused_tokens == [19]
