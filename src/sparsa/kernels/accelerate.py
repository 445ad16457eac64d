"""Swap a pruned model's 2:4 linear layers for :class:`SparseLinear24`, in place."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import require
from .sparse24 import DTYPES, SparseLinear24, is_24

__all__ = ["accelerate"]

_WARNED = False
NO_GPU = "sparsa.accelerate: no CUDA GPU, 2:4 layers stay dense"
NO_TRITON = "sparsa.accelerate: triton is not installed (pip install triton), 2:4 layers stay dense"


def _warn_once(message: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _skip_reason(weight: torch.Tensor) -> str | None:
    if not is_24(weight):
        return "not 2:4 sparse"
    if weight.dtype not in DTYPES:
        return f"dtype {str(weight.dtype).replace('torch.', '')} (2:4 kernels need float16 or bfloat16)"
    if not weight.is_cuda:
        return f"on {weight.device}, not a CUDA GPU"
    return None


def accelerate(
    model: nn.Module,
    *,
    min_sparse_fraction: float = 0.5,
    keep_dense: bool = True,
    tune_tokens: Iterable[int] = (),
) -> dict:
    """Replace every ``nn.Linear`` whose weight is exactly 2:4 sparse with a :class:`SparseLinear24`.

    Layers that are not 2:4, not float16/bfloat16 or not on a CUDA GPU stay as
    they are. Nothing is replaced unless at least ``min_sparse_fraction`` of
    the model's linear weights (by parameter count) are 2:4: a dense model
    whose only "2:4" layers are all-zero stays dense. Without a CUDA GPU or
    without triton the model is returned unchanged, with one warning per
    process.

    ``keep_dense`` keeps each replaced layer's dense weight (no copy) for the
    token counts where dense cuBLAS measures faster; ``keep_dense=False``
    lets it go (less memory, the sparse paths everywhere). ``tune_tokens``
    measures the dispatch for these token counts now rather than at first use.

    Returns a report: ``replaced`` (layer names), ``skipped`` (name -> why),
    ``sparse_fraction``, ``accelerated`` and ``reason`` (why nothing was
    replaced, or None).
    """
    require(0.0 <= min_sparse_fraction <= 1.0, f"min_sparse_fraction must be in [0, 1], got {min_sparse_fraction}")
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    report: dict = {"replaced": [], "skipped": {}, "sparse_fraction": 0.0, "accelerated": False, "reason": None}

    total = sum(m.weight.numel() for _, m in linears)
    sparse = 0
    eligible = []
    for name, module in linears:
        weight = module.weight.detach()
        if is_24(weight):
            sparse += weight.numel()
        reason = _skip_reason(weight) if name else "the model itself is the layer: use SparseLinear24.from_linear"
        if reason is None:
            eligible.append((name, module))
        else:
            report["skipped"][name] = reason
    report["sparse_fraction"] = sparse / total if total else 0.0

    from .triton_sparse24 import HAVE_TRITON

    if not torch.cuda.is_available():
        report["reason"] = NO_GPU
        _warn_once(NO_GPU)
        return report
    if not HAVE_TRITON:
        report["reason"] = NO_TRITON
        _warn_once(NO_TRITON)
        return report
    if report["sparse_fraction"] < min_sparse_fraction:
        report["reason"] = (
            f"only {report['sparse_fraction']:.0%} of the linear weights are 2:4 sparse "
            f"(min_sparse_fraction={min_sparse_fraction}); prune with --pattern 2:4 first"
        )
        return report
    if not eligible:
        report["reason"] = "no linear layer is 2:4 sparse, float16/bfloat16 and on a CUDA GPU"
        return report

    tokens = sorted({int(t) for t in tune_tokens if int(t) > 0})
    for name, module in eligible:
        layer = SparseLinear24.from_linear(module, name, keep_dense=keep_dense)
        model.set_submodule(name, layer)
        report["replaced"].append(name)
        with torch.cuda.device(module.weight.device):  # a model split over GPUs: measure each layer on its own
            for t in tokens:
                layer.route(t)
    report["accelerated"] = True
    return report
