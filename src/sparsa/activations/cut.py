"""The cut itself: ``x * (|x| >= t)``, per channel, in as few kernels as the thresholds allow.

Thresholds are float32 and the comparison is exact in every dtype: a value
is kept where its magnitude reaches the float32 threshold, as the fused
GEMV compares it. Outside the GEMV (prefill, CPU, hooks) the cut is pure
overhead before a dense product, so it is run in as few passes over ``x``
as it can be:

* one threshold for every channel (teal, cats, or wina where the search
  declined to weight): one ``hardshrink``, which zeroes ``|x| <= b``. With
  ``b`` the largest value of x's dtype below ``t``, that is exactly
  ``|x| < t``;
* a threshold per channel (weight-informed scores): ``|x|`` compared with
  the thresholds rounded up to x's dtype (exact, since ``|x|`` is a value of
  that dtype), then the product: three kernels, and no float32 copy of x.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = ["Cut", "prepare_cut"]


def _below(t: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` strictly below ``t`` (``t > 0``)."""
    v = torch.tensor(t, dtype=torch.float64).to(dtype)
    if float(v) >= t:  # rounded up (or exact): the value before it is below t
        v = torch.nextafter(v, torch.tensor(float("-inf"), dtype=dtype))
    return float(v)


def _rounded_up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each threshold as the smallest value of ``dtype`` not below it."""
    v = t.to(torch.float64).to(dtype)
    short = v.to(torch.float64) < t.to(torch.float64)
    return torch.where(short, torch.nextafter(v, torch.full_like(v, float("inf"))), v)


@dataclasses.dataclass(frozen=True)
class Cut:
    """A prepared cut for inputs of one dtype and device; with neither bound it keeps everything."""

    bound: float | None = None  # one threshold for all channels: zero |x| <= bound (hardshrink)
    floor: torch.Tensor | None = None  # per channel, in x's dtype: keep |x| >= floor

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """bool mask of the kept values (for counting; :meth:`__call__` does not build it where it can help it)."""
        if self.floor is not None:
            return x.abs() >= self.floor
        if self.bound is not None:
            return x.abs() > self.bound
        return torch.ones_like(x, dtype=torch.bool)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.floor is not None:
            return x * (x.abs() >= self.floor)
        if self.bound is not None:
            return F.hardshrink(x, self.bound)
        return x


def prepare_cut(threshold: float | torch.Tensor | None, dtype: torch.dtype, device: torch.device | str | None = None) -> Cut:
    """The cut at ``threshold`` (a float, or float32 per channel) for inputs of ``dtype`` on ``device``.

    Per-channel thresholds that are all equal become one bound (one kernel). A float threshold is rounded
    to float32 first, as the GEMV stores it.
    """
    if isinstance(threshold, torch.Tensor):
        values = threshold.detach().float()
        first = values.reshape(-1)[:1]
        if values.numel() and bool((values == first).all()):
            threshold = float(first)
        else:
            return Cut(floor=_rounded_up(values.cpu(), dtype).to(device if device is not None else threshold.device))
    if threshold is not None and threshold != threshold:  # NaN: no value reaches it, as the GEMV compares
        return Cut(floor=torch.tensor(float("nan"), dtype=dtype, device=device))
    if threshold is None or not threshold > 0:  # |x| >= t for every x when t <= 0
        return Cut()
    return Cut(bound=_below(float(torch.tensor(threshold, dtype=torch.float32)), dtype))  # float32, as the GEMV's
