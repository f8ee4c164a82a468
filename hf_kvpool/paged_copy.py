"""Torch reference for the two data moves of the pool: paged gather and paged scatter.

Storage layout (one tensor per group of layers that share device, dtype, kv_heads and head_dim):

    storage: [num_blocks, n_layers, 2, kv_heads, block_size, head_dim]   (2 = K, V)

A block's K/V for every layer of the group is one contiguous chunk. These functions are the CPU
path and the reference the Triton kernels (``hf_kvpool.triton_kernels``) are tested against;
``gather`` / ``scatter`` pick the backend.
"""

from __future__ import annotations

import torch

__all__ = ["gather", "scatter", "torch_gather", "torch_scatter"]


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
        storage: ``[N, L, 2, H, bs, D]``.
        block_ids, rows, dst_cols, ntok: int64 ``[n]`` on ``storage.device``; ``1 <= ntok <= bs``.
        out: ``[L, 2, B, H, T, D]``, same dtype/device as ``storage``; columns not written keep
            their value (callers pass zeros).
    Returns:
        ``out``.
    """
    if block_ids.numel() == 0:
        return out
    bs = storage.shape[4]
    blocks = storage.index_select(0, block_ids)  # [n, L, 2, H, bs, D]
    entry = torch.repeat_interleave(torch.arange(block_ids.numel(), device=ntok.device), ntok)
    starts = torch.cumsum(ntok, 0) - ntok
    tok = torch.arange(entry.numel(), device=ntok.device) - starts[entry]  # token index inside its block
    assert int(tok.max()) < bs
    vals = blocks[entry, :, :, :, tok, :]  # [ntot, L, 2, H, D]
    out.permute(2, 4, 0, 1, 3, 5)[rows[entry], dst_cols[entry] + tok] = vals  # view [B, T, L, 2, H, D]
    return out


def torch_scatter(
    storage: torch.Tensor,
    srcs: list[tuple[torch.Tensor, torch.Tensor]],
    block_ids: torch.Tensor,
    rows: torch.Tensor,
    src_cols: torch.Tensor,
) -> None:
    """Copy full blocks of tokens from per-layer K/V into storage.

    For every entry ``i`` and layer ``l``::

        storage[block_ids[i], l, 0] = srcs[l][0][rows[i], :, src_cols[i] : src_cols[i] + bs, :]
        storage[block_ids[i], l, 1] = srcs[l][1][rows[i], :, src_cols[i] : src_cols[i] + bs, :]

    Args:
        storage: ``[N, L, 2, H, bs, D]``.
        srcs: ``L`` pairs ``(k, v)``, each ``[B, H, S, D]`` with any strides, dtype of ``storage``.
        block_ids, rows, src_cols: int64 ``[n]`` on ``storage.device``.
    """
    if block_ids.numel() == 0:
        return
    if storage.element_size() == 1 and storage.is_floating_point():  # fp8: index_copy_ lacks it on CPU
        storage = storage.view(torch.int8)
        srcs = [(k.view(torch.int8), v.view(torch.int8)) for k, v in srcs]
    bs = storage.shape[4]
    offs = torch.arange(bs, device=src_cols.device)
    cols = (src_cols[:, None] + offs[None, :]).reshape(-1)  # [n * bs]
    rows_t = rows.repeat_interleave(bs)
    n = block_ids.numel()
    for layer, pair in enumerate(srcs):
        for kv, src in enumerate(pair):
            # src.permute -> [B, S, H, D]; pick tokens -> [n*bs, H, D] -> [n, H, bs, D]
            tokens = src.permute(0, 2, 1, 3)[rows_t, cols]
            tokens = tokens.reshape(n, bs, *tokens.shape[1:]).transpose(1, 2)
            storage[:, layer, kv].index_copy_(0, block_ids, tokens)


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
