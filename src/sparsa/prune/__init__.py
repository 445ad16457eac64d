"""Weight pruning: methods, sparsity patterns, layerwise budgets and the calibration pipeline.

Importing the method modules registers them in :data:`sparsa.prune.base.METHODS`.
"""

from . import dsnot, magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from .base import METHODS, LayerPruner
from .config import PruneConfig

__all__ = ["METHODS", "LayerPruner", "PruneConfig"]
