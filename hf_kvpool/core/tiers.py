"""Lower tiers of the pool: host memory and Redis.

The device pool (``pool.py``) is the first tier. A block it evicts moves to the host tier instead
of being dropped; with a Redis tier, every committed block is also written to Redis (so other
processes can read it), and Redis does its own eviction (``maxmemory-policy allkeys-lru``).
A lookup that misses on the device continues the chain in the host tier, then in Redis
(:meth:`Tiers.find`); the pool copies the blocks found back into device blocks and serves them.
:class:`Tiers` is that policy; its lookups and writes run outside the pool's lock (Redis is a
network call), so a slow Redis never holds up other threads' use of the pool.

An entry carries its key, its parent's key and its token ids, so a reader verifies a hit exactly as
the device tier does (no reuse on a collision). A Redis value is a small binary header (magic,
JSON with key, parent, tokens, shapes and dtypes) followed by the raw bytes of the block (and of its
checkpoint, when it carries one); anything that does
not verify is a miss, never wrong K/V. Redis errors and timeouts switch the tier off for a few
seconds; generation goes on without it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .hashing import Chain

__all__ = ["TierEntry", "HostTier", "RedisTier", "Tiers", "encode_entry", "decode_entry"]

_MAGIC = b"HFKVBLK1"


@dataclass
class TierEntry:
    key: bytes
    parent: bytes | None  # None for the first block of a chain
    tokens: bytes
    payload: list[torch.Tensor]  # per storage group: [n_streams, 1, H, bs, D] in host memory
    checkpoint: list[torch.Tensor] | None = None  # the state at the end of the block, if kept

    @property
    def nbytes(self) -> int:
        tensors = [*self.payload, *(self.checkpoint or ())]
        return sum(t.numel() * t.element_size() for t in tensors) + len(self.tokens) + 32


class HostTier:
    """A bounded LRU map of blocks in host memory (pinned when the device pool is on CUDA)."""

    def __init__(self, capacity_bytes: int):
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) or capacity_bytes < 1:
            raise ValueError(f"host_capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, TierEntry] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()  # puts come under the pool's lock, gets outside it

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def put(self, entry: TierEntry) -> None:
        if entry.nbytes > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(entry.key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            while self._entries and self._nbytes + entry.nbytes > self.capacity_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._nbytes -= dropped.nbytes
            self._entries[entry.key] = entry
            self._nbytes += entry.nbytes

    def get(self, key: bytes) -> TierEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0


Shapes = list[tuple[list[int], torch.dtype]]


def encode_entry(entry: TierEntry) -> bytes:
    """Header (magic, length, JSON) + raw bytes of every payload tensor, then the checkpoint's."""
    tensors = [*entry.payload, *(entry.checkpoint or ())]
    header = {
        "key": entry.key.hex(),
        "parent": None if entry.parent is None else entry.parent.hex(),
        "tokens": entry.tokens.hex(),
        "tensors": [[list(t.shape), str(t.dtype)] for t in entry.payload],
        "checkpoint": None
        if entry.checkpoint is None
        else [[list(t.shape), str(t.dtype)] for t in entry.checkpoint],
    }
    head = json.dumps(header).encode()
    parts = [_MAGIC, len(head).to_bytes(4, "little"), head]
    for t in tensors:
        parts.append(t.contiguous().view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def decode_entry(data: bytes, key: bytes, shapes: Shapes, state_shapes: Shapes = ()) -> TierEntry | None:
    """The entry in ``data`` if it is well-formed, for ``key``, of the expected block ``shapes`` and
    (if it carries a checkpoint) checkpoint ``state_shapes``; else None."""
    try:
        if not data.startswith(_MAGIC):
            return None
        n = int.from_bytes(data[8:12], "little")
        header = json.loads(data[12 : 12 + n])
        if header["key"] != key.hex():
            return None
        if header["tensors"] != [[list(shape), str(dtype)] for shape, dtype in shapes]:
            return None
        has_checkpoint = header.get("checkpoint") is not None
        if has_checkpoint and header["checkpoint"] != [
            [list(shape), str(dtype)] for shape, dtype in state_shapes
        ]:
            return None
        offset = 12 + n
        tensors = []
        for shape, dtype in [*shapes, *(state_shapes if has_checkpoint else ())]:
            size = (
                torch.empty(shape, dtype=dtype, device="meta").numel()
                * torch.empty((), dtype=dtype).element_size()
            )
            chunk = data[offset : offset + size]
            if len(chunk) != size:
                return None
            tensors.append(torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(dtype).reshape(shape))
            offset += size
        if offset != len(data):
            return None
        parent = header["parent"]
        return TierEntry(
            key,
            None if parent is None else bytes.fromhex(parent),
            bytes.fromhex(header["tokens"]),
            tensors[: len(shapes)],
            tensors[len(shapes) :] if has_checkpoint else None,
        )
    except (ValueError, KeyError, TypeError, RuntimeError):
        return None


class RedisTier:
    """Blocks in Redis, keyed ``hfkv:<namespace>:<chain key>``; shared by every process on that Redis.

    Args:
        url: ``redis://host:port/db``.
        timeout: seconds for connecting and for each command; past it the tier is skipped.
        retry_after: seconds the tier stays off after an error.
    """

    def __init__(self, url: str, timeout: float = 0.25, retry_after: float = 5.0):
        try:
            import redis
        except ImportError as exc:
            raise ImportError(
                "KVPool(remote='redis://...') needs the redis package: pip install redis"
            ) from exc
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors_type = (redis.RedisError, OSError)
        self.retry_after = retry_after
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.errors = 0

    @staticmethod
    def redis_key(namespace: bytes, key: bytes) -> str:
        return f"hfkv:{namespace.hex()}:{key.hex()}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            self._down_until = time.monotonic() + self.retry_after

    def put_many(self, namespace: bytes, entries: list[TierEntry]) -> bool:
        if not entries or not self.available:
            return False
        try:
            pipe = self._client.pipeline(transaction=False)
            for e in entries:
                pipe.set(self.redis_key(namespace, e.key), encode_entry(e))
            pipe.execute()
            return True
        except self._errors_type as exc:
            self._failed(exc)
            return False

    def get_many(
        self, namespace: bytes, keys: list[bytes], shapes: Shapes, state_shapes: Shapes = ()
    ) -> list[TierEntry | None]:
        if not keys or not self.available:
            return [None] * len(keys)
        try:
            values = self._client.mget([self.redis_key(namespace, k) for k in keys])
        except self._errors_type as exc:
            self._failed(exc)
            return [None] * len(keys)
        return [None if v is None else decode_entry(v, k, shapes, state_shapes) for k, v in zip(keys, values)]


class Tiers:
    """The tiers below the device pool and how blocks move between them.

    - :meth:`spill`: a block the device pool evicts goes to the host tier;
    - :meth:`find`: a device match that stops short continues in the host tier, then in Redis;
    - :meth:`write_through`: committed blocks go to Redis for other processes.

    Every entry found is verified (key, parent's key, token ids), so a hit is exactly as safe as a
    device hit. ``host_hits`` / ``remote_hits`` count blocks the pool took from each tier.
    """

    def __init__(self, host: HostTier | None, remote: RedisTier | None):
        self.host = host
        self.remote = remote
        self.host_hits = 0
        self.remote_hits = 0

    def spill(self, entry: TierEntry) -> None:
        if self.host is not None:
            self.host.put(entry)

    def find(
        self, chain: Chain, start: int, namespace: bytes, shapes: Shapes, state_shapes: Shapes = ()
    ) -> list[tuple[TierEntry, str]]:
        """Entries continuing ``chain`` at block ``start`` (verified), each with its tier's name."""
        found: list[tuple[TierEntry, str]] = []
        parent = chain[start - 1][0] if start else None
        j = start
        if self.host is not None:
            while j < len(chain):
                e = self.host.get(chain[j][0])
                if e is None or e.tokens != chain[j][1] or e.parent != parent:
                    break
                found.append((e, "host"))
                parent, j = e.key, j + 1
        if self.remote is not None and j < len(chain):
            keys = [key for key, _ in chain[j:]]
            for e, (key, tokens) in zip(
                self.remote.get_many(namespace, keys, shapes, state_shapes), chain[j:]
            ):
                if e is None or e.tokens != tokens or e.parent != parent:
                    break
                found.append((e, "remote"))
                parent = key
        return found

    def count_hits(self, tiers: list[str]) -> None:
        self.host_hits += tiers.count("host")
        self.remote_hits += tiers.count("remote")

    def write_through(self, namespace: bytes, entries: list[TierEntry]) -> None:
        if self.remote is not None and entries:
            self.remote.put_many(namespace, entries)

    def clear(self) -> None:
        self.host_hits = self.remote_hits = 0
        if self.host is not None:
            self.host.clear()
