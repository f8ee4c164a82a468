"""Torch reference for the two data moves of the pool: paged gather and paged scatter.

Storage layout (one tensor per group of streams that share device, dtype, heads and head_dim):

    storage: [num_blocks, n_layers, P, kv_heads, block_size, head_dim]   (P fields per layer)

The pool uses P = 1, one "layer" per stream (``block_store.py``); P = 2 is a layer's K and V. A
block of every stream of a group is one contiguous chunk. These functions are the CPU
path and the reference the Triton kernels (``hf_kvpool.triton_kernels``, a separate package imported
only when asked for) are tested against; ``gather`` / ``scatter`` pick the backend.
"""

from __future__ import annotations

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
    """
    if block_ids.numel() == 0:
        return out
    n_blocks, n_layers, _, heads, bs, dim = storage.shape
    ntok_l = ntok.tolist()
    if max(ntok_l) > bs or min(ntok_l) < 1:
        raise ValueError(f"ntok must be in [1, {bs}]")
    # one strided copy per block, straight into ``out`` (no temporary: large fresh buffers cost
    # page faults on CPU that exceed the copy itself)
    for bid, row, col, n in zip(block_ids.tolist(), rows.tolist(), dst_cols.tolist(), ntok_l):
        out[:, :, row, :, col : col + n].copy_(storage[bid, :, :, :, :n])
    return out


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
