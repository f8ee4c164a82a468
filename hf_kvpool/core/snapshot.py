"""Pool snapshots in safetensors, no pickle: what ``pool.save(path)`` writes and ``KVPool.load`` reads.

A snapshot holds the stored blocks, parents before children, and their checkpoints:

- tensors ``group{i}`` (``[n, n_streams, 1, H, bs, D]`` per storage group), ``keys`` (``uint8 [n, 16]``),
  ``parents`` (``int64 [n]``, index of the parent in the snapshot or -1), ``tokens`` (``int64 [n, bs]``),
  ``state{j}`` (``[m, ...]`` per checkpoint tensor) and ``state_blocks`` (``int64 [m]``: the block
  each checkpoint belongs to);
- metadata: format and version, block size, hash scheme, per-stream layout, checkpoint layout,
  storage groups, the namespaces (model fingerprint and salt) the blocks belong to, and an xxh3-128
  checksum over every tensor's bytes.

A save writes a temporary file beside the target and renames it (atomic on POSIX), so a crash
mid-save leaves the previous snapshot intact. A read checks format, version, scheme and checksum and
refuses anything else with a clear error. This module knows files, not pools: ``pool.py`` hands it
what the pool exports and builds a pool from what it reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from .block_store import StateSpec, StreamSpec
from .hashing import HASH_SCHEME

__all__ = ["Snapshot", "SnapshotError", "read", "write"]

FORMAT = "hf-kvpool-snapshot"
VERSION = 2  # 2: streams instead of (K, V) pairs, checkpoints


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded: wrong format, version, scheme or model, or damaged."""


@dataclass
class Snapshot:
    """What a snapshot file holds (see module docstring)."""

    block_size: int
    specs: list[StreamSpec]
    states: list[StateSpec]
    groups: list[list[int]]  # stream indices per storage group
    namespaces: dict[bytes, dict]
    keys: list[bytes]
    tokens: list[bytes]
    parents: list[int]  # index of the parent block in this snapshot, or -1
    data: list[torch.Tensor]  # per storage group [n, n_streams, 1, H, bs, D]
    state_blocks: list[int]  # the blocks that carry a checkpoint
    state_data: list[torch.Tensor]  # per checkpoint tensor [len(state_blocks), ...]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write(path: str | os.PathLike, snap: Snapshot) -> int:
    """Write ``snap`` to ``path`` atomically; returns the number of blocks written."""
    from safetensors.torch import save_file

    tensors = {f"group{i}": d for i, d in enumerate(snap.data)}
    tensors["keys"] = torch.tensor(np.frombuffer(b"".join(snap.keys), dtype=np.uint8).reshape(-1, 16))
    tensors["parents"] = torch.tensor(snap.parents, dtype=torch.int64)
    tokens = np.frombuffer(b"".join(snap.tokens), dtype="<i8").reshape(-1, snap.block_size)
    tensors["tokens"] = torch.from_numpy(tokens.copy())
    tensors["state_blocks"] = torch.tensor(snap.state_blocks, dtype=torch.int64)
    tensors.update({f"state{j}": t.contiguous() for j, t in enumerate(snap.state_data)})
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "block_size": str(snap.block_size),
        "hash_scheme": HASH_SCHEME,
        "layout": json.dumps(
            [[str(s.device), _dtype_name(s.dtype), s.heads, s.dim, s.name] for s in snap.specs]
        ),
        "states": json.dumps(
            [[str(s.device), _dtype_name(s.dtype), list(s.shape), s.name] for s in snap.states]
        ),
        "groups": json.dumps(snap.groups),
        "namespaces": json.dumps({ns.hex(): info for ns, info in snap.namespaces.items()}),
        "checksum": _checksum(tensors),
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(snap.keys)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read(path: str | os.PathLike, device=None) -> Snapshot:
    """The snapshot at ``path``, checked; ``device`` moves every layer's layout there."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no snapshot at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            _check_meta(meta, path)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise SnapshotError(f"{path} is not a readable snapshot (truncated or corrupted?): {exc}") from exc
    if _checksum(tensors) != meta["checksum"]:
        raise SnapshotError(f"{path} is corrupted: its checksum does not match its data; do not use it")
    specs = [
        StreamSpec(torch.device(device or dev), getattr(torch, dtype), heads, dim, name)
        for dev, dtype, heads, dim, name in json.loads(meta["layout"])
    ]
    states = [
        StateSpec(torch.device(device or dev), getattr(torch, dtype), tuple(shape), name)
        for dev, dtype, shape, name in json.loads(meta["states"])
    ]
    groups = json.loads(meta["groups"])
    keys = tensors["keys"].numpy()
    tokens = tensors["tokens"].numpy().astype("<i8")
    return Snapshot(
        block_size=int(meta["block_size"]),
        specs=specs,
        states=states,
        groups=groups,
        namespaces={bytes.fromhex(k): v for k, v in json.loads(meta["namespaces"]).items()},
        keys=[k.tobytes() for k in keys],
        tokens=[t.tobytes() for t in tokens],
        parents=tensors["parents"].tolist(),
        data=[tensors[f"group{i}"] for i in range(len(groups))],
        state_blocks=tensors["state_blocks"].tolist(),
        state_data=[tensors[f"state{j}"] for j in range(len(states))],
    )


def _check_meta(meta: dict, path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not an hf-kvpool snapshot")
    if meta.get("version") != str(VERSION):
        raise SnapshotError(
            f"{path} is snapshot version {meta.get('version')}; this hf-kvpool reads version {VERSION}"
        )
    if meta.get("hash_scheme") != HASH_SCHEME:
        raise SnapshotError(
            f"{path} uses hash scheme {meta.get('hash_scheme')!r}, this hf-kvpool uses {HASH_SCHEME!r}: its keys would never match"
        )
    for field in ("block_size", "layout", "states", "groups", "namespaces", "checksum"):
        if field not in meta:
            raise SnapshotError(f"{path} lacks {field!r} in its metadata")
