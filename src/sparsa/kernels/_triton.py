"""Triton, imported once and guarded: the package must import where Triton is absent (CPU machines)."""

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

__all__ = ["HAVE_TRITON", "TensorDescriptor", "tl", "triton"]
