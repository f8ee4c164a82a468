"""Triton paged gather / scatter against the torch reference, bit for bit.

Without CUDA these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
every launch here is kept to a few dozen programs. ``gpu``-marked cases use realistic and very
large shapes and only run on a CUDA machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_kvpool.core.paging import gather, scatter, torch_gather, torch_scatter
from hf_kvpool.triton_kernels import paged_gather, paged_scatter
from hf_kvpool.triton_kernels.paged_copy import _source_groups

try:  # hypothesis is a test extra; the GPU machine may lack it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)
INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers, so equality is bit equality (NaNs, -0.0, fp8)."""
    return t.view(INT_VIEW[t.element_size()])


def rand(shape, dtype, gen) -> torch.Tensor:
    # randn in fp32, then cast: works for every dtype including fp8
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def idx(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def gather_plan(gen, n_blocks, bs, batch, blocks_per_row, partial=True):
    """Entries that fill ``batch`` rows with ``blocks_per_row`` blocks each, last one partial."""
    n = batch * blocks_per_row
    block_ids = torch.randperm(n_blocks, generator=gen)[:n]  # scattered over the whole pool
    rows = torch.arange(batch).repeat_interleave(blocks_per_row)
    cols = torch.arange(blocks_per_row).repeat(batch) * bs
    ntok = torch.full((n,), bs, dtype=torch.int64)
    if partial:
        last = torch.arange(batch) * blocks_per_row + blocks_per_row - 1
        ntok[last] = torch.randint(1, bs + 1, (batch,), generator=gen)
    return [t.to(DEVICE) for t in (block_ids, rows, cols, ntok)]


def ref_gather(storage, block_ids, rows, dst_cols, ntok, out):
    """torch_gather; fp8 goes through an int8 view (not every fp8 indexing kernel exists)."""
    if storage.element_size() == 1:
        bits_out = torch_gather(bits(storage), block_ids, rows, dst_cols, ntok, bits(out))
        return bits_out.view(out.dtype)
    return torch_gather(storage, block_ids, rows, dst_cols, ntok, out)


def ref_scatter(storage, srcs, block_ids, rows, src_cols):
    """torch_scatter; fp8 goes through an int8 view (index_copy_ has no fp8 kernel on CPU)."""
    if storage.element_size() == 1:
        srcs = [(bits(k), bits(v)) for k, v in srcs]
        storage = bits(storage)
    torch_scatter(storage, srcs, block_ids, rows, src_cols)


def strided_srcs(gen, n_layers, batch, heads, seq, head_dim, dtype):
    """Per-layer (k, v) as ``[B, S, H, D].transpose(1, 2)``: non-contiguous, like many attention outputs."""
    return [
        tuple(rand((batch, seq, heads, head_dim), dtype, gen).transpose(1, 2) for _ in range(2))
        for _ in range(n_layers)
    ]


SHAPES = [  # (block_size, head_dim, kv_heads)
    (16, 80, 2),
    (8, 96, 3),
    (32, 64, 1),
    (128, 128, 2),
    (16, 256, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,head_dim,heads", SHAPES)
def test_gather_matches_reference(dtype, bs, head_dim, heads):
    gen = torch.Generator().manual_seed(bs * head_dim + heads)
    n_layers, n_blocks, batch, per_row = 2, 97, 2, 2
    storage = rand((n_blocks, n_layers, 2, heads, bs, head_dim), dtype, gen)
    plan = gather_plan(gen, n_blocks, bs, batch, per_row)
    out_shape = (n_layers, 2, batch, heads, per_row * bs + 3, head_dim)
    want = ref_gather(storage, *plan, torch.zeros(out_shape, dtype=dtype, device=DEVICE))
    got = paged_gather(storage, *plan, torch.zeros(out_shape, dtype=dtype, device=DEVICE))
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,head_dim,heads", SHAPES)
def test_scatter_matches_reference(dtype, bs, head_dim, heads):
    gen = torch.Generator().manual_seed(bs + head_dim * heads)
    n_layers, n_blocks, batch, seq = 2, 97, 2, 2 * bs + 5
    storage = rand((n_blocks, n_layers, 2, heads, bs, head_dim), dtype, gen)
    srcs = strided_srcs(gen, n_layers, batch, heads, seq, head_dim, dtype)
    block_ids = idx(torch.randperm(n_blocks, generator=gen)[:3].tolist())
    rows, src_cols = idx([0, 1, 1]), idx([0, 5, bs + 5])  # src_cols need not be block-aligned
    want, got = storage.clone(), storage.clone()
    ref_scatter(want, srcs, block_ids, rows, src_cols)
    paged_scatter(got, srcs, block_ids, rows, src_cols)
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("fields", [1, 3])
def test_other_field_counts_match_reference(fields):
    """The pool stores one field per slot (each stream its own "layer"); any count works."""
    gen = torch.Generator().manual_seed(fields)
    n_layers, n_blocks, bs, heads, dim = 3, 23, 8, 2, 32
    storage = rand((n_blocks, n_layers, fields, heads, bs, dim), torch.bfloat16, gen)
    plan = gather_plan(gen, n_blocks, bs, batch=2, blocks_per_row=2)
    out_shape = (n_layers, fields, 2, heads, 2 * bs, dim)
    want = ref_gather(storage, *plan, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE))
    got = paged_gather(storage, *plan, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE))
    assert torch.equal(bits(got), bits(want))
    srcs = [
        tuple(rand((2, 2 * bs, heads, dim), torch.bfloat16, gen).transpose(1, 2) for _ in range(fields))
        for _ in range(n_layers)
    ]
    block_ids, rows, src_cols = idx([4, 9]), idx([0, 1]), idx([0, 3])
    want, got = storage.clone(), storage.clone()
    torch_scatter(want, srcs, block_ids, rows, src_cols)
    paged_scatter(got, srcs, block_ids, rows, src_cols)
    assert torch.equal(bits(got), bits(want))


def test_gather_strided_storage_and_out():
    """Storage a layer slice of a bigger pool, out a permuted allocation: both non-contiguous."""
    gen = torch.Generator().manual_seed(1)
    big = rand((40, 4, 2, 2, 16, 80), torch.bfloat16, gen)
    storage = big[:, 1:3]  # [N, 2, 2, H, bs, D], not contiguous
    plan = gather_plan(gen, 40, 16, batch=2, blocks_per_row=2)
    out_shape = (2, 2, 2, 2, 35, 80)
    out = torch.zeros(2, 2, 2, 35, 2, 80, dtype=torch.bfloat16, device=DEVICE).transpose(3, 4)
    assert out.shape == out_shape and not out.is_contiguous()
    want = torch_gather(storage, *plan, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE))
    assert torch.equal(bits(paged_gather(storage, *plan, out)), bits(want))


