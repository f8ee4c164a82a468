"""Argument checks of the Triton kernels: clear errors before a launch, in the caller's terms."""

from __future__ import annotations

import torch

__all__ = ["check_device", "check_index", "check_storage", "check_values"]


def _supported_dtypes() -> tuple[torch.dtype, ...]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if hasattr(torch, "float8_e4m3fn"):
        dtypes.append(torch.float8_e4m3fn)
    return tuple(dtypes)


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_device(name: str, t: torch.Tensor, kernel) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _is_interpreted(kernel):
        return
    raise ValueError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or CPU tensors with "
        "TRITON_INTERPRET=1 set before hf_kvpool.triton_kernels is imported); use backend='torch' "
        "for CPU tensors"
    )


def check_index(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        got = (
            f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        )
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {got}")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries but block_ids has {n}; pass one per block")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but storage is on {device}; move it to {device}")


def check_storage(storage: torch.Tensor) -> None:
    if not isinstance(storage, torch.Tensor) or storage.dim() != 6 or storage.shape[2] < 1:
        shape = tuple(storage.shape) if isinstance(storage, torch.Tensor) else type(storage).__name__
        raise ValueError(
            f"storage must be [num_blocks, n_layers, fields, kv_heads, block_size, head_dim], got {shape}"
        )
    if storage.dtype not in _supported_dtypes():
        raise ValueError(f"storage dtype {storage.dtype} is not supported; use one of {_supported_dtypes()}")
    if 0 in storage.stride():
        raise ValueError("storage has a zero stride (an expanded view); pass a tensor that owns its memory")


def check_values(ok: torch.Tensor, what: str) -> None:
    """One device sync: ``ok`` is a boolean scalar tensor of all range checks."""
    if not bool(ok):
        raise IndexError(f"{what}; pass validate=False only for indices already known to be in range")
