"""Triton, imported once and guarded: the package must import where Triton is absent (CPU machines)."""

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TensorDescriptor = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "TensorDescriptor", "half_on_gpu", "row_tile", "tl", "triton"]

if HAVE_TRITON:

    @triton.jit
    def row_tile(R, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's ``ROWS`` rows of a row-major ``[R, N]`` array: rows, columns, in-bounds mask, element offsets."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        inside = (rows < R)[:, None] & (cols < N)[None, :]
        return rows, cols, inside, rows[:, None].to(tl.int64) * N + cols[None, :]
else:
    row_tile = None


def half_on_gpu(*tensors) -> bool:
    """Whether a Triton kernel can take these tensors: Triton is here and they are all fp16 or all bf16, on the GPU."""
    first = tensors[0]
    return HAVE_TRITON and first.dtype in (torch.float16, torch.bfloat16) and all(
        t.is_cuda and t.dtype == first.dtype for t in tensors)
