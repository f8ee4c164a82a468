"""AppendLayer holds exactly what DynamicLayer holds, through every operation a cache sees."""

import copy

import torch
from transformers.cache_utils import DynamicLayer

from hf_kvpool.hf.layers import AppendLayer, adopt


def kv(n, b=2, h=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def same(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_updates_crop_reorder_and_batch_ops_match_dynamic_layer():
    ref, app = DynamicLayer(), AppendLayer()
    steps = [
        ("update", 7),
        ("update", 1),
        ("update", 1),
        ("crop", -2),
        ("update", 3),
        ("reorder", None),
        ("update", 1),
        ("repeat", 2),
        ("update", 1),
        ("select", None),
        ("update", 90),
    ]
    for i, (op, arg) in enumerate(steps):
        if op == "update":
            k, v = kv(arg, b=ref.keys.shape[0] if ref.is_initialized and ref.keys.dim() == 4 else 2, seed=i)
            out_ref = ref.update(k, v)
            out_app = app.update(k, v)
            assert torch.equal(out_ref[0], out_app[0]) and torch.equal(out_ref[1], out_app[1])
        elif op == "crop":
            ref.crop(arg)
            app.crop(arg)
        elif op == "reorder":
            idx = torch.tensor([1, 0])
            ref.reorder_cache(idx)
            app.reorder_cache(idx)
        elif op == "repeat":
            ref.batch_repeat_interleave(arg)
            app.batch_repeat_interleave(arg)
        elif op == "select":
            idx = torch.tensor([0, 3])
            ref.batch_select_indices(idx)
            app.batch_select_indices(idx)
        same(ref, app)


def test_decode_appends_in_place():
    layer = AppendLayer()
    layer.update(*kv(10))
    buf = layer._kbuf
    for i in range(20):
        layer.update(*kv(1, seed=i + 1))
    assert layer._kbuf is buf  # no reallocation while there is room
    assert layer.get_seq_length() == 30


def test_deepcopy_and_reset():
    layer = AppendLayer()
    layer.update(*kv(4))
    twin = copy.deepcopy(layer)
    k, v = kv(1, seed=5)
    layer.update(k, v)
    twin.update(k, v)
    same(layer, twin)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer._kbuf is None
    layer.update(k, v)
    assert torch.equal(layer.keys, k)


def test_adopt_then_update():
    k, v = kv(6)
    kbuf = torch.zeros(2, 3, 10, 5)
    vbuf = torch.zeros(2, 3, 10, 5)
    kbuf[:, :, :4], vbuf[:, :, :4] = k[:, :, :4], v[:, :, :4]
    layer = AppendLayer()
    adopt(layer, kbuf, vbuf, 4)
    assert layer.get_seq_length() == 4
    layer.update(k[:, :, 4:], v[:, :, 4:])
    assert torch.equal(layer.keys, k) and layer._kbuf is kbuf