def test_scatter_mixed_source_layouts():
    """Sources with different strides (contiguous k, transposed v, a sliced layer) are all honoured."""
    gen = torch.Generator().manual_seed(2)
    heads, bs, head_dim, seq = 2, 8, 96, 24
    k0 = rand((2, heads, seq, head_dim), torch.float16, gen)  # contiguous
    v0 = rand((2, seq, heads, head_dim), torch.float16, gen).transpose(1, 2)
    k1 = rand((3, heads, seq + 7, head_dim), torch.float16, gen)[1:, :, 7:]  # offset slice
    v1 = rand((2, heads, seq, 2 * head_dim), torch.float16, gen)[..., head_dim:]
    srcs = [(k0, v0), (k1, v1)]
    assert len(_source_groups([(i, t) for i, t in enumerate([k0, v0, k1, v1])])) == 4
    storage = rand((30, 2, 2, heads, bs, head_dim), torch.float16, gen)
    block_ids, rows, src_cols = idx([29, 0, 13]), idx([1, 0, 1]), idx([16, 3, 0])
    want, got = storage.clone(), storage.clone()
    ref_scatter(want, srcs, block_ids, rows, src_cols)
    paged_scatter(got, srcs, block_ids, rows, src_cols)
    assert torch.equal(bits(got), bits(want))


def test_scatter_uniform_views_are_one_launch():
    """Separately allocated sources with equal strides share one launch via (possibly negative) offsets."""
    gen = torch.Generator().manual_seed(3)
    srcs = strided_srcs(gen, 3, 1, 2, 16, 64, torch.float32)
    flat = [(2 * layer + kv, bits(t)) for layer, pair in enumerate(srcs) for kv, t in enumerate(pair)]
    groups = _source_groups(flat)
    assert len(groups) == 1
    base, offs, slots = groups[0]
    assert slots == list(range(6)) and offs[0] == 0
    assert [base.data_ptr() + 4 * o for o in offs] == [t.data_ptr() for _, t in flat]


