"""A model's fingerprint: a digest of everything that decides the K/V it computes.

K/V computed by one model (or one set of weights, adapters, switches) must never be served to
another, so every pool key lives in a namespace derived from this digest. It covers

- the class, the config (every field the attention can read: RoPE scaling, sliding windows, the
  attention implementation...) and the weights that take part in the forward, by content;
- PEFT adapters: which adapters are active on each adapter layer, whether adapters are disabled
  or merged, their scaling. Weights of adapters that are not active are left out, so the base
  model under ``disable_adapter()`` keeps one namespace whatever the adapters' weights do, and a
  training step on an adapter changes only the namespaces where that adapter is active;
- the dtype and device type of every weight.

It is the same in two processes with the same weights and adapters (a content hash, no ids or
addresses) and cheap per call: :meth:`ModelFingerprint.scan` reads attributes and version
counters; a tensor is hashed again only when its version counter or storage changed, and a state
seen before (an adapter switched back on) is remembered. Writes through ``p.data`` bypass version
counters: after such a write call :func:`hf_kvpool.weights_changed`.

A remembered state one of whose tensors was updated in place since (an optimizer step: version
counters only grow) can never be seen again: its digest is *retired* (``take_retired``), unless
the current state or another remembered one still has it, so the pool can free its blocks.
States without the updated tensors (the base model under ``disable_adapter()`` while a LoRA
adapter trains) stay.

The same pass lists forward hooks that are neither hf_kvpool's nor known to be passive: they may
change K/V in ways no attribute shows, so the caller computes without the pool while they exist.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from . import compat

__all__ = ["ModelFingerprint", "Scan"]

_CHUNK = 1 << 24  # elements per device-side checksum chunk
_MEMO = 32  # states remembered (adapter on/off, several adapters...)
# config fields that do not change K/V and that callers toggle: left out of the key
_OUTPUT_ONLY = {
    "_name_or_path",
    "transformers_version",
    "_commit_hash",
    "output_hidden_states",
    "output_attentions",
    "_output_attentions",
    "return_dict",
    "use_cache",
    "id2label",
    "label2id",
    "problem_type",
    "architectures",
}


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


def _stable(value) -> str:
    """A text of a config value that is the same in every process (no addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_stable(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_stable(k)}:{_stable(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    if compat.is_config(value):
        return config_text(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):  # weights are hashed by content elsewhere
        return f"tensor{tuple(value.shape)}"
    text = str(value)
    return type(value).__qualname__ if " at 0x" in text else text


def _fields(config) -> dict:
    return {k: v for k, v in vars(config).items() if k not in _OUTPUT_ONLY}


def config_text(config) -> str:
    """Every field of ``config`` (sub-configs included) that may change K/V, as stable text."""
    return type(config).__qualname__ + _stable(_fields(config))


@dataclass
class Scan:
    """What one pass over a model sees (:meth:`ModelFingerprint.scan`)."""

    tensors: list[tuple[str, torch.Tensor]]  # (canonical name, tensor) of the weights in the forward
    adapters: tuple  # per adapter layer in use: (path, disabled, adapters in use, merged adapters, settings)
    adapter_layout: tuple  # every adapter layer: (path, merged adapters)
    config: str
    foreign_hooks: list[str]  # "module path: hook name" of hooks that may change K/V
    devices: frozenset = frozenset()  # device types of the weights (where autocast may apply)

    def key(self) -> tuple:
        return (
            tuple((id(t), t._version, t.data_ptr(), t.device) for _, t in self.tensors),
            self.adapters,
            self.config,
        )


class ModelFingerprint:
    """Digest of what decides ``model``'s K/V (see module docstring).

    Args:
        model: the causal LM whose forward the pool serves.
        own_hooks: hook functions of hf_kvpool on this model (not foreign).
    """

    def __init__(self, model: torch.nn.Module, own_hooks: tuple = ()):
        self._model = weakref.ref(model)
        self._own_hooks = own_hooks
        self._lock = threading.Lock()
        # id(tensor) -> (weakref to it, version, data_ptr, digest): a tensor is rehashed only when
        # it changed (the weakref guards against a new tensor reusing a freed id and address)
        self._digests: dict[int, tuple[weakref.ref, int, int, bytes]] = {}
        self._memo: OrderedDict[tuple, bytes] = OrderedDict()
        self._adapter_layout: tuple | None = None  # adapter layer paths and merged adapters
        self._config: tuple[dict, str] | None = None  # (a copy of the config's fields, their text)
        self._retired: set[bytes] = set()  # digests of states that cannot come back (not taken yet)
        self.hashed_tensors = 0  # tensors hashed so far (tests check the per-call cost)

    def _alive(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this fingerprint was garbage-collected")
        return model

    def scan(self) -> Scan:
        """One pass over the model's modules and weights: attribute reads, no tensor hashing."""
        model = self._alive()
        peft = compat.peft_loaded()  # no PEFT imported: no adapter layer can exist
        inactive: set[int] = set()  # ids of weights of adapters that do not take part
        adapters, layout, named = [], [], []
        foreign = [f"(global): {name}" for name in compat.global_forward_hooks()]
        for path, module in model.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            named.extend((prefix + name, t) for name, t in compat.own_tensors(module))
            for hook in compat.forward_hooks(module):
                if hook not in self._own_hooks and not compat.is_passive_hook(hook):
                    foreign.append(f"{path or type(model).__name__}: {getattr(hook, '__qualname__', hook)}")
            state = compat.adapter_state(module) if peft else None
            if state is None:
                continue
            disabled, active, merged, extras, containers = state
            used = () if disabled else tuple(a for a in active if any(a in c for c in containers))
            for container in containers:
                for name, sub in container.items():
                    if name not in used:
                        if isinstance(sub, torch.Tensor):
                            inactive.add(id(sub))
                        else:
                            inactive.update(id(t) for t in (*sub.parameters(), *sub.buffers()))
            layout.append((path, merged))
            if used or merged:  # an idle adapter layer computes what the plain layer computes
                settings = tuple((a, _stable(extras.get(a))) for a in used)
                adapters.append((compat.canonical_name(path), disabled, used, merged, settings))
        tensors = [(compat.canonical_name(name), t) for name, t in named if id(t) not in inactive]
        tensors.sort(key=lambda item: item[0])
        devices = frozenset(t.device.type for _, t in tensors)
        return Scan(tensors, tuple(adapters), tuple(layout), self._config_text(model), foreign, devices)

    def _config_text(self, model) -> str:
        """``config_text`` of the model's config, computed again only when a field changed."""
        config = getattr(model, "config", None)
        if config is None:
            return ""
        fields = _fields(config)
        if self._config is None or self._config[0] != fields:
            self._config = (copy.deepcopy(fields), config_text(config))
        return self._config[1]

    def digest(self, scan: Scan | None = None) -> bytes:
        """The current digest (16 bytes); tensors are hashed only when they changed."""
        scan = scan or self.scan()
        model = self._alive()
        key = scan.key()
        with self._lock:
            if scan.adapter_layout != self._adapter_layout:
                # adapter layers came or went, or an adapter was merged/unmerged: merges write the
                # base weights through ``.data`` (no version bump), so everything is hashed again
                if self._adapter_layout is not None:
                    self._forget()
                self._adapter_layout = scan.adapter_layout
            found = self._memo.get(key)
            if found is not None:
                self._memo.move_to_end(key)
                return found
            digest = self._compute(model, scan)
            self._retire_stale(digest)
            self._memo[key] = digest
            while len(self._memo) > _MEMO:
                self._memo.popitem(last=False)
            return digest

    def remembered(self) -> set[bytes]:
        """Digests of the states remembered (the current one among them)."""
        with self._lock:
            return set(self._memo.values())

    def take_retired(self) -> set[bytes]:
        """Digests retired since the last call (see module docstring); empty most of the time."""
        if not self._retired:
            return set()
        with self._lock:
            retired, self._retired = self._retired, set()
            return retired

    def _retire_stale(self, digest: bytes) -> None:
        """Forget remembered states with a tensor updated in place since; retire their digests."""
        stale = [key for key in self._memo if self._updated_since(key)]
        if not stale:
            return
        for key in stale:
            self._retired.add(self._memo.pop(key))
        self._retired -= {digest, *self._memo.values()}

    def _updated_since(self, key: tuple) -> bool:
        """A tensor of the state ``key`` is alive and was written in place since (a dead tensor
        may come back with the same content: not stale)."""
        for ident, version, ptr, _ in key[0]:
            entry = self._digests.get(ident)
            t = entry[0]() if entry is not None else None
            if t is not None and (t._version != version or t.data_ptr() != ptr):
                return True
        return False

    def invalidate(self) -> None:
        """Hash every tensor again on the next :meth:`digest` (after writes through ``.data``)."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        self._digests.clear()
        self._memo.clear()

    def _tensor(self, t: torch.Tensor, offloaded: torch.Tensor | None) -> bytes:
        source = offloaded if offloaded is not None else t
        entry = self._digests.get(id(t))
        if (
            entry is not None
            and entry[0]() is t
            and entry[1] == t._version
            and entry[2] == t.data_ptr()
            and offloaded is None
        ):
            return entry[3]
        digest = _tensor_digest(source) if source.device.type != "meta" and source.numel() else b""
        self.hashed_tensors += 1
        self._digests[id(t)] = (weakref.ref(t), t._version, t.data_ptr(), digest)
        return digest

    def _compute(self, model: torch.nn.Module, scan: Scan) -> bytes:
        h = xxhash.xxh3_128()
        h.update(type(model).__qualname__.encode())
        h.update(scan.config.encode())
        offloaded = {}
        if any(t.device.type == "meta" for _, t in scan.tensors):
            offloaded = compat.offloaded_weights(model, rename=compat.canonical_name)
        for name, t in scan.tensors:
            source = offloaded.get(name)
            shown = source if source is not None else t
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{shown.device.type}|".encode())
            h.update(self._tensor(t, source))
        h.update(repr(scan.adapters).encode())
        return h.digest()
