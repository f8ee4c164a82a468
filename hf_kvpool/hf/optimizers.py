"""Optimizer steps made visible to the fingerprint, fused ones included.

The fingerprint sees weights change through their autograd version counters (every in-place op
bumps them). torch's fused optimizers (``AdamW(fused=True)``; transformers' ``Trainer`` and so
TRL use ``adamw_torch_fused`` by default on torch >= 2.8) write the parameters in place *without*
bumping them: after such a step the fingerprint would keep the old digest and the pool would serve
K/V computed with the old weights. A global optimizer step post-hook bumps the version counter of
every parameter the step may have written (those with a gradient): O(1) per tensor, no data read.
Installed once, when the first model is fingerprinted.
"""

from __future__ import annotations

import threading

from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["watch_optimizer_steps"]

_handle = None
_lock = threading.Lock()


def watch_optimizer_steps() -> None:
    """Install the post-hook (idempotent)."""
    global _handle
    with _lock:
        if _handle is None:
            _handle = register_optimizer_step_post_hook(_stepped)


def _stepped(optimizer, args, kwargs) -> None:
    written = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if written:
        increment_version(written)
