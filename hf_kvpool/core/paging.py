"""Torch reference for the two data moves of the pool: paged gather and paged scatter.

Storage layout (one tensor per group of streams that share device, dtype, heads and head_dim):

    storage: [num_blocks, n_layers, P, kv_heads, block_size, head_dim]   (P fields per layer)

The pool uses P = 1, one "layer" per stream (``block_store.py``); P = 2 is a layer's K and V. A
block of every stream of a group is one contiguous chunk. These functions are the CPU
path and the reference the Triton kernels (``hf_kvpool.triton_kernels``, a separate package imported
only when asked for) are tested against; ``gather`` / ``scatter`` pick the backend.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["gather", "scatter", "torch_gather", "torch_scatter"]


def _runs(rows: list[int], cols: list[int], ntok: list[int], bs: int) -> list[tuple[int, int, int, int, int]]:
    """Split entries into runs ``(i0, i1, row, col0, tokens)``: consecutive entries of one row whose
    columns follow each other block after block (how the pool lays rows out), so that a run moves
    with one ``index_select`` and one strided copy."""
    runs = []
    i0 = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i0] or cols[i] != cols[i - 1] + bs or ntok[i - 1] != bs:
            runs.append((i0, i, rows[i0], cols[i0], sum(ntok[i0:i])))
            i0 = i
    return runs


def _run_bounds(rows: np.ndarray, cols: np.ndarray, ntok: np.ndarray, bs: int) -> np.ndarray:
    """Start indices of the runs of :func:`_runs` (plus ``len(rows)``), found with array operations:
    a run breaks where the row changes, the columns do not follow block after block, or the entry
    before was a partial block."""
    n = len(rows)
    breaks = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + bs) | (ntok[:-1] != bs)
    return np.concatenate([[0], np.flatnonzero(breaks) + 1, [n]])


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """Float8 as int8 (CPU indexing kernels lack it); other dtypes unchanged."""
    return t.view(torch.int8) if t.element_size() == 1 and t.is_floating_point() else t


def torch_gather(
    storage: torch.Tensor,
    block_ids: torch.Tensor,
    rows: torch.Tensor,
    dst_cols: torch.Tensor,
    ntok: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Copy blocks into contiguous per-layer K/V.

    For every entry ``i`` and token ``t < ntok[i]``::

        out[:, :, rows[i], :, dst_cols[i] + t, :] = storage[block_ids[i], :, :, :, t, :]

    Args:
        storage: ``[N, L, P, H, bs, D]``.
        block_ids, rows, dst_cols, ntok: int64 ``[n]`` on ``storage.device``; ``1 <= ntok <= bs``.
        out: ``[L, P, B, H, T, D]``, same dtype/device as ``storage``; columns not written keep
            their value (callers pass zeros).
    Returns:
        ``out``.

    A run of full blocks that land one after another in a row (a pooled prefix: the usual case) is
    one ``index_select`` straight into ``out`` (a strided view of it: no temporary); a partial block
    is one copy. The number of Python-level operations is per run, not per block.
    """
    if block_ids.numel() == 0:
        return out
    n_blocks, n_layers, n_fields, heads, bs, dim = storage.shape
    ids_n, rows_n, cols_n, ntok_n = (x.cpu().numpy() for x in (block_ids, rows, dst_cols, ntok))
    if ntok_n.max() > bs or ntok_n.min() < 1:
        raise ValueError(f"ntok must be in [1, {bs}]")
    result = out
    storage, out = _as_bits(storage), _as_bits(out)
    # one block of one (layer, field, head) is bs * dim contiguous elements in storage and in out
    vectorized = storage.stride(5) == 1 and storage.stride(4) == dim and out.stride(5) == 1
    vectorized = vectorized and out.stride(4) == dim
    src = storage.view(n_blocks, n_layers, n_fields, heads, bs * dim) if vectorized else None
    bounds = _run_bounds(rows_n, cols_n, ntok_n, bs)
    for i0, i1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        row, col = int(rows_n[i0]), int(cols_n[i0])
        full = i1 - i0 - (1 if ntok_n[i1 - 1] != bs else 0)
        if vectorized and full > 1:
            # out[:, :, row, :, col + j*bs : col + (j+1)*bs] for every j, as [full, L, P, H, bs*D]
            dst = out.as_strided(
                (full, n_layers, n_fields, heads, bs * dim),
                (bs * dim, out.stride(0), out.stride(1), out.stride(3), 1),
                out.storage_offset() + row * out.stride(2) + col * out.stride(4),
            )
            torch.index_select(src, 0, block_ids[i0 : i0 + full], out=dst)
            done = i0 + full
        else:
            done = i0
        # one strided copy per block left (partial blocks; layouts the view above cannot take)
        for i in range(done, i1):
            n, c = int(ntok_n[i]), int(cols_n[i])
            out[:, :, row, :, c : c + n].copy_(storage[int(ids_n[i]), :, :, :, :n])
    return result


