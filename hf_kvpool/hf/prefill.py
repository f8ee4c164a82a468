"""The checks a prefill passes before it may take K/V from the pool.

A pooled block holds K/V of given tokens at given positions. A prefill may take it only when its
rows are left-padded (pads, then tokens), each row's positions count from 0 at its first token,
its token ids are in the vocabulary, and the caller does not want outputs for the skipped columns.
Each check returns what it found, or the reason reuse is off (said once by the caller).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["left_pads", "positions_match", "check_vocab", "reusable_columns"]


def left_pads(mask, batch: int, length: int) -> list[int] | None:
    """Per-row count of leading pad columns, or None if the mask is not left padding."""
    if mask is None:
        return [0] * batch
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != batch:
        return None
    if mask.shape[1] < length:
        return None
    m = mask.cpu().numpy().astype(bool)[:, -length:]
    pads = (~m).cumprod(axis=1).sum(axis=1)
    if not all(m[b, p:].all() for b, p in enumerate(pads)):
        return None
    return [int(p) for p in pads]


def positions_match(position_ids, pads: list[int], length: int) -> bool:
    """The pool stores K at position = index of the token in its row (pads excluded)."""
    if position_ids is None:
        return not any(pads)  # the model counts positions from 0 over every column
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2:
        return False
    pos = position_ids.cpu().numpy()
    for b, p in enumerate(pads):
        row = pos[min(b, pos.shape[0] - 1)]
        if not np.array_equal(row[p:], np.arange(length - p)):
            return False
    return True


def check_vocab(module, ids: np.ndarray, pads: list[int]) -> None:
    """Raise a clear error for a token id outside the model's vocabulary (the embedding would)."""
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        return
    for b, p in enumerate(pads):
        row = ids[b, p:]
        if row.size and (row.min() < 0 or row.max() >= vocab):
            bad = int(row.min()) if row.min() < 0 else int(row.max())
            raise ValueError(
                f"input_ids row {b} holds token id {bad}, outside this model's vocabulary [0, {vocab}); "
                "check that the tokenizer matches the model"
            )


def reusable_columns(module, kwargs: dict, length: int) -> tuple[int, str | None]:
    """How many leading columns may be skipped without changing what the caller gets back, and
    if none, why (the caller says it once)."""
    keep = kwargs.get("logits_to_keep", 0)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        return 0, "the forward wants logits for every position (a direct call, or logits_to_keep=0)"
    config = getattr(module, "config", None)
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag, getattr(config, flag, False)):
            return 0, f"{flag}=True wants outputs for every prompt position"
    if kwargs.get("labels") is not None:
        return 0, "labels need logits for every position"
    return length - keep, None
