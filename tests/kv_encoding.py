"""K/V whose every value names what it is: (namespace, token id, position, layer, K or V, head, dim).

Used to check at the KVPool level (real tensors, BlockStore, torch backend) that a hit returns the
K/V of exactly the tokens asked for, at their positions, for every layer, and nothing else.
Values are integers below 2**24, exact in float32.
"""

from __future__ import annotations

import torch

from hf_kvpool.core.hashing import block_hashes, namespace_key

# three layers in two storage groups: (kv_heads, head_dim)
LAYERS = [(2, 4), (2, 4), (1, 8)]
ALPHABET = 4  # token ids 0..3
MAX_POS = 64
NAMESPACES = [namespace_key("model", b""), namespace_key("model", "tenant-b")]
PAD_VALUE = -7.0  # what pad columns hold in the K/V handed to commit()


def encode(ns: int, token: torch.Tensor, pos: torch.Tensor, layer: int, kv: int, heads: int, dim: int):
    """``[n, heads, dim]`` values for tokens ``token`` at positions ``pos`` (each ``[n]``)."""
    tok = (ns * ALPHABET + token) * MAX_POS + pos  # [n]
    h = torch.arange(heads)[None, :, None]
    d = torch.arange(dim)[None, None, :]
    base = ((tok[:, None, None] * len(LAYERS) + layer) * 2 + kv) * 2
    return ((base + h) * 8 + d + 1).to(torch.float32)  # >= 1: never mistaken for a zero pad column


def batch_kv(ns: int, rows: list[list[int]], pads: list[int]) -> list[torch.Tensor]:
    """The streams a pool commits: per layer K then V, each ``[B, H, S, D]``; row ``b`` is ``pads[b]``
    pad columns, then its tokens."""
    cols = max(p + len(r) for p, r in zip(pads, rows))
    out = []
    for layer, (heads, dim) in enumerate(LAYERS):
        pair = []
        for kv in (0, 1):
            t = torch.full((len(rows), heads, cols, dim), PAD_VALUE)
            for b, (row, pad) in enumerate(zip(rows, pads)):
                if row:
                    tok = torch.tensor(row)
                    vals = encode(ns, tok, torch.arange(len(row)), layer, kv, heads, dim)  # [n, H, D]
                    t[b, :, pad : pad + len(row)] = vals.transpose(0, 1)
            pair.append(t)
        out.extend(pair)
    return out


def chain(ns: int, tokens: list[int], block_size: int):
    return block_hashes(tokens, block_size, NAMESPACES[ns])


def block_bytes(block_size: int) -> int:
    return sum(2 * h * block_size * d * 4 for h, d in LAYERS)


def check_fetched(fetched, ns_of_row: list[int], rows: list[list[int]], pads: list[int]) -> None:
    """Column ``c`` of row ``b`` holds token ``c - pads[b]`` of that row at that position; pads are zero."""
    for layer, (heads, dim) in enumerate(LAYERS):
        for kv in (0, 1):
            got = fetched.streams[2 * layer + kv]
            assert got.shape == (len(rows), heads, fetched.columns, dim)
            for b, (row, pad) in enumerate(zip(rows, pads)):
                n = max(0, fetched.columns - pad)
                if pad:
                    assert torch.count_nonzero(got[b, :, : min(pad, fetched.columns)]) == 0
                if n:
                    want = encode(ns_of_row[b], torch.tensor(row[:n]), torch.arange(n), layer, kv, heads, dim)
                    assert torch.equal(got[b, :, pad:], want.transpose(0, 1)), (layer, kv, b)
