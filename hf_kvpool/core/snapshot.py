"""Pool snapshots in safetensors, no pickle: what ``pool.save(path)`` writes and ``KVPool.load`` reads.

A snapshot holds the stored blocks, parents before children:

- tensors ``group{i}`` (``[n, n_layers, 2, H, bs, D]`` per storage group), ``keys`` (``uint8 [n, 16]``),
  ``parents`` (``int64 [n]``, index of the parent in the snapshot or -1), ``tokens`` (``int64 [n, bs]``);
- metadata: format and version, block size, hash scheme, per-layer layout, storage groups, the
  namespaces (model fingerprint and salt) the blocks belong to, and an xxh3-128 checksum over every
  tensor's bytes.

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

from .block_manager import Block
from .block_store import LayerSpec
from .hashing import HASH_SCHEME

__all__ = ["Snapshot", "SnapshotError", "read", "write"]

FORMAT = "hf-kvpool-snapshot"
VERSION = 1


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded: wrong format, version, scheme or model, or damaged."""


@dataclass
class Snapshot:
    """What a snapshot file holds (see module docstring)."""

    block_size: int
    specs: list[LayerSpec]
    groups: list[list[int]]  # layer indices per storage group
    namespaces: dict[bytes, dict]
    keys: list[bytes]
    tokens: list[bytes]
    parents: list[int]
    data: list[torch.Tensor]  # per storage group [n, n_layers, 2, H, bs, D]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write(
    path: str | os.PathLike,
    blocks: list[Block],
    data: list[torch.Tensor],
    *,
    block_size: int,
    specs: list[LayerSpec],
    groups: list[list[int]],
    namespaces: dict[bytes, dict],
) -> int:
    """Write ``blocks`` (parents before children) and their ``data`` to ``path`` atomically; returns
    the number of blocks written."""
    from safetensors.torch import save_file

    order = {b.block_id: i for i, b in enumerate(blocks)}
    tensors = {f"group{i}": d for i, d in enumerate(data)}
    tensors["keys"] = torch.tensor(
        np.frombuffer(b"".join(b.key for b in blocks), dtype=np.uint8).reshape(-1, 16)
    )
    tensors["parents"] = torch.tensor(
        [-1 if b.parent is None else order[b.parent] for b in blocks], dtype=torch.int64
    )
    tokens = np.frombuffer(b"".join(b.tokens for b in blocks), dtype="<i8").reshape(-1, block_size)
    tensors["tokens"] = torch.from_numpy(tokens.copy())
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "block_size": str(block_size),
        "hash_scheme": HASH_SCHEME,
        "layout": json.dumps(
            [[str(s.device), str(s.dtype).removeprefix("torch."), s.kv_heads, s.head_dim] for s in specs]
        ),
        "groups": json.dumps(groups),
        "namespaces": json.dumps({ns.hex(): info for ns, info in namespaces.items()}),
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
    return len(blocks)


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
        LayerSpec(torch.device(device or dev), getattr(torch, dtype), heads, dim)
        for dev, dtype, heads, dim in json.loads(meta["layout"])
    ]
    groups = json.loads(meta["groups"])
    keys = tensors["keys"].numpy()
    tokens = tensors["tokens"].numpy().astype("<i8")
    return Snapshot(
        block_size=int(meta["block_size"]),
        specs=specs,
        groups=groups,
        namespaces={bytes.fromhex(k): v for k, v in json.loads(meta["namespaces"]).items()},
        keys=[k.tobytes() for k in keys],
        tokens=[t.tobytes() for t in tokens],
        parents=tensors["parents"].tolist(),
        data=[tensors[f"group{i}"] for i in range(len(groups))],
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
    for field in ("block_size", "layout", "groups", "namespaces", "checksum"):
        if field not in meta:
            raise SnapshotError(f"{path} lacks {field!r} in its metadata")
