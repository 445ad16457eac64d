"""Training-free sparse attention: block masks from the actual queries and keys, and backends that run them.

``make_pattern(name, **settings).mask(q, k)`` gives a :class:`BlockMask`;
``attend(q, k, v, mask, backend=...)`` runs it; ``apply(model, method, ...)``
plugs a pattern into a Hugging Face model through transformers' attention
interface. Patterns: streaming, vertical_slash, antidiagonal, flexprefill
(prefill) and quest (decoding).
"""

from . import antidiagonal, flexprefill, quest, streaming, vertical_slash  # noqa: F401  (each registers its pattern)
from .backends import BACKENDS, attend
from .base import PATTERNS, make_pattern
from .hf import AttentionPolicy, apply, remove
from .masks import BlockMask

__all__ = ["BACKENDS", "PATTERNS", "AttentionPolicy", "BlockMask", "apply", "attend", "make_pattern", "remove"]
