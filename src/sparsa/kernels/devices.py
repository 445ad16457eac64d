"""Run a layer's kernels on the GPU that holds its input.

Triton launches on the current CUDA device, and cuSPARSELt and the driver
launches run in the current device's context. A model split over several
GPUs (``device_map="auto"``) calls each layer with its tensors on that
layer's GPU while the current device stays the first, so the entry points
that launch our kernels (a 2:4 layer, an activation-sparse layer, the
sparse attention function) make the input's device current for the call.
On a machine with one GPU the check stops at a count made once (a fraction
of a microsecond per call; eager decode steps make hundreds of such calls).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

__all__ = ["on_input_device"]

F = TypeVar("F", bound=Callable)


@functools.cache
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


def on_input_device(position: int = 1) -> Callable[[F], F]:
    """Decorate a function so that it runs with the CUDA device of its argument ``position`` current.

    ``position`` counts ``self`` in methods: 1 is a method's first argument after it.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t = args[position] if len(args) > position else None  # passed by keyword: left as it is
            if isinstance(t, torch.Tensor) and t.is_cuda and _several_gpus() and t.get_device() != torch.cuda.current_device():
                with torch.cuda.device(t.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
