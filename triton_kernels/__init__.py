"""Triton paged-gather / paged-scatter kernels (installed as ``hf_kvpool.triton_kernels``)."""
