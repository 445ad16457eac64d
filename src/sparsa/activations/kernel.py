"""Activation sparsity that pays: calibrated cuts run inside the sparse GEMV instead of as hooks.

:class:`SparseInputLinear` replaces a linear layer whose input is cut. It
keeps the weight once, transposed (``W^T``, the layout the sparse GEMV
reads), and per-channel thresholds on ``|x_j|``. Decode steps (at most
``MAX_TOKENS`` tokens) on a CUDA GPU with Triton run
:func:`sparsa.kernels.sparse_gemv.sparse_gemv`, which selects the active
channels and reads only their weight rows, in the launch configuration
measured fastest for the layer's shape and sparsity
(:mod:`sparsa.kernels.gemv_dispatch`); everything else (prefill, CPU) cuts
and multiplies densely, with the same result.

:func:`use_kernels` swaps them into a model for the sites of an installed
:class:`~sparsa.activations.apply.ActivationSparsity` handle: the cut
linear inputs (teal, wina), and for CATS the ``down_proj`` of each cut MLP,
whose input is zero wherever the gate was cut.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.devices import on_input_device
from ..kernels.sparse_gemv import MAX_TOKENS, GemvConfig, PreparedGemv
from .cut import Cut, prepare_cut

__all__ = ["SparseInputLinear", "sparse_input_layers", "use_kernels"]


class SparseInputLinear(nn.Module):
    """``F.linear(x * keep, W, b)`` with ``keep = |x| >= threshold`` per channel (``threshold=None``: ``x != 0``)."""

    def __init__(self, linear: nn.Linear, threshold: torch.Tensor | None, config: GemvConfig | None = None,
                 sparsity: float = 0.5) -> None:
        """``config``: the GEMV's launch configuration for every token count (None: measured per token bucket
        for a cut at ``sparsity``, the fraction of inputs the thresholds were calibrated to cut)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_buffer("threshold", None if threshold is None else threshold.float().to(linear.weight.device))
        self.config, self.sparsity = config, sparsity
        self._configs: dict[int, GemvConfig] = {}  # measured, per token bucket
        self._prepared: dict[tuple[int, GemvConfig], PreparedGemv] = {}  # per token count and configuration
        self._cuts: dict[tuple, Cut] = {}  # the cut outside the GEMV, per input dtype, device and thresholds' version

    @on_input_device()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        m = flat.shape[0]
        if flat.is_cuda and 0 < m <= MAX_TOKENS and flat.dtype == self.weight_t.dtype and flat.device == self.weight_t.device:
            config = self.config or self._config(m, flat.dtype) or GemvConfig.for_shape(self.out_features, self.in_features)
            call = self._prepared.get((m, config))
            if call is None:
                call = self._prepared[(m, config)] = PreparedGemv(self.weight_t, self.bias, self.threshold, config, m)
            return call(flat).reshape(*x.shape[:-1], self.out_features)
        if self.threshold is not None:
            x = self._cut(x.dtype, x.device)(x)
        return F.linear(x, self.weight_t.t(), self.bias)

    def _cut(self, dtype: torch.dtype, device: torch.device) -> Cut:
        """The cut outside the GEMV, prepared once per input dtype and device (the same comparison as the kernel's)."""
        key = (dtype, device, _version(self.threshold))  # the version: in-place writes (load_state_dict) count too
        cut = self._cuts.get(key)
        if cut is None:
            self._cuts.clear()
            cut = self._cuts[key] = prepare_cut(self.threshold, dtype, device)
        return cut

    def _config(self, m: int, dtype: torch.dtype) -> GemvConfig | None:
        """The measured configuration for ``m`` tokens (None while a CUDA graph captures an unmeasured shape)."""
        from ..kernels import gemv_dispatch

        b = gemv_dispatch.bucket(m)
        config = self._configs.get(b)
        if config is None:
            config = gemv_dispatch.config_for(self.out_features, self.in_features, b, dtype, self.sparsity)
            if config is not None:
                self._configs[b] = config
        return config

    def _apply(self, fn, *args, **kwargs):
        # a move or cast makes new tensors, which prepared calls (holding pointers) would not see
        self._prepared.clear()
        self._configs.clear()
        self._cuts.clear()
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):
        if name in ("weight_t", "bias", "threshold") and "_prepared" in self.__dict__:  # (also load_state_dict(assign=True))
            self._prepared.clear()
            self._cuts.clear()
        super().__setattr__(name, value)

    def __getstate__(self):
        state = self.__dict__.copy()  # prepared calls hold compiled kernels, which neither copy nor pickle
        state["_prepared"] = {}
        state["_cuts"] = {}
        return state

    def extra_repr(self) -> str:
        cut = "x != 0" if self.threshold is None else "|x| >= per-channel threshold"
        return f"in_features={self.in_features}, out_features={self.out_features}, keep {cut}"


def _version(t: torch.Tensor) -> int | None:
    """How many in-place writes ``t`` has had (None for an inference tensor, which cannot be written in place later)."""
    try:
        return t._version
    except RuntimeError:
        return None


def sparse_input_layers(model: nn.Module, handle) -> dict[str, object]:
    """Every module whose input is activation-sparse under ``handle``, by name: the site that cuts its input,
    or None where the input is zero because a cut upstream made it so (the ``down_proj`` after CATS's gate)."""
    names = {id(module): name for name, module in model.named_modules()}
    layers: dict[str, object] = {}
    for site in handle.sites:
        name = names.get(id(site.module))
        if name is None:
            continue
        if site.kind == "input":
            layers[name] = site
        else:
            down = f"{name.rsplit('.', 1)[0]}.down_proj"
            if down in names.values():
                layers[down] = None
    return layers


def _target(handle, site) -> float:
    """The fraction of a layer's inputs its cut aims at (for a ``down_proj`` after CATS's gate: the gate's)."""
    if site is not None and site.sparsity is not None:
        return site.sparsity
    return handle.config.sparsity


def use_kernels(model: nn.Module, handle) -> list[str]:
    """Swap :class:`SparseInputLinear` in for every ``nn.Linear`` that reads a cut input; returns the swapped names.

    The hooks of swapped input sites are removed (the layer cuts its own
    input); CATS's gate cuts stay hooks, since its ``down_proj`` only needs
    to skip the zeros they make.
    """
    swapped, inside = [], set()
    for name, site in sparse_input_layers(model, handle).items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            continue
        threshold = None if site is None else site.channel_thresholds(linear.in_features)
        model.set_submodule(name, SparseInputLinear(linear, threshold, sparsity=_target(handle, site)))
        swapped.append(name)
        if site is not None:
            inside.add(id(site))
    handle.sites = [s for s in handle.sites if id(s) not in inside]
    handle.install()
    return swapped
