"""Wanda: pruning by weights and activations (Sun et al., 2023).

A weight's effect on the output is its size times the size of the input it
multiplies, so the score is ``|W_ij| * ||X_j||_2`` with ``||X_j||`` the L2
norm of input feature ``j`` over all calibration tokens. LLMs have a few
input features with very large activations; this score protects the weights
reading them, which magnitude pruning throws away. Weights compete within
their output row (each output keeps the same share of its inputs), as in the
paper.
"""

from __future__ import annotations

import torch

from .base import METHODS, InputStats, LayerPruner

__all__ = ["Wanda", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` in float32: ``weight`` is ``[out, in]``, ``input_norms`` is ``[in]``."""
    return weight.detach().float().abs() * input_norms.float().unsqueeze(0)


@METHODS.register("wanda")
class Wanda(LayerPruner):
    """Keeps, per output row, the weights with the largest ``|W| * ||X||``."""

    def __init__(self, layer, config, name) -> None:
        super().__init__(layer, config, name)
        self.stats = InputStats(self.columns, self.device)

    def accumulate(self, x: torch.Tensor) -> None:
        self.stats.add(x)

    def statistics(self) -> list[torch.Tensor]:
        return self.stats.tensors()

    def scores(self) -> torch.Tensor:
        return wanda_scores(self.layer.weight, self.stats.norm)

    def select(self, sparsity: float) -> tuple[torch.Tensor, None]:
        return self.mask(self.scores(), sparsity, per_row=True), None

    def free(self) -> None:
        super().free()
        self.stats = InputStats(0, self.device)