def test_dispatch_by_backend():
    gen = torch.Generator().manual_seed(4)
    storage = rand((20, 1, 2, 2, 8, 64), torch.float32, gen)
    plan = gather_plan(gen, 20, 8, batch=1, blocks_per_row=2)
    out = gather("triton", storage, *plan, torch.zeros(1, 2, 1, 2, 16, 64, device=DEVICE))
    assert torch.equal(out, gather("torch", storage, *plan, torch.zeros_like(out)))
    srcs = strided_srcs(gen, 1, 1, 2, 16, 64, torch.float32)
    a, b = storage.clone(), storage.clone()
    scatter("triton", a, srcs, idx([3]), idx([0]), idx([8]))
    scatter("torch", b, srcs, idx([3]), idx([0]), idx([8]))
    assert torch.equal(a, b)


def test_empty_is_noop():
    storage = torch.ones(4, 1, 2, 1, 8, 64, device=DEVICE)
    none = idx([])
    out = torch.zeros(1, 2, 1, 1, 8, 64, device=DEVICE)
    assert paged_gather(storage, none, none, none, none, out) is out and not out.any()
    paged_scatter(storage, [(out[0, 0], out[0, 1])], none, none, none)
    assert storage.all()


def check_roundtrip(heads, bs, head_dim, n_layers, n, seed):
    """Scatter then gather with random partial lengths equals the torch path on both legs."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks, seq = 4 * n + 3, n * bs
    srcs = strided_srcs(gen, n_layers, 1, heads, seq, head_dim, torch.bfloat16)
    block_ids = idx(torch.randperm(n_blocks, generator=gen)[:n].tolist())
    rows, cols = idx([0] * n), idx([i * bs for i in range(n)])
    storage = torch.zeros(n_blocks, n_layers, 2, heads, bs, head_dim, dtype=torch.bfloat16, device=DEVICE)
    want_st, got_st = storage.clone(), storage.clone()
    torch_scatter(want_st, srcs, block_ids, rows, cols)
    paged_scatter(got_st, srcs, block_ids, rows, cols)
    assert torch.equal(bits(got_st), bits(want_st))
    ntok = idx(torch.randint(1, bs + 1, (n,), generator=gen).tolist())
    out_shape = (n_layers, 2, 1, heads, seq, head_dim)
    want = torch_gather(
        want_st, block_ids, rows, cols, ntok, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE)
    )
    got = paged_gather(
        got_st, block_ids, rows, cols, ntok, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE)
    )
    assert torch.equal(bits(got), bits(want))


if given is not None:

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        heads=st.integers(1, 3),
        bs=st.sampled_from([8, 16, 32]),
        head_dim=st.sampled_from([64, 80, 96, 128]),
        n_layers=st.integers(1, 2),
        n=st.integers(1, 3),
        seed=st.integers(0, 2**16),
    )
    def test_roundtrip_property(heads, bs, head_dim, n_layers, n, seed):
        check_roundtrip(heads, bs, head_dim, n_layers, n, seed)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_roundtrip_property():
        pass


def _huge_fp8_pool(n_blocks, block_shape):
    """A pool of more than 2**31 one-byte elements. ``torch.empty`` does not touch the pages, so
    only the blocks a test writes become resident (a few MiB); skip where the OS refuses."""
    dtype = getattr(torch, "float8_e4m3fn", torch.int8)
    try:
        return torch.empty(n_blocks, *block_shape, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve a >2 GiB pool here: {exc}")


def test_offsets_beyond_int32_small():
    """block_id * block_stride > 2**31 elements with few programs: the address math must be int64."""
    block_shape = (1, 2, 1, 8, 64)  # 1024 elements per block
    n_blocks = 2**31 // 1024 + 64
    storage = _huge_fp8_pool(n_blocks, block_shape)
    gen = torch.Generator().manual_seed(5)
    block_ids = idx([n_blocks - 1, 3, n_blocks - 33])
    assert int(block_ids.max()) * storage.stride(0) >= 2**31
    srcs = strided_srcs(gen, 1, 1, 1, 24, 64, storage.dtype)
    rows, cols = idx([0, 0, 0]), idx([0, 8, 16])
    paged_scatter(storage, srcs, block_ids, rows, cols)
    want = torch.zeros(3, *block_shape, dtype=storage.dtype, device=DEVICE)
    ref_scatter(want, srcs, idx([0, 1, 2]), rows, cols)
    assert torch.equal(bits(storage[block_ids]), bits(want))
    ntok = idx([8, 8, 5])
    out = torch.zeros(1, 2, 1, 1, 24, 64, dtype=storage.dtype, device=DEVICE)
    want_out = ref_gather(want, idx([0, 1, 2]), rows, cols, ntok, out.clone())
    assert torch.equal(bits(paged_gather(storage, block_ids, rows, cols, ntok, out)), bits(want_out))


# ------------------------------------------------------------------------- compiled without a GPU

# Compiles both kernels for sm_90 (no GPU needed: Triton ships ptxas) the way the JIT specialises a
# bf16, head_dim 80 launch (16-aligned pointers, strides divisible by 16, unit last stride), and
# prints the global load/store instructions of the PTX.
AOT_SCRIPT = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_kvpool.triton_kernels import paged_copy as pc

INDEX = {"block_ids_ptr", "rows_ptr", "dst_cols_ptr", "ntok_ptr", "src_offs_ptr", "slots_ptr", "src_cols_ptr"}
for fn in (pc._paged_gather_kernel, pc._paged_scatter_kernel):
    consts = {"BLOCK_H": 4, "BLOCK_T": 16, "HEAD_DIM": 80, "BLOCK_D": 128, "SRC_ALIGN": 8}
    consts.update({name: 1 for name in ("s_d", "o_d", "k_d")})
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in consts:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = consts[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i64" if p.name in INDEX else "*i16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "i32"
            if p.name[:2] in ("s_", "o_", "k_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    ptx = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(fn.__name__, sorted(set(re.findall(r"(?:ld|st)[.]global[.][.\\w]*", ptx))))
"""


