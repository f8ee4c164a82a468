"""Pool snapshots: ``pool.save(path)`` and ``KVPool.load(path)`` in safetensors, no pickle.

A snapshot holds the stored blocks, parents before children:

- tensors ``group{i}`` (``[n, n_layers, 2, H, bs, D]`` per storage group), ``keys`` (``uint8 [n, 16]``),
  ``parents`` (``int64 [n]``, index of the parent in the snapshot or -1), ``tokens`` (``int64 [n, bs]``);
- metadata: format and version, block size, hash scheme, per-layer layout, the namespaces (model
  fingerprint and salt) the blocks belong to, and an xxh3-128 checksum over every tensor's bytes.

A save writes a temporary file beside the target and renames it (atomic on POSIX), so a crash
mid-save leaves the previous snapshot intact. A load checks format, version, scheme, checksum and
(given a model) the model fingerprint, and refuses anything else with a clear error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from .block_store import LayerSpec
from .hashing import HASH_SCHEME

if TYPE_CHECKING:
    from .pool import KVPool

__all__ = ["save", "load", "SnapshotError"]

FORMAT = "hf-kvpool-snapshot"
VERSION = 1


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded: wrong format, version, scheme or model, or damaged."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(pool: KVPool, path: str | os.PathLike) -> int:
    """Write ``pool``'s blocks to ``path`` atomically; returns the number of blocks saved."""
    from safetensors.torch import save_file

    with pool.lock:
        store, manager = pool._store, pool._manager
        if store is None:
            raise SnapshotError("this pool holds nothing yet (no generate() has filled it); nothing to save")
        blocks = manager.blocks()
        # parents before children: sort by depth
        depth: dict[int, int] = {}
        for blk in blocks:
            chain, node = [], blk
            while node.block_id not in depth and node.parent is not None:
                chain.append(node)
                node = manager.block(node.parent)
            d = depth.get(node.block_id, 0)
            depth.setdefault(node.block_id, d)
            for n in reversed(chain):
                d += 1
                depth[n.block_id] = d
        blocks.sort(key=lambda b: depth[b.block_id])
        order = {b.block_id: i for i, b in enumerate(blocks)}
        ids = torch.tensor([b.block_id for b in blocks], dtype=torch.int64)
        tensors = {
            f"group{i}": g.data.index_select(0, ids.to(g.data.device)).cpu()
            for i, g in enumerate(store.groups)
        }
        tensors["keys"] = torch.tensor(
            np.frombuffer(b"".join(b.key for b in blocks), dtype=np.uint8).reshape(-1, 16)
        )
        tensors["parents"] = torch.tensor(
            [-1 if b.parent is None else order[b.parent] for b in blocks], dtype=torch.int64
        )
        tokens = np.frombuffer(b"".join(b.tokens for b in blocks), dtype="<i8").reshape(-1, pool.block_size)
        tensors["tokens"] = torch.from_numpy(tokens.copy())
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "block_size": str(pool.block_size),
            "hash_scheme": HASH_SCHEME,
            "layout": json.dumps(
                [
                    [str(s.device), str(s.dtype).removeprefix("torch."), s.kv_heads, s.head_dim]
                    for s in store.specs
                ]
            ),
            "groups": json.dumps([g.layers for g in store.groups]),
            "namespaces": json.dumps({ns.hex(): info for ns, info in pool.namespaces.items()}),
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


def load(
    path: str | os.PathLike, *, model: torch.nn.Module | None = None, device=None, **pool_kwargs
) -> KVPool:
    """A new :class:`KVPool` holding the blocks saved in ``path``.

    Args:
        model: if given, the snapshot must hold blocks of this model (same fingerprint: class,
            config and weights), else :class:`SnapshotError`.
        device: put every layer's storage there (default: where it was saved).
        pool_kwargs: passed to :class:`KVPool` (``capacity_bytes``, ``backend``...); a capacity too
            small for every saved block is an error.
    """
    from safetensors import SafetensorError, safe_open

    from .pool import KVPool

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
    namespaces = {bytes.fromhex(k): v for k, v in json.loads(meta["namespaces"]).items()}
    if model is not None:
        from .integration import enable, model_state

        fingerprint = model_state(enable(model)).fingerprint.digest().hex()
        if fingerprint not in {info["model"] for info in namespaces.values()}:
            raise SnapshotError(
                f"{path} was saved for another model (or other weights): its blocks would never match "
                "this model. Load a snapshot made with this model, or start from an empty pool"
            )
    block_size = int(meta["block_size"])
    specs = [
        LayerSpec(torch.device(device or dev), getattr(torch, dtype), heads, dim)
        for dev, dtype, heads, dim in json.loads(meta["layout"])
    ]
    n = tensors["keys"].shape[0]
    pool = KVPool(block_size=block_size, **pool_kwargs)
    with pool.lock:
        store = pool._ensure_store(specs)
        if store.num_blocks < n:
            raise SnapshotError(
                f"{path} holds {n} blocks but the pool has room for {store.num_blocks}; pass a larger capacity_bytes"
            )
        if [g.layers for g in store.groups] != json.loads(meta["groups"]):
            raise SnapshotError(f"{path}: storage groups differ from this pool's layout")
        keys = tensors["keys"].numpy()
        tokens = tensors["tokens"].numpy().astype("<i8")
        parents = tensors["parents"].tolist()
        ids: list[int] = []
        for i in range(n):
            parent = None if parents[i] < 0 else ids[parents[i]]
            ids.append(pool._manager.restore(keys[i].tobytes(), tokens[i].tobytes(), parent))
        index = torch.tensor(ids, dtype=torch.int64)
        for g_i, g in enumerate(store.groups):
            g.data.index_copy_(0, index.to(g.data.device), tensors[f"group{g_i}"].to(g.data.device))
        pool.namespaces.update(namespaces)
    return pool


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
