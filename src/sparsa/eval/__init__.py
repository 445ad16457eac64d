"""Evaluation: perplexity on text, lm-evaluation-harness tasks."""

from .perplexity import Perplexity, perplexity

__all__ = ["Perplexity", "perplexity"]
