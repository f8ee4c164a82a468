"""Triton paged-gather / paged-scatter kernels (installed as ``hf_kvpool.triton_kernels``).

Imported only when a caller asks for the Triton backend (``hf_kvpool.paged_copy.gather("triton", ...)``),
so ``import hf_kvpool`` works without Triton. Without Triton, importing this package raises an
ImportError that says what to do.
"""

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by tests/test_namespace.py
    raise ImportError(
        "hf_kvpool.triton_kernels needs Triton (`pip install 'hf-kvpool[triton]'`, or a CUDA build of "
        "torch, which ships it); use backend='torch' instead"
    ) from exc

from .paged_copy import paged_gather, paged_scatter

__all__ = ["paged_gather", "paged_scatter"]
