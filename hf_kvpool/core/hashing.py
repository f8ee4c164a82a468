"""Chained block hashes over token ids.

A block's key is ``xxh3_128(parent_key || namespace || token_ids as little-endian int64)``. The
parent of the first block is the all-zero key, so a key identifies the whole prefix up to and
including its block, within one namespace. Keys are 16 ``bytes``; they are an index only: the
pool compares the stored token ids and parent on every hit, so a collision never serves wrong K/V.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

__all__ = [
    "ROOT",
    "HASH_SCHEME",
    "Chain",
    "as_token_bytes",
    "block_hashes",
    "chain_hash",
    "extend_chain",
    "namespace_key",
]

ROOT = bytes(16)
HASH_SCHEME = "xxh3_128(parent|namespace|int64le tokens)"

Chain = list[tuple[bytes, bytes]]  # per full block, in order: (key, token ids as int64le bytes)


def namespace_key(*parts: str | bytes) -> bytes:
    """A 16-byte namespace from its parts (model fingerprint, salt...), each length-prefixed."""
    h = xxhash.xxh3_128()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def chain_hash(parent: bytes, namespace: bytes, tokens: bytes) -> bytes:
    """Key of one block: ``tokens`` are the block's ids as little-endian int64 bytes."""
    return xxhash.xxh3_128_digest(parent + namespace + tokens)


def as_token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian int64 bytes (the form keys and stored tokens use)."""
    return np.ascontiguousarray(token_ids, dtype="<i8").tobytes()


def block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, namespace: bytes, parent: bytes = ROOT
) -> Chain:
    """Keys of every *full* block of ``token_ids``, chained from ``parent``.

    Returns ``[(key, token_bytes), ...]``, one pair per full block, in order.
    """
    data = as_token_bytes(token_ids)
    width = 8 * block_size
    out = []
    for start in range(0, len(data) - width + 1, width):
        chunk = data[start : start + width]
        parent = chain_hash(parent, namespace, chunk)
        out.append((parent, chunk))
    return out


def extend_chain(
    chain: Chain, token_ids: Sequence[int] | np.ndarray, block_size: int, namespace: bytes
) -> None:
    """Append to ``chain`` (the blocks of a prefix of ``token_ids``) the keys of the full blocks of
    ``token_ids`` it lacks."""
    done = len(chain) * block_size
    parent = chain[-1][0] if chain else ROOT
    chain.extend(block_hashes(token_ids[done:], block_size, namespace, parent))