def test_kernels_compile_for_gpu_with_vector_access(tmp_path):
    """The interpreter does not compile: check the real compiler accepts both kernels and emits
    128-bit loads and stores for a non-power-of-two head_dim (the mask is a compile-time constant)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    if "ImportError" in proc.stderr and "triton.backends" in proc.stderr:
        pytest.skip(f"this Triton has no ahead-of-time CUDA compiler: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, line


# ------------------------------------------------------------------------------------------ errors


def _small():
    storage = torch.zeros(10, 2, 2, 2, 8, 64, device=DEVICE)
    out = torch.zeros(2, 2, 1, 2, 16, 64, device=DEVICE)
    srcs = [(torch.zeros(1, 2, 16, 64, device=DEVICE),) * 2] * 2
    return storage, out, srcs


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(out=a["out"].half()), "out dtype"),
        (lambda a: a.update(out=a["out"][:, :, :, :1]), r"expected \[2, 2, B, 2, T, 64\]"),
        (lambda a: a.update(storage=a["storage"][0]), "storage must be"),
        (lambda a: a.update(storage=a["storage"].to(torch.int32)), "not supported"),
        (lambda a: a.update(rows=a["rows"].int()), "rows must be a 1-D int64"),
        (lambda a: a.update(ntok=a["ntok"][:1]), "ntok has 1 entries but block_ids has 2"),
        (lambda a: a.update(out=a["out"][:, :, :1].expand(2, 2, 3, 2, 16, 64)), "zero stride"),
        (lambda a: a.update(block_ids=idx([0, 10])), "gather index out of range"),
        (lambda a: a.update(ntok=idx([8, 9])), "gather index out of range"),
        (lambda a: a.update(dst_cols=idx([0, 9])), "gather index out of range"),
        (lambda a: a.update(storage=a["storage"].to("meta")), "is on meta"),
    ],
)
def test_gather_errors(change, match):
    storage, out, _ = _small()
    args = dict(
        storage=storage, block_ids=idx([0, 1]), rows=idx([0, 0]), dst_cols=idx([0, 8]), ntok=idx([8, 8])
    )
    args["out"] = out
    change(args)
    with pytest.raises((ValueError, IndexError), match=match):
        paged_gather(**args)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(srcs=a["srcs"][:1]), "srcs has 1 layers but storage holds 2"),
        (lambda a: a.update(srcs=[a["srcs"][0], (a["srcs"][1][0],)]), r"srcs\[1\] must be a \(k, v\) pair"),
        (lambda a: a.update(srcs=[(s[0].half(), s[1].half()) for s in a["srcs"]]), "dtype torch.float16"),
        (lambda a: a.update(srcs=[(s[0][..., :32], s[1]) for s in a["srcs"]]), r"expects \[B, 2, S, 64\]"),
        (
            lambda a: a.update(srcs=[a["srcs"][0], (a["srcs"][1][0][:, :, :8],) * 2]),
            "but srcs\\[0\\]\\[0\\] has",
        ),
        (lambda a: a.update(src_cols=idx([0, 9])), "scatter index out of range"),
        (lambda a: a.update(rows=idx([1, 0])), "scatter index out of range"),
        (lambda a: a.update(block_ids=idx([-1, 0])), "scatter index out of range"),
    ],
)
def test_scatter_errors(change, match):
    storage, _, srcs = _small()
    args = dict(storage=storage, srcs=srcs, block_ids=idx([0, 1]), rows=idx([0, 0]), src_cols=idx([0, 8]))
    change(args)
    with pytest.raises((ValueError, IndexError), match=match):
        paged_scatter(**args)


# ------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_realistic_shapes_gpu(dtype):
    """32 layers, 8 kv heads, head_dim 128, block 16: 512 blocks of a 1024-block pool, both ways."""
    gen = torch.Generator().manual_seed(6)
    storage = torch.randn(1024, 32, 2, 8, 16, 128, device=DEVICE, dtype=torch.float16).to(dtype)
    plan = gather_plan(gen, 1024, 16, batch=8, blocks_per_row=64)
    out_shape = (32, 2, 8, 8, 64 * 16, 128)
    want = ref_gather(storage, *plan, torch.zeros(out_shape, dtype=dtype, device=DEVICE))
    got = paged_gather(storage, *plan, torch.zeros(out_shape, dtype=dtype, device=DEVICE))
    assert torch.equal(bits(got), bits(want))
    del want, got
    srcs = [  # [B, S, H, D].transpose(1, 2) per layer
        tuple(torch.randn(8, 1024, 8, 128, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(2))
        for _ in range(32)
    ]
    block_ids, rows, cols, _ = plan
    want_st, got_st = storage.clone(), storage
    ref_scatter(want_st, srcs, block_ids, rows, cols)
    paged_scatter(got_st, srcs, block_ids, rows, cols)
    assert torch.equal(bits(got_st), bits(want_st))


@pytest.mark.gpu
def test_large_pool_int64_offsets_gpu():
    """A bf16 pool of > 2**31 elements (4 GiB) and an out of 2**32 elements (8 GiB): int64 both sides."""
    gen = torch.Generator().manual_seed(7)
    block_shape = (4, 2, 8, 16, 128)  # 131072 elements per block
    n_blocks = 2**31 // 131072 + 256
    storage = torch.randn(n_blocks, *block_shape, device=DEVICE, dtype=torch.bfloat16)
    top = torch.arange(n_blocks - 64, n_blocks)
    block_ids = torch.cat([top, torch.randperm(n_blocks - 64, generator=gen)[:64]]).to(DEVICE)
    n = block_ids.numel()
    rows, cols = idx([1] * n), idx([16 * i for i in range(n)])
    ntok = idx([16] * (n - 1) + [7])
    out_shape = (4, 2, 2, 8, 2**18, 128)  # layer 3, row 1 starts past 2**31 elements
    want = ref_gather(
        storage, block_ids, rows, cols, ntok, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE)
    )
    got = paged_gather(
        storage, block_ids, rows, cols, ntok, torch.zeros(out_shape, dtype=torch.bfloat16, device=DEVICE)
    )
    assert torch.equal(bits(got), bits(want))
    del got, want
    srcs = [
        tuple(torch.randn(2, 8, 16 * n, 128, device=DEVICE).to(torch.bfloat16) for _ in range(2))
        for _ in range(4)
    ]
    want_st, got_st = storage.clone(), storage
    ref_scatter(want_st, srcs, block_ids, rows, cols)
    paged_scatter(got_st, srcs, block_ids, rows, cols)
    assert torch.equal(bits(got_st[block_ids]), bits(want_st[block_ids]))
