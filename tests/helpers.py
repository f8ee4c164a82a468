"""Run the same generate() with DynamicCache and with PooledCache, and compare."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

from hf_kvpool import PooledCache

ATOL = 1e-4


def generate(model, ids, cache, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 8)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, cache=cache, output_logits=True, return_dict_in_generate=True, **kwargs)


def reference(model, ids, **kwargs):
    return generate(model, ids, DynamicCache(config=model.config), **kwargs)


def assert_same(ref, out) -> None:
    """Token-identical sequences and logits equal within float tolerance."""
    assert torch.equal(ref.sequences, out.sequences), (ref.sequences, out.sequences)
    assert len(ref.logits) == len(out.logits)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def pooled(model, ids, pool=None, cache=None, **kwargs):
    """Generate with a PooledCache; returns (output, cache), after checking it against DynamicCache."""
    cache = cache if cache is not None else PooledCache(model, pool=pool)
    out = generate(model, ids, cache, **kwargs)
    assert_same(reference(model, ids, **kwargs), out)
    return out, cache


def left_padded(*rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[1, n]`` left-padded with id 0 to the longest: ``(ids, attention_mask)``."""
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - r.shape[1] :] = r[0]
        mask[b, width - r.shape[1] :] = 1
    return ids, mask


def real_model_or_skip(load):
    """``load()``, a loader of the real model in ``scripts/smollm2.py``: when the model is not cached
    and cannot be fetched, the test fails saying what to do (skipped with ``HF_KVPOOL_OFFLINE=1``)."""
    from smollm2 import ModelUnavailable

    try:
        return load()
    except ModelUnavailable as exc:
        if os.environ.get("HF_KVPOOL_OFFLINE") == "1":
            pytest.skip(f"HF_KVPOOL_OFFLINE=1: {exc}")
        pytest.fail(str(exc), pytrace=False)
