"""Chained block hashes over token ids.

A block's key is ``xxh3_128(parent_key || namespace || token_ids as little-endian int64)``. The
parent of the first block is the all-zero key, so a key identifies the whole prefix up to and
including its block, within one namespace. Keys are 16 ``bytes``; they are an index only: the
pool compares the stored token ids and parent on every hit, so a collision never serves wrong K/V.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import xxhash

__all__ = [
    "ROOT",
    "HASH_SCHEME",
    "Chain",
    "ChainMemo",
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


class ChainMemo:
    """The chains of recent prompts, so that a prompt extending one (the next turn of an agent
    loop, a longer prompt of the same document) hashes only the blocks it adds.

    A hit is decided by comparing token ids (one vectorized compare per remembered prompt), never
    by a key alone, and within one namespace and block size only. Holds at most ``max_tokens``
    tokens' worth of chains, least recently used dropped first. Thread-safe.
    """

    def __init__(self, max_tokens: int = 1 << 20, max_entries: int = 8):
        self.max_tokens, self.max_entries = max_tokens, max_entries
        # (namespace, block_size) -> list of (tokens of the full blocks, chain), most recent last
        self._entries: list[tuple[bytes, int, np.ndarray, Chain]] = []
        self._lock = threading.Lock()

    def chain(self, token_ids: Sequence[int] | np.ndarray, block_size: int, namespace: bytes) -> Chain:
        """``block_hashes(token_ids, block_size, namespace)``, from a remembered prefix where one fits."""
        tokens = np.ascontiguousarray(token_ids, dtype=np.int64)
        full = len(tokens) // block_size * block_size
        with self._lock:
            best, best_blocks = None, 0
            for n in range(len(self._entries) - 1, -1, -1):  # most recent first
                ns, bs, held, _ = self._entries[n]
                if ns != namespace or bs != block_size:
                    continue
                blocks = _common_blocks(held, tokens[:full], bs)
                if blocks > best_blocks:
                    best, best_blocks = n, blocks
                if best_blocks * bs == full:
                    break  # no entry can do better
            chain = list(self._entries[best][3][:best_blocks]) if best is not None else []
        extend_chain(chain, tokens, block_size, namespace)
        if chain:
            self._remember(namespace, block_size, tokens[:full].copy(), chain, best, best_blocks)
        return chain

    def _remember(self, namespace, block_size, tokens, chain, best, best_blocks) -> None:
        with self._lock:
            # a prompt that extends a remembered one replaces it (its chain holds the other's)
            if best is not None and best < len(self._entries):
                ns, bs, held, _ = self._entries[best]
                if ns == namespace and bs == block_size and best_blocks * bs == len(held):
                    del self._entries[best]
            self._entries.append((namespace, block_size, tokens, list(chain)))
            total = sum(len(e[2]) for e in self._entries)
            while len(self._entries) > self.max_entries or (
                total > self.max_tokens and len(self._entries) > 1
            ):
                total -= len(self._entries.pop(0)[2])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _common_blocks(a: np.ndarray, b: np.ndarray, block_size: int) -> int:
    """Leading full blocks on which ``a`` and ``b`` (int64 token ids) agree."""
    n = min(len(a), len(b)) // block_size * block_size
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    same = n if len(differ) == 0 else int(differ[0])
    return same // block_size
