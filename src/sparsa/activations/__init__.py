"""Activation sparsity for decoding: zero the least important input channels per token.

``apply(lm, "teal" | "wina" | "wina_fisher" | "cats", sparsity=0.5)`` calibrates per-site
thresholds on the shipped calibration text and installs them as forward
hooks; the returned handle reports measured sparsity and ``remove()``s them.
"""

from . import cats, teal, wina, wina_fisher  # noqa: F401  (each registers its method)
from .apply import ActivationSparsity, apply
from .base import ACTIVATION_METHODS, ActivationConfig

__all__ = ["ACTIVATION_METHODS", "ActivationConfig", "ActivationSparsity", "apply"]
