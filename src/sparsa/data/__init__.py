"""Text for calibration and evaluation: shipped corpora, user files, HF datasets."""

from .calibration import calibration_samples, held_out_samples, tokenize
from .text import SHIPPED, load_text, provenance, shipped_text

__all__ = ["SHIPPED", "calibration_samples", "held_out_samples", "load_text", "provenance", "shipped_text", "tokenize"]