def torch_scatter(
    storage: torch.Tensor,
    srcs: list[tuple[torch.Tensor, ...]],
    block_ids: torch.Tensor,
    rows: torch.Tensor,
    src_cols: torch.Tensor,
) -> None:
    """Copy full blocks of tokens from per-layer tensors into storage.

    For every entry ``i``, layer ``l`` and field ``p``::

        storage[block_ids[i], l, p] = srcs[l][p][rows[i], :, src_cols[i] : src_cols[i] + bs, :]

    Args:
        storage: ``[N, L, P, H, bs, D]``.
        srcs: ``L`` tuples of ``P`` tensors (e.g. ``(k, v)``), each ``[B, H, S, D]`` with any strides,
            dtype of ``storage``.
        block_ids, rows, src_cols: int64 ``[n]`` on ``storage.device``.
    """
    if block_ids.numel() == 0:
        return
    if storage.element_size() == 1 and storage.is_floating_point():  # fp8: index_copy_ lacks it on CPU
        storage = storage.view(torch.int8)
        srcs = [tuple(t.view(torch.int8) for t in fields) for fields in srcs]  # P fields, any P
    bs = storage.shape[4]
    full = [bs] * block_ids.numel()
    ids_l = block_ids.tolist()
    for i0, i1, row, col0, count in _runs(rows.tolist(), src_cols.tolist(), full, bs):
        n = i1 - i0
        # consecutive block ids (the usual case on a pool with free room): one strided copy into a
        # slice, no temporary; otherwise index_copy_ from a reshaped copy
        contiguous_ids = ids_l[i1 - 1] - ids_l[i0] == n - 1 and ids_l[i0:i1] == list(
            range(ids_l[i0], ids_l[i1 - 1] + 1)
        )
        for layer, pair in enumerate(srcs):
            for kv, src in enumerate(pair):
                tokens = (
                    src[row, :, col0 : col0 + count].unflatten(1, (n, bs)).transpose(0, 1)
                )  # [n, H, bs, D]
                if contiguous_ids:
                    storage[ids_l[i0] : ids_l[i0] + n, layer, kv].copy_(tokens)
                else:
                    storage[:, layer, kv].index_copy_(0, block_ids[i0:i1], tokens)


def gather(backend: str, *args, **kwargs) -> torch.Tensor:
    """Dispatch :func:`torch_gather` or the Triton gather by ``backend`` ("torch" / "triton")."""
    if backend == "triton":
        from hf_kvpool.triton_kernels import paged_gather

        return paged_gather(*args, **kwargs)
    return torch_gather(*args, **kwargs)


def scatter(backend: str, *args, **kwargs) -> None:
    """Dispatch :func:`torch_scatter` or the Triton scatter by ``backend`` ("torch" / "triton")."""
    if backend == "triton":
        from hf_kvpool.triton_kernels import paged_scatter

        return paged_scatter(*args, **kwargs)
    return torch_scatter(*args, **kwargs)
