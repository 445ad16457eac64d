"""What a model's weights actually are: sparsity per layer and the pattern it follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .models import adapter_for, count_parameters, linear_layers

NM_GROUPS = (4, 8, 16)
DENSE_BELOW = 0.01  # quantized checkpoints carry a few exact zeros; that is not sparsity


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    zeros: int
    total: int
    pattern: str  # "dense", "N:M", "structured (rows|columns)" or "unstructured"
    decoder: bool = True  # inside a decoder layer (what pruning targets), not lm_head
    nonfinite: int = 0  # NaN or Inf weights: a damaged model

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total


@dataclass(frozen=True)
class SparsityReport:
    layers: list[LayerSparsity]
    parameters: int  # every parameter of the model, counted once
    zero_parameters: int  # of those, how many are exactly zero
    nonfinite_parameters: int = 0  # of those, how many are NaN or Inf

    @property
    def linear_sparsity(self) -> float:
        """Sparsity of the decoder layers' linears (the weights pruning targets)."""
        decoder = [layer for layer in self.layers if layer.decoder]
        return sum(layer.zeros for layer in decoder) / max(sum(layer.total for layer in decoder), 1)

    @property
    def pattern(self) -> str:
        """The model's pattern: the one its sparse decoder linears share, or 'mixed'."""
        found = {layer.pattern for layer in self.layers if layer.decoder and layer.pattern != "dense"}
        return found.pop() if len(found) == 1 else ("dense" if not found else "mixed")

    @property
    def warning(self) -> str | None:
        """One line naming where NaN or Inf weights are, or None when every weight is finite."""
        if not self.nonfinite_parameters:
            return None
        bad = [layer.name for layer in self.layers if layer.nonfinite]
        if not bad:
            return f"WARNING: {self.nonfinite_parameters:,} weights outside the linear layers are NaN or Inf"
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"WARNING: {len(bad)} layer{'s have' if len(bad) > 1 else ' has'} NaN or Inf weights: {', '.join(bad[:3])}{more}"

    def to_dict(self) -> dict:
        return {
            "parameters": self.parameters,
            "zero_parameters": self.zero_parameters,
            "nonfinite_parameters": self.nonfinite_parameters,
            "linear_sparsity": self.linear_sparsity,
            "pattern": self.pattern,
            "layers": [
                {"name": l.name, "shape": list(l.shape), "sparsity": l.sparsity, "pattern": l.pattern, "decoder": l.decoder, "nonfinite": l.nonfinite}
                for l in self.layers
            ],
        }


def detect_pattern(weight: torch.Tensor) -> str:
    """Name the pattern of a 2-D weight's zeros."""
    nonzero = weight != 0
    zeros = int((~nonzero).sum())
    if zeros < DENSE_BELOW * weight.numel():
        return "dense"
    rows, cols = weight.shape
    zero_rows = int((~nonzero.any(dim=1)).sum()) * cols
    zero_cols = int((~nonzero.any(dim=0)).sum()) * rows
    if zero_rows == zeros:
        return "structured (rows)"
    if zero_cols == zeros:
        return "structured (columns)"
    density = 1 - zeros / weight.numel()
    for m in NM_GROUPS:
        if cols % m:
            continue
        n = int(nonzero.view(rows, cols // m, m).sum(dim=2).max())
        if n < m and abs(density - n / m) < 0.01:
            return f"{n}:{m}"
    return "unstructured"


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    prefix = adapter_for(model).layers_path + "."
    layers = [
        LayerSparsity(name, tuple(m.weight.shape), int((m.weight == 0).sum()), m.weight.numel(), detect_pattern(m.weight), name.startswith(prefix), _nonfinite(m.weight))
        for name, m in linear_layers(model).items()
    ]
    unique = {id(p): p for p in model.parameters()}.values()
    zero_parameters = sum(int((p == 0).sum()) for p in unique)
    nonfinite_parameters = sum(_nonfinite(p) for p in unique)
    return SparsityReport(layers, count_parameters(model), zero_parameters, nonfinite_parameters)


def _nonfinite(weight: torch.Tensor) -> int:
    return int((~torch.isfinite(weight)).sum())
