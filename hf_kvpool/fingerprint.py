"""A model's fingerprint: a digest of its class, config and weights.

K/V computed by one model (or one set of weights) must never be served to another, so every
pool key lives in a namespace derived from this digest. It is

- the same in two processes that load the same weights (a content hash, no ids or addresses),
- cheap per call: the full pass over the weights runs once, and again only when a tensor's
  version counter or storage changed (``optimizer.step()``, ``load_state_dict()``, ``p.copy_()``
  under ``no_grad`` all bump version counters),
- blind to in-place writes through ``p.data`` (they bypass version counters): after such a write
  call :func:`hf_kvpool.weights_changed`.

Weights that accelerate offloaded (parameters on the ``meta`` device) are read from the hook's
``weights_map``.
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import torch
import xxhash

__all__ = ["ModelFingerprint"]

_CHUNK = 1 << 24  # elements per device-side checksum chunk


def _tensor_digest(t: torch.Tensor) -> bytes:
    """Content digest of one tensor: raw bytes on CPU, exact integer checksums on accelerators."""
    t = t.detach()
    if t.device.type == "cpu":
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        return xxhash.xxh3_128_digest(memoryview(raw))
    # Accelerators: integer sums of the raw bits (order-independent, so exact and reproducible),
    # one plain and one position-weighted, chunk by chunk to bound the temporary memory.
    width = t.element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    flat = t.contiguous().reshape(-1).view(int_dtype)
    sums = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.int64)
        pos = torch.arange(start + 1, start + 1 + part.numel(), device=t.device, dtype=torch.int64)
        sums[0] += part.sum()
        sums[1] += (part * pos).sum()
    return np.asarray(sums.cpu()).astype("<i8").tobytes()


def _offloaded_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Values of parameters that accelerate keeps off the module (``meta`` placeholders)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is None:
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.device.type == "meta":
                try:
                    found[f"{prefix}.{name}" if prefix else name] = weights_map[name]
                except KeyError:
                    pass
    return found


class ModelFingerprint:
    """Digest of ``model`` (class, config, attention implementation, every parameter and buffer)."""

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)
        self._lock = threading.Lock()
        self._versions: tuple | None = None
        self._digest: bytes | None = None

    def _version_key(self, model: torch.nn.Module) -> tuple:
        return tuple(
            (t._version, t.data_ptr(), t.device.type) for t in (*model.parameters(), *model.buffers())
        )

    def digest(self) -> bytes:
        """The current digest (16 bytes); recomputed only when a weight changed."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this fingerprint was garbage-collected")
        key = self._version_key(model)
        with self._lock:
            if key != self._versions:
                self._digest = self._compute(model)
                self._versions = key
            return self._digest

    def invalidate(self) -> None:
        """Force a full recomputation on the next :meth:`digest` (after writes through ``.data``)."""
        with self._lock:
            self._versions = None

    @staticmethod
    def _compute(model: torch.nn.Module) -> bytes:
        h = xxhash.xxh3_128()
        config = getattr(model, "config", None)
        h.update(type(model).__qualname__.encode())
        if config is not None:
            fields = config.to_dict()
            for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
                fields.pop(volatile, None)
            h.update(json.dumps(fields, sort_keys=True, default=str).encode())
            h.update(str(getattr(config, "_attn_implementation", None)).encode())
        offloaded = _offloaded_weights(model)
        named = [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        for name, t in sorted(named, key=lambda item: item[0]):
            if t.device.type == "meta":
                t = offloaded.get(name, t)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.device.type != "meta" and t.numel():
                h.update(_tensor_digest(t))
        return h.digest()
