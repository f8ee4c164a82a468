"""Triton paged gather / paged scatter: the two data moves of the pool, as kernels.

Same semantics and arguments as the torch reference (``hf_kvpool.core.paging.torch_gather`` /
``torch_scatter``), which these kernels are tested against bit for bit. Storage layout::

    storage: [num_blocks, n_layers, P, kv_heads, block_size, head_dim]   (P fields per layer: 2 = K, V)

Both kernels only move bytes: every tensor is reinterpreted as the integer dtype of the same width
(fp8 -> int8, bf16/fp16 -> int16, fp32 -> int32), so no float arithmetic ever touches the values.
All address arithmetic is int64 (``block_id * stride`` overflows int32 on large pools).

Grid ``(entries, slots, head chunks)``: one program moves one (entry, layer, K-or-V, chunk of
heads) tile ``[BLOCK_H, BLOCK_T, BLOCK_D]`` (about 16 KiB), looping over token chunks when
``block_size * head_dim`` is large. ``head_dim`` is a compile-time constant, so its mask (80, 96:
not powers of two) does not stop 128-bit loads and stores.

Layers: the gather reads one storage tensor that holds every layer, so one launch covers all
layers and fields (grid axis 1 = ``layer * P + field``). The scatter reads ``L`` pairs of
separate tensors: those that share strides (the usual case) are addressed from the first one's
base pointer plus an int64 element offset per tensor, computed on the host from ``data_ptr()``
(plain pointer arithmetic: no pointer is loaded from memory, which the interpreter cannot do), so
again one launch for all layers and K and V. Each further stride pattern costs one more launch.
This relies on one flat address space per device, true for CUDA and for CPU tensors under the
interpreter.

This module holds no pool logic: which block holds what is the caller's business.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_device, check_index, check_storage, check_values

__all__ = ["paged_gather", "paged_scatter"]

# Bytes one program holds per token chunk: 16 KiB (8192 bf16 values) keeps registers in check.
_TILE_BYTES = 16 * 1024
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """The same memory reinterpreted as an integer dtype of the same width (strides unchanged)."""
    return t.view(_INT_VIEW[t.element_size()])


def _tiles(n_heads: int, block_size: int, head_dim: int, elem_size: int) -> tuple[int, int, int]:
    """Tile ``(BLOCK_H, BLOCK_T, BLOCK_D)``: whole head_dim, as many tokens then heads as fit."""
    budget = max(1, _TILE_BYTES // elem_size)  # elements per tile
    block_d = triton.next_power_of_2(head_dim)
    block_t = min(triton.next_power_of_2(block_size), max(1, budget // block_d))
    block_h = min(triton.next_power_of_2(n_heads), max(1, budget // (block_d * block_t)))
    return block_h, block_t, block_d


# --------------------------------------------------------------------------------------------- gather


@triton.jit
def _paged_gather_kernel(
    storage_ptr,  # [N, L, P, H, bs, D] pool, integer view
    out_ptr,  # [L, P, B, H, T, D] destination, integer view of the same width
    block_ids_ptr,  # int64 [n]: pool block of each entry
    rows_ptr,  # int64 [n]: batch row of each entry in out
    dst_cols_ptr,  # int64 [n]: first token column in out of each entry
    ntok_ptr,  # int64 [n]: tokens to copy from each block (1 <= ntok <= bs)
    n_fields,  # P
    n_heads,  # H
    s_n,  # storage stride of N, in elements
    s_l,  # storage stride of L, in elements
    s_kv,  # storage stride of K/V, in elements
    s_h,  # storage stride of H, in elements
    s_t,  # storage stride of bs, in elements
    s_d,  # storage stride of D, in elements
    o_l,  # out stride of L, in elements
    o_kv,  # out stride of K/V, in elements
    o_b,  # out stride of B, in elements
    o_h,  # out stride of H, in elements
    o_t,  # out stride of T, in elements
    o_d,  # out stride of D, in elements
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    BLOCK_T: tl.constexpr,  # tokens per loop step (power of two)
    HEAD_DIM: tl.constexpr,  # D (constexpr: a compile-time mask keeps loads vectorised)
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    entry = tl.program_id(0)
    slot = tl.program_id(1).to(tl.int64)  # layer * P + field
    layer = slot // n_fields
    kv = slot % n_fields
    h = tl.program_id(2).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    t = tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)

    block = tl.load(block_ids_ptr + entry)  # int64
    row = tl.load(rows_ptr + entry)
    col = tl.load(dst_cols_ptr + entry)
    nt = tl.load(ntok_ptr + entry)

    src_base = storage_ptr + block * s_n + layer * s_l + kv * s_kv
    dst_base = out_ptr + layer * o_l + kv * o_kv + row * o_b + col * o_t
    hd_mask = (h[:, None, None] < n_heads) & (d[None, None, :] < HEAD_DIM)
    src_hd = h[:, None, None] * s_h + d[None, None, :] * s_d
    dst_hd = h[:, None, None] * o_h + d[None, None, :] * o_d
    for t0 in range(0, nt, BLOCK_T):
        tt = t0 + t
        mask = hd_mask & (tt[None, :, None] < nt)
        vals = tl.load(src_base + src_hd + tt[None, :, None] * s_t, mask=mask)
        tl.store(dst_base + dst_hd + tt[None, :, None] * o_t, vals, mask=mask)


def paged_gather(
    storage: torch.Tensor,
    block_ids: torch.Tensor,
    rows: torch.Tensor,
    dst_cols: torch.Tensor,
    ntok: torch.Tensor,
    out: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Copy blocks into contiguous per-layer K/V (Triton; semantics of ``torch_gather``).

    For every entry ``i`` and token ``t < ntok[i]``::

        out[:, :, rows[i], :, dst_cols[i] + t, :] = storage[block_ids[i], :, :, :, t, :]

    Args:
        storage: ``[N, L, P, H, bs, D]``, fp32 / fp16 / bf16 / fp8, CUDA (or CPU under the interpreter).
        block_ids, rows, dst_cols, ntok: int64 ``[n]`` on ``storage.device``; ``1 <= ntok <= bs``.
        out: ``[L, P, B, H, T, D]``, any non-zero strides, same dtype/device as ``storage``; columns
            not written keep their value.
        validate: check index ranges first (one device sync); an out-of-range index would otherwise
            read or write outside the tensors.
    Returns:
        ``out``.
    """
    kernel = _paged_gather_kernel
    check_storage(storage)
    check_device("storage", storage, kernel)
    n = block_ids.numel() if isinstance(block_ids, torch.Tensor) else -1
    for name, idx in (("block_ids", block_ids), ("rows", rows), ("dst_cols", dst_cols), ("ntok", ntok)):
        check_index(name, idx, n, storage.device)
    N, L, P, H, bs, D = storage.shape
    if not isinstance(out, torch.Tensor) or out.dim() != 6:
        raise ValueError(f"out must be [L, P, B, H, T, D], got {getattr(out, 'shape', type(out).__name__)}")
    if (out.shape[0], out.shape[1], out.shape[3], out.shape[5]) != (L, P, H, D):
        raise ValueError(
            f"out shape {tuple(out.shape)} does not match storage {tuple(storage.shape)}: "
            f"expected [{L}, {P}, B, {H}, T, {D}]"
        )
    if out.dtype != storage.dtype:
        raise ValueError(f"out dtype {out.dtype} differs from storage dtype {storage.dtype}")
    if out.device != storage.device:
        raise ValueError(f"out is on {out.device} but storage is on {storage.device}")
    if 0 in out.stride():
        raise ValueError("out has a zero stride (an expanded view); pass a tensor that owns its memory")
    if n == 0:
        return out
    B, T = out.shape[2], out.shape[4]
    if validate:
        ok = (
            (block_ids.min() >= 0)
            & (block_ids.max() < N)
            & (rows.min() >= 0)
            & (rows.max() < B)
            & (ntok.min() >= 1)
            & (ntok.max() <= bs)
            & (dst_cols.min() >= 0)
            & ((dst_cols + ntok).max() <= T)
        )
        check_values(
            ok, f"gather index out of range: need 0 <= block_ids < {N}, 0 <= rows < {B}, 1 <= ntok <= {bs}, "
            f"0 <= dst_cols and dst_cols + ntok <= {T}"
        )  # fmt: skip

    src, dst = _as_int(storage), _as_int(out)
    block_h, block_t, block_d = _tiles(H, bs, D, storage.element_size())
    grid = (n, L * P, triton.cdiv(H, block_h))
    kernel[grid](
        src, dst, block_ids, rows, dst_cols, ntok, P, H,
        *src.stride(), *dst.stride(),
        BLOCK_H=block_h, BLOCK_T=block_t, HEAD_DIM=D, BLOCK_D=block_d,
    )  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- scatter


