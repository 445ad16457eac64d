"""What an attention pattern is, and the registry that names them.

A pattern is a frozen dataclass of its settings, a ``phase`` (prefill,
decode or both) and one method, ``mask(q, k) -> BlockMask``: given the actual queries ``[B, H, Lq, D]`` and
keys ``[B, H, Lk, D]`` (grouped-query heads already expanded), it decides
which key blocks each query block attends to. Each pattern lives in its own
file and registers itself here; :func:`make_pattern` builds one by name from
keyword settings, with a one-line error for a setting it does not have.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..errors import InputError, require
from ..registry import Registry
from .masks import BlockMask

__all__ = ["PATTERNS", "PatternBase", "make_pattern", "scaled_scores"]

PATTERNS: Registry[type] = Registry("attention pattern")


@dataclasses.dataclass(frozen=True)
class PatternBase:
    block_size: int = 64
    # when the pattern applies: "prefill" (several queries), "decode" (one query) or "both"
    phase: ClassVar[str] = "both"
    # whether ``mask`` reads the keys' values (False: only their count, so grouped-query keys need not be expanded)
    reads_keys: ClassVar[bool] = True

    def __post_init__(self) -> None:
        require(self.block_size in (16, 32, 64, 128), f"block_size must be 16, 32, 64 or 128, got {self.block_size}")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_key_ranges(self, k_len: int) -> tuple[tuple[int, int], ...] | None:
        """For a static pattern, the key ranges ``[start, stop)`` that one query at position ``k_len - 1`` attends:
        a decode step then slices the cache instead of building a mask. None: the pattern must see the keys."""
        return None

    @property
    def decodes_in_graph(self) -> bool:
        """Whether a decode step under a static cache chooses its slots on the device, with no host sync
        (:meth:`decode_key_slots` or :meth:`decode_query_slots`), so that a CUDA graph replays the sparse step."""
        cls = type(self)
        return (cls.decode_key_slots is not PatternBase.decode_key_slots
                or cls.decode_query_slots is not PatternBase.decode_query_slots)

    def decode_key_slots(self, first: torch.Tensor, last: torch.Tensor, k_len: int
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`decode_key_ranges` computed on the device, for a cache whose length the host does not know (a
        static cache, replayed in a CUDA graph) or whose rows start at different slots (left padding).

        ``first`` and ``last`` (``[B]``) are each row's first valid slot and the query's slot, of ``k_len``
        slots; the pattern's blocks count from ``first``. Returns ``(index, keep)``, two ``[B, n]`` tensors
        with ``n`` fixed by the pattern's settings (so the work does not depend on the position): the slots
        to read, and which of them the query attends. None: the pattern must see the keys.
        """
        return None

    def decode_query_slots(self, query: torch.Tensor, key: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                           valid: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """:meth:`decode_key_slots` for a pattern that reads the query and the keys to choose (quest).

        ``query`` ``[B, H, 1, D]``; ``key`` the whole cache ``[B, Hkv, L, D]``; ``valid`` ``[B, L]`` the slots
        the query may see; ``state`` a dict kept per attention layer from call to call, for what the pattern
        keeps up to date instead of reading the whole cache each step. Returns ``(index, keep, density)``:
        ``[B, H, n]`` slots per query head, which of them are attended, and the kept share of blocks.
        """
        return None

    def prefill_written(self, key: torch.Tensor, first: torch.Tensor, valid: torch.Tensor, state: dict) -> None:
        """A prefill (several queries) wrote ``key``'s cache; ``valid`` ``[B, L]`` are the slots now filled.
        A pattern with :meth:`decode_query_slots` brings its ``state`` up to date here."""


def make_pattern(name: str, **params) -> PatternBase:
    """The registered pattern ``name`` with ``params`` as its settings."""
    cls = PATTERNS.get(name)
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise InputError(f"attention pattern {name!r} has no setting {', '.join(unknown)}; it takes: {', '.join(sorted(fields))}")
    for key, value in params.items():
        kind = fields[key]
        if kind in _KINDS and (not isinstance(value, _KINDS[kind]) or (isinstance(value, bool) and kind != "bool")):
            raise InputError(f"attention pattern {name!r}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")
    return cls(**params)


_KINDS = {"int": int, "float": (int, float), "bool": bool}
_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false"}


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``q k^T * scale`` (default ``1 / sqrt(d)``) in float32 (``q`` and ``k`` with the same leading dims).

    On CUDA, fp16/bf16 inputs stay in their precision and the GEMM writes
    float32 directly: widening the keys first would copy all of them and
    run the product without tensor cores.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        lead = q.shape[:-2]
        qs = (q.float() * scale).to(q.dtype).reshape(-1, *q.shape[-2:])
        out = torch.bmm(qs, k.reshape(-1, *k.shape[-2:]).transpose(-1, -2), out_dtype=torch.float32)
        return out.reshape(*lead, q.shape[-2], k.shape[-2])
    return (q.float() @ k.float().transpose(-1, -2)) * scale


def last_queries_softmax(q: torch.Tensor, k: torch.Tensor, count: int) -> torch.Tensor:
    """Causal attention probabilities of the last ``count`` queries over all keys: ``[B, H, count, Lk]``."""
    lq, lk = q.shape[-2], k.shape[-2]
    count = min(count, lq)
    scores = scaled_scores(q[..., lq - count :, :], k)
    # only the last count x count corner holds future keys
    rows = torch.arange(count, device=q.device)
    scores[..., lk - count :].masked_fill_(rows[None, :] > rows[:, None], float("-inf"))
    return scores.softmax(dim=-1)
