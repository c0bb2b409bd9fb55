"""Numba-CUDA kernels (WKV-7 decode / chunked prefill / backward).

Importing this package needs neither numba nor a GPU: numba is imported when a kernel is first built.
"""
from ._runtime import cuda_available
from .wkv_autograd import WKV7Function, wkv7
from .wkv_decode import wkv7_decode
from .wkv_prefill import wkv7_prefill

__all__ = ["WKV7Function", "cuda_available", "wkv7", "wkv7_decode", "wkv7_prefill"]