@triton.jit
def _paged_scatter_kernel(
    storage_ptr,  # [N, L, P, H, bs, D] pool, integer view
    src_ptr,  # base of the first source tensor; every source is src_ptr + src_offs[j]
    src_offs_ptr,  # int64 [M]: element offset of source j's base from src_ptr (may be negative)
    slots_ptr,  # int64 [M]: storage slot (layer * P + field) that source j is written to
    block_ids_ptr,  # int64 [n]: pool block of each entry
    rows_ptr,  # int64 [n]: batch row of each entry in the sources
    src_cols_ptr,  # int64 [n]: first token column of each entry in the sources
    n_fields,  # P
    n_heads,  # H
    block_size,  # bs: tokens per block (all are copied)
    s_n,  # storage stride of N, in elements
    s_l,  # storage stride of L, in elements
    s_kv,  # storage stride of K/V, in elements
    s_h,  # storage stride of H, in elements
    s_t,  # storage stride of bs, in elements
    s_d,  # storage stride of D, in elements
    k_b,  # source stride (shared by all M) of B, in elements
    k_h,  # source stride (shared by all M) of H, in elements
    k_s,  # source stride (shared by all M) of S, in elements
    k_d,  # source stride (shared by all M) of D, in elements
    SRC_ALIGN: tl.constexpr,  # every src_offs[j] is a multiple of this (keeps loads vectorised)
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    BLOCK_T: tl.constexpr,  # tokens per loop step (power of two)
    HEAD_DIM: tl.constexpr,  # D (constexpr: a compile-time mask keeps loads vectorised)
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    entry = tl.program_id(0)
    j = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    t = tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)

    slot = tl.load(slots_ptr + j)  # int64
    layer = slot // n_fields
    kv = slot % n_fields
    src_off = tl.multiple_of(tl.load(src_offs_ptr + j), SRC_ALIGN)
    block = tl.load(block_ids_ptr + entry)
    row = tl.load(rows_ptr + entry)
    col = tl.load(src_cols_ptr + entry)

    src_base = src_ptr + src_off + row * k_b + col * k_s
    dst_base = storage_ptr + block * s_n + layer * s_l + kv * s_kv
    hd_mask = (h[:, None, None] < n_heads) & (d[None, None, :] < HEAD_DIM)
    src_hd = h[:, None, None] * k_h + d[None, None, :] * k_d
    dst_hd = h[:, None, None] * s_h + d[None, None, :] * s_d
    for t0 in range(0, block_size, BLOCK_T):
        tt = t0 + t
        mask = hd_mask & (tt[None, :, None] < block_size)
        vals = tl.load(src_base + src_hd + tt[None, :, None] * k_s, mask=mask)
        tl.store(dst_base + dst_hd + tt[None, :, None] * s_t, vals, mask=mask)


