"""Kernels that make sparse models fast: 2:4 sparse linear layers on NVIDIA GPUs.

``accelerate(model)`` swaps a pruned model's 2:4 linear layers for
``SparseLinear24``, which runs a Triton kernel for few tokens, cuSPARSELt for
many, and dense cuBLAS wherever that measures faster (``dispatch``). Triton
is imported only when a kernel runs, so this package imports on CPU-only
machines without it.
"""

from .accelerate import accelerate
from .dispatch import bucket, choose
from .sparse24 import Compressed24, SparseLinear24, compress_24, cusparselt_available, decompress_24, is_24

__all__ = [
    "Compressed24",
    "SparseLinear24",
    "accelerate",
    "bucket",
    "choose",
    "compress_24",
    "cusparselt_available",
    "decompress_24",
    "is_24",
]
