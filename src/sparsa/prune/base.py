"""What every pruning method is: a per-linear object the calibration pipeline drives.

The pipeline builds one pruner per ``nn.Linear``, feeds it that linear's
calibration inputs, and asks it to prune::

    pruner = METHODS.get(config.method)(layer, config, name)
    if pruner.needs_inputs:
        for x in inputs:                 # [..., in_features], any float dtype
            pruner.add_batch(x)
    mask = pruner.prune(sparsity)        # zeroes pruned weights in place, returns the keep-mask
    pruner.free()

A method is one subclass of :class:`LayerPruner` registered in ``METHODS``. It
says which statistics it gathers (:meth:`LayerPruner.accumulate`) and which
weights it keeps (:meth:`LayerPruner.select`); validation, the N:M check and
writing the result back in the weight's dtype are shared here.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import InputError, ModelError, require
from ..registry import Registry
from .config import PruneConfig
from .patterns import mask_from_scores, require_nm_fits

__all__ = ["METHODS", "InputStats", "LayerPruner"]


class LayerPruner:
    """Prunes one linear layer; subclasses implement :meth:`select` and, if they need inputs, :meth:`accumulate`."""

    needs_inputs: ClassVar[bool] = True
    CHUNK_TOKENS: ClassVar[int] = 2048

    def __init__(self, layer: nn.Linear, config: PruneConfig, name: str) -> None:
        weight = getattr(layer, "weight", None)
        require(
            isinstance(weight, torch.Tensor) and weight.dim() == 2,
            f"{name} is not a linear layer with a 2-D weight; --skip it",
        )
        self.layer = layer
        self.config = config
        self.name = name
        self.rows, self.columns = weight.shape
        self.device = weight.device
        self.tokens = 0
        self.input_dtype = weight.dtype  # of the calibration inputs, once seen

    # -- statistics -----------------------------------------------------------------

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Take one batch of the layer's inputs, ``[..., in_features]``, into the statistics.

        The inputs are flattened to ``[tokens, in_features]`` and converted to
        float32 on the layer's device, so half-precision activations cannot
        overflow the running sums.
        """
        require(
            x.shape[-1] == self.columns,
            f"{self.name} expects inputs with {self.columns} features, got shape {tuple(x.shape)}",
        )
        self.input_dtype = x.dtype
        rows = x.reshape(-1, self.columns)
        # float32 copies are made a chunk at a time, so statistics never cost
        # more memory than a few thousand tokens of the layer's inputs.
        for chunk in rows.split(self.CHUNK_TOKENS):
            self.tokens += chunk.shape[0]
            self.accumulate(chunk.to(device=self.device, dtype=torch.float32))

    def accumulate(self, x: torch.Tensor) -> None:
        """Update the method's statistics with ``x``: float32 ``[tokens, in_features]``."""

    def statistics(self) -> list[torch.Tensor]:
        """The accumulated statistics, checked for NaN/Inf before pruning."""
        return []

    def free(self) -> None:
        """Drop the statistics (the pipeline calls this as soon as the layer is pruned)."""
        self.tokens = 0

    # -- pruning --------------------------------------------------------------------

    @torch.no_grad()
    def prune(self, sparsity: float) -> torch.Tensor:
        """Prune the layer in place at ``sparsity`` (or the config's N:M pattern); return the keep-mask.

        Everything that can fail is checked before the weights change, so a
        failed call leaves the layer as it was.
        """
        require(0 <= sparsity < 1, f"{self.name}: sparsity must be in [0, 1), got {sparsity}")
        self.check_ready()
        keep, weight = self.select(sparsity)
        self._write(keep, weight)
        return keep

    def check_ready(self) -> None:
        """Raise before pruning if the weights, the statistics or the pattern are unusable."""
        if not torch.isfinite(self.layer.weight).all():
            raise ModelError(f"{self.name} has NaN or Inf weights; the model is damaged: reload it from a good copy")
        if self.needs_inputs:
            require(
                self.tokens > 0,
                f"no calibration tokens reached {self.name}; use more calibration samples or --skip it",
            )
            if not all(torch.isfinite(s).all() for s in self.statistics()):
                raise ModelError(
                    f"the calibration inputs of {self.name} contain NaN or Inf; use float32 or bfloat16 "
                    "instead of float16 (--dtype), or check the model's weights"
                )
        if self.config.nm is not None:
            require_nm_fits(self.columns, *self.config.nm, name=self.name)

    def select(self, sparsity: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Choose the kept weights: return the keep-mask and, for methods that
        also update the kept weights (SparseGPT), their new float32 values
        (``None`` keeps the current ones)."""
        raise NotImplementedError

    def mask(self, scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
        """The config's pattern applied to ``scores`` (higher = more important)."""
        return mask_from_scores(scores, sparsity, self.config.nm, per_row=per_row, name=self.name)

    def _write(self, keep: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Zero the pruned weights (and store updated kept ones), keeping the weight's dtype."""
        target = self.layer.weight
        values = target if weight is None else weight.to(dtype=target.dtype)
        target.copy_(values.masked_fill(~keep, 0))


class InputStats:
    """Per-input-feature count, mean and spread of a linear's inputs, in float32.

    Batches are merged with Chan et al.'s parallel update, which keeps the sum
    of squared deviations (``m2``) directly instead of subtracting two large
    sums; that matters for LLM channels whose mean dwarfs their spread.
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(features, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Merge a float32 batch ``[tokens, features]``."""
        n = x.shape[0]
        total = self.count + n
        batch_mean = x.mean(dim=0)
        delta = batch_mean - self.mean
        self.m2 += (x - batch_mean).pow(2).sum(dim=0) + delta.pow(2) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each feature."""
        return self.m2 / max(self.count, 1)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each feature over all tokens, ``||X_j||_2``."""
        return (self.m2 + self.count * self.mean.pow(2)).sqrt()

    def tensors(self) -> list[torch.Tensor]:
        return [self.mean, self.m2]


METHODS: Registry[type[LayerPruner]] = Registry("pruning method")