def _source_groups(
    sources: list[tuple[int, torch.Tensor]],
) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """Group ``(slot, tensor)`` by strides: ``[(base tensor, element offsets, slots)]``, one launch each.

    Sources with equal strides are addressed from the first one's base with an int64 element
    offset (plain pointer arithmetic, no pointer loads), so the usual case -- every layer's K and V
    laid out alike -- is a single launch for the whole storage group.
    """
    groups: dict[tuple[int, ...], tuple[torch.Tensor, list[int], list[int]]] = {}
    for slot, t in sources:
        key = t.stride()
        if key not in groups:
            groups[key] = (t, [], [])
        base, offs, slots = groups[key]
        delta = t.data_ptr() - base.data_ptr()
        if delta % t.element_size():  # cannot happen for one dtype, but never guess
            groups[(*key, slot)] = (t, [0], [slot])
            continue
        offs.append(delta // t.element_size())
        slots.append(slot)
    return list(groups.values())


def _alignment(offsets: list[int], elem_size: int) -> int:
    """Largest power of two <= 16 bytes worth of elements dividing every offset."""
    align = max(1, 16 // elem_size)
    while align > 1 and any(o % align for o in offsets):
        align //= 2
    return align


def paged_scatter(
    storage: torch.Tensor,
    srcs: list[tuple[torch.Tensor, ...]],
    block_ids: torch.Tensor,
    rows: torch.Tensor,
    src_cols: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Copy full blocks of tokens from per-layer K/V into storage (Triton; semantics of ``torch_scatter``).

    For every entry ``i``, layer ``l`` and field ``p``::

        storage[block_ids[i], l, p] = srcs[l][p][rows[i], :, src_cols[i] : src_cols[i] + bs, :]

    Args:
        storage: ``[N, L, P, H, bs, D]``, fp32 / fp16 / bf16 / fp8, CUDA (or CPU under the interpreter).
        srcs: ``L`` tuples of ``P`` tensors (e.g. ``(k, v)``), each ``[B, H, S, D]`` (same shape for all) with any strides,
            dtype and device of ``storage``. All sources with equal strides go in one launch; each
            further stride pattern costs one more launch.
        block_ids, rows, src_cols: int64 ``[n]`` on ``storage.device``. ``block_ids`` should be
            distinct (as in the reference, which of two writes to one block wins is unspecified).
        validate: check index ranges first (one device sync).
    """
    kernel = _paged_scatter_kernel
    check_storage(storage)
    check_device("storage", storage, kernel)
    n = block_ids.numel() if isinstance(block_ids, torch.Tensor) else -1
    for name, idx in (("block_ids", block_ids), ("rows", rows), ("src_cols", src_cols)):
        check_index(name, idx, n, storage.device)
    N, L, P, H, bs, D = storage.shape
    if len(srcs) != L:
        raise ValueError(f"srcs has {len(srcs)} layers but storage holds {L}; pass one tuple per layer")
    sources: list[tuple[int, torch.Tensor]] = []
    shape0 = None
    for layer, pair in enumerate(srcs):
        if len(pair) != P:
            what = "a (k, v) pair" if P == 2 else f"a tuple of {P} tensors (one per field)"
            raise ValueError(f"srcs[{layer}] must be {what}, got {len(pair)} tensors")
        for kv, t in enumerate(pair):
            name = f"srcs[{layer}][{kv}]"
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be [B, H, S, D], got {getattr(t, 'shape', type(t).__name__)}")
            if t.shape[1] != H or t.shape[3] != D:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; storage expects [B, {H}, S, {D}]")
            shape0 = shape0 or t.shape
            if t.shape != shape0:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but srcs[0][0] has {tuple(shape0)}")
            if t.dtype != storage.dtype:
                raise ValueError(f"{name} dtype {t.dtype} differs from storage dtype {storage.dtype}")
            if t.device != storage.device:
                raise ValueError(f"{name} is on {t.device} but storage is on {storage.device}")
            sources.append((layer * P + kv, _as_int(t)))
    if n == 0:
        return
    B, S = shape0[0], shape0[2]
    if validate:
        ok = (
            (block_ids.min() >= 0)
            & (block_ids.max() < N)
            & (rows.min() >= 0)
            & (rows.max() < B)
            & (src_cols.min() >= 0)
            & (src_cols.max() + bs <= S)
        )
        check_values(
            ok, f"scatter index out of range: need 0 <= block_ids < {N}, 0 <= rows < {B}, "
            f"0 <= src_cols and src_cols + {bs} <= {S}"
        )  # fmt: skip

    dst = _as_int(storage)
    block_h, block_t, block_d = _tiles(H, bs, D, storage.element_size())
    for base, offs, slots in _source_groups(sources):
        src_offs = torch.tensor(offs, dtype=torch.int64).to(storage.device, non_blocking=True)
        slot_ids = torch.tensor(slots, dtype=torch.int64).to(storage.device, non_blocking=True)
        grid = (n, len(slots), triton.cdiv(H, block_h))
        kernel[grid](
            dst, base, src_offs, slot_ids, block_ids, rows, src_cols, P, H, bs,
            *dst.stride(), *base.stride(),
            SRC_ALIGN=_alignment(offs, storage.element_size()),
            BLOCK_H=block_h, BLOCK_T=block_t, HEAD_DIM=D, BLOCK_D=block_d,
        )  # fmt: skip
