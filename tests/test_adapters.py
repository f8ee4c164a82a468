"""Everything that changes a layer's K/V is part of the key: PEFT adapters, forward hooks, switches.

Each call is compared with DynamicCache under the same state (tokens, logits within 1e-4), and the
reuse counts show which blocks were served: a state never serves another state's blocks, and
reuse comes back when a state returns.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_same, generate, reference
from tiny_models import build, prompt

from hf_kvpool import KVPool, PooledCache
from hf_kvpool.hf.enable import model_state

peft = pytest.importorskip("peft")

BS = 4
HIT = 20  # a 22-token prompt seen before: 5 full blocks


def lora_config(seed_r: int = 4):
    return peft.LoraConfig(
        r=seed_r, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False
    )


def lora_model(seed: int = 0):
    base = build("llama", "sdpa", seed=seed)
    torch.manual_seed(seed + 100)
    return peft.get_peft_model(base, lora_config())


def run(model, ids, pool, **kwargs) -> int:
    """One generate() with a PooledCache, checked against DynamicCache; returns the reused tokens."""
    cache = PooledCache(model, pool=pool)
    out = generate(model, ids, cache, **kwargs)
    assert_same(reference(model, ids, **kwargs), out)
    return cache.reused_tokens[0]


def logits(model, ids) -> torch.Tensor:
    return reference(model, ids).logits[0]


@pytest.fixture
def pm():
    return lora_model()


def test_adapter_on_and_off_keep_their_own_prefixes(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 1)
    assert run(pm, ids, pool) == 0
    assert run(pm, ids, pool) == HIT
    on = logits(pm, ids)
    with pm.disable_adapter():
        assert not torch.allclose(logits(pm, ids), on, atol=1e-3)  # the adapter matters
        assert run(pm, ids, pool) == 0  # the adapter's blocks are not served to the base model
        assert run(pm, ids, pool) == HIT
    assert run(pm, ids, pool) == HIT  # back on: its blocks serve again


def test_set_adapter_and_several_adapters_at_once(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 2)
    torch.manual_seed(7)
    pm.add_adapter("other", lora_config(8))
    assert run(pm, ids, pool) == 0
    pm.set_adapter("other")
    assert run(pm, ids, pool) == 0
    assert run(pm, ids, pool) == HIT
    pm.base_model.set_adapter(["default", "other"])  # both active: a third function
    assert run(pm, ids, pool) == 0
    assert run(pm, ids, pool) == HIT
    pm.set_adapter("default")
    assert run(pm, ids, pool) == HIT


def test_adding_and_deleting_an_inactive_adapter_keeps_the_namespace(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 3)
    assert run(pm, ids, pool) == 0
    torch.manual_seed(8)
    pm.add_adapter("extra", lora_config())  # added, not active: the function is unchanged
    assert run(pm, ids, pool) == HIT
    pm.set_adapter("extra")
    assert run(pm, ids, pool) == 0
    pm.set_adapter("default")
    pm.delete_adapter("extra")
    assert run(pm, ids, pool) == HIT


def test_training_step_invalidates_only_the_policy(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 4)
    run(pm, ids, pool)
    with pm.disable_adapter():
        run(pm, ids, pool)  # the reference model's prefix
    pm.train()
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    pm.eval()
    assert run(pm, ids, pool) == 0  # the policy changed
    with pm.disable_adapter():
        assert run(pm, ids, pool) == HIT  # the reference did not
    assert run(pm, ids, pool) == HIT


def test_scaling_change(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 5)
    run(pm, ids, pool)
    layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for layer in layers:
        layer.set_scale("default", 0.5)
    assert run(pm, ids, pool) == 0
    for layer in layers:
        layer.set_scale("default", 1.0)
    assert run(pm, ids, pool) == HIT


def run_in(model, ids, pool) -> tuple[int, bytes]:
    """:func:`run`, and the namespace the call read and filled."""
    cache = PooledCache(model, pool=pool)
    out = generate(model, ids, cache)
    assert_same(reference(model, ids), out)
    return cache.reused_tokens[0], cache._call.tracker.namespace


def test_merge_unmerge_and_merge_and_unload(pm):
    """Merged and unmerged logits differ by ~1e-7, within assert_same's tolerance, so equal outputs
    cannot show a block served to the wrong state: the reuse counts and namespaces do."""
    pool, ids = KVPool(block_size=BS), prompt(22, 6)
    weights = [p for n, p in pm.named_parameters() if "base_layer.weight" in n]
    original = [w.clone() for w in weights]
    reused, unmerged = run_in(pm, ids, pool)
    assert reused == 0
    assert run_in(pm, ids, pool) == (HIT, unmerged)
    pm.merge_adapter()  # writes the base weights through .data
    reused, merged_ns = run_in(pm, ids, pool)
    assert merged_ns != unmerged and reused == 0  # the unmerged state's blocks are not served
    assert run_in(pm, ids, pool) == (HIT, merged_ns)
    pm.unmerge_adapter()
    # unmerging subtracts the delta again in floating point: base weights off by rounding, so the
    # model computes a third function, and neither earlier state's blocks are served to it
    assert not all(torch.equal(w, o) for w, o in zip(weights, original))
    reused, unmerged_again = run_in(pm, ids, pool)
    assert reused == 0 and unmerged_again not in (unmerged, merged_ns)
    assert run_in(pm, ids, pool) == (HIT, unmerged_again)
    merged = pm.merge_and_unload()
    reused, unloaded = run_in(merged, ids, pool)
    assert reused == 0 and unloaded not in (unmerged, merged_ns)  # merged weights: another function
    assert run_in(merged, ids, pool) == (HIT, unloaded)


def test_through_peft_generate_and_the_inner_model(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 7)
    inner = pm.get_base_model()
    assert run(pm, ids, pool) == 0
    assert run(inner, ids, pool) == HIT  # the same model, the same adapters: the same namespace
    assert model_state(pm) is model_state(inner)


def test_disabled_adapter_shares_the_plain_base_models_namespace(pm):
    plain = build("llama", "sdpa", seed=0)  # the same base weights, no PEFT
    with pm.disable_adapter():
        assert model_state_of(pm).fingerprint.digest() == model_state_of(plain).fingerprint.digest()
    assert model_state_of(pm).fingerprint.digest() != model_state_of(plain).fingerprint.digest()


def model_state_of(model):
    PooledCache(model)  # enables it
    return model_state(model)


def steer(vector):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    return hook


def test_steering_hook_computes_without_the_pool_while_registered(recwarn):
    model, pool, ids = build("llama", "sdpa"), KVPool(block_size=BS), prompt(22, 8)
    plain = logits(model, ids)
    run(model, ids, pool)
    stored = pool.stats().stored_blocks
    handle = model.model.layers[0].register_forward_hook(steer(0.5 * torch.ones(64)))
    assert not torch.allclose(logits(model, ids), plain, atol=1e-3)  # the hook changes the output
    assert run(model, ids, pool) == 0
    assert pool.stats().stored_blocks == stored  # nothing committed under the hook
    assert any("forward hooks that may change K/V" in str(w.message) for w in recwarn)
    handle.remove()
    assert run(model, ids, pool) == HIT


def test_forward_pre_hook_and_a_hook_marked_passive():
    model, pool, ids = build("llama", "sdpa"), KVPool(block_size=BS), prompt(22, 9)
    run(model, ids, pool)

    def shift(module, args):
        return (args[0] * 1.5, *args[1:])

    handle = model.model.layers[1].self_attn.k_proj.register_forward_pre_hook(shift)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(model, ids, pool) == 0
    handle.remove()
    seen = []

    def watch(module, args, output):
        seen.append(output.shape)

    watch.hf_kvpool_passive = True
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(watch)
    assert run(model, ids, pool) == HIT and seen
    handle.remove()


def test_attention_implementation_switch():
    model, pool, ids = build("llama", "sdpa"), KVPool(block_size=BS), prompt(22, 10)
    run(model, ids, pool)
    model.set_attn_implementation("eager")
    assert run(model, ids, pool) == 0
    model.set_attn_implementation("sdpa")
    assert run(model, ids, pool) == HIT


def test_config_edit_read_by_the_attention():
    model, pool, ids = build("qwen2_sliding", "sdpa"), KVPool(block_size=BS), prompt(22, 11)
    run(model, ids, pool)
    model.config.sliding_window = 5  # the mask reads it at every forward
    assert run(model, ids, pool) == 0
    model.config.sliding_window = 8
    assert run(model, ids, pool) == HIT


def test_dtype_move_and_back():
    model, pool, ids = build("llama", "sdpa"), KVPool(block_size=BS), prompt(22, 12)
    run(model, ids, pool)
    before = model_state(model).fingerprint.digest()
    model.double()
    assert model_state(model).fingerprint.digest() != before
    assert run(model, ids, KVPool(block_size=BS)) == 0  # a float64 pool for the float64 model
    model.float()  # float32 -> float64 -> float32 is exact: the same function again
    assert model_state(model).fingerprint.digest() == before
    assert run(model, ids, pool) == HIT


def test_per_call_check_hashes_only_what_changed(pm):
    pool, ids = KVPool(block_size=BS), prompt(22, 13)
    fp = model_state_of(pm).fingerprint
    run(pm, ids, pool)
    with pm.disable_adapter():
        run(pm, ids, pool)
    hashed = fp.hashed_tensors
    for _ in range(2):
        run(pm, ids, pool)
        with pm.disable_adapter():
            run(pm, ids, pool)
    assert fp.hashed_tensors == hashed  # nothing changed, states seen before: no tensor hashed
    lora = [p for p in pm.parameters() if p.requires_grad]
    with torch.no_grad():
        lora[0].add_(0.01)
    run(pm, ids, pool)
    assert fp.hashed_tensors == hashed + 1  # only the tensor that changed


def test_fingerprint_with_adapters_is_the_same_in_another_process(pm):
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        from test_adapters import lora_model
        from hf_kvpool import PooledCache
        from hf_kvpool.hf.enable import model_state
        pm = lora_model()
        PooledCache(pm)
        print(model_state(pm).fingerprint.digest().hex())
        with pm.disable_adapter():
            print(model_state(pm).fingerprint.digest().hex())
        """
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    PooledCache(pm)
    on = model_state(pm).fingerprint.digest().hex()
    with pm.disable_adapter():
        off = model_state(pm).fingerprint.digest().hex()
    assert proc.stdout.split() == [on, off] and on != off
