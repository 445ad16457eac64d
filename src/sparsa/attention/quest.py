"""Query-aware KV page selection for decoding (as Quest does).

Keys are grouped in pages of ``block_size`` tokens; each page keeps the
channel-wise minimum and maximum of its keys. For a query ``q``, the largest
score any key of the page could reach is ``sum_d max(q_d min_d, q_d max_d)``;
the ``pages`` pages with the highest bound are attended, plus the query's
own page. With ``pages`` at least the number of pages it is dense attention.
For several queries (a prefill chunk), a query block takes the maximum bound
over its queries.

Decoding under a static cache (a CUDA graph) keeps the bounds of each
layer's cache from step to step (:class:`PageBounds`): made at the prefill,
widened by each step's key (set to it where the key starts a page), so a
step reads ``2 / block_size`` of the keys' bytes to choose, and then only
the chosen pages.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import torch

from ..errors import require
from ..kernels._triton import half_on_gpu
from ..kernels.page_select import select_pages
from .base import PATTERNS, PatternBase
from .masks import BlockMask, finalize, num_query_blocks

__all__ = ["PageBounds", "Quest", "page_bounds", "page_scores"]

ROWS = 256


def page_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The largest score any key of each page could reach, ``sum_d max(q_d lo_d, q_d hi_d)``, in float32:
    ``q`` ``[..., r, D]`` and bounds ``[..., P, D]`` give ``[..., r, P]``."""
    qf = q.float()[..., None, :]
    return torch.maximum(qf * lo[..., None, :, :], qf * hi[..., None, :, :]).sum(-1)


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of each page of keys: two ``[B, H, pages, D]`` tensors."""
    lk = k.shape[-2]
    pages = -(-lk // page)
    pad = pages * page - lk
    kf = k.float()
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).reshape(*k.shape[:2], pages, page, -1).amin(-2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).reshape(*k.shape[:2], pages, page, -1).amax(-2)
    return lo, hi


@PATTERNS.register("quest")
@dataclasses.dataclass(frozen=True)
class Quest(PatternBase):
    phase: ClassVar[str] = "decode"
    pages: int = 16  # pages attended per query (besides its own)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pages >= 1, f"quest needs pages >= 1, got {self.pages}")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        lq, lk = q.shape[-2], k.shape[-2]
        bs = self.block_size
        lo, hi = page_bounds(k, bs)
        offset = lk - lq
        qb = num_query_blocks(lq, lk, bs)
        per_block = torch.full((*q.shape[:2], qb, lo.shape[-2]), float("-inf"), device=q.device)
        for start in range(0, lq, ROWS):  # bounded memory: rows x pages x D at a time
            bound = page_scores(q[..., start : start + ROWS, :], lo, hi)  # [B, H, r, pages]
            rows = torch.arange(start, start + bound.shape[-2], device=q.device)
            index = ((rows + offset) // bs - offset // bs)[None, None, :, None].expand_as(bound)
            per_block.scatter_reduce_(2, index, bound, reduce="amax")
        own = offset // bs + torch.arange(qb, device=q.device)
        per_block = per_block.masked_fill(torch.arange(lo.shape[-2], device=q.device)[None, :] > own[:, None], float("-inf"))
        top = per_block.topk(min(self.pages, per_block.shape[-1]), dim=-1).indices
        blocks = torch.zeros_like(per_block, dtype=torch.bool).scatter(-1, top, True)
        return finalize(blocks, lq, lk, bs)

    def decode_query_slots(self, query: torch.Tensor, key: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                           valid: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One query per row over a static cache: the pages :meth:`mask` would keep, chosen on the device.

        The page bounds are kept in ``state`` per cache (made at the prefill, or here if the cache is new to
        this layer) and updated by the step's own key, so a step reads the bounds, not the keys. Pages count
        from each row's first valid slot. Each query head keeps ``pages`` pages and its own page: ``n = (pages
        + 1) * block_size`` slots, a page that is also its own or lies past the query kept no more than once.
        """
        bs = self.block_size
        bounds = _kept(state).get(_cache_id(key, bs))
        if bounds is None:
            bounds = _keep(state, key, PageBounds.of(key, first, valid, bs))
        if half_on_gpu(query, key):  # the same choice in one launch
            index, keep, share = select_pages(query, key, bounds.lo, bounds.hi, first, last, valid,
                                              min(self.pages, bounds.lo.shape[2]), bs)
            return index, keep, share.mean()
        bounds.add(key, first, last)
        b, h, _, d = query.shape
        kv_heads = key.shape[1]
        scores = page_scores(query.reshape(b, kv_heads, h // kv_heads, d), bounds.lo, bounds.hi).reshape(b, h, -1)
        own = (last - first)[:, None, None] // bs  # [B, 1, 1]
        pages = torch.arange(scores.shape[-1], device=scores.device)
        scores = scores.masked_fill(pages > own, float("-inf"))
        top = scores.topk(min(self.pages, scores.shape[-1]), dim=-1)
        chosen = torch.cat([top.indices, own.expand(b, h, 1)], dim=-1)  # [B, H, pages + 1]
        taken = torch.cat([(top.values > float("-inf")) & (top.indices != own),
                           torch.ones(b, h, 1, dtype=torch.bool, device=key.device)], dim=-1)
        slot = first[:, None, None, None] + chosen[..., None] * bs + torch.arange(bs, device=key.device)
        index = slot.clamp(0, key.shape[-2] - 1).reshape(b, h, -1)
        keep = (taken[..., None] & (slot <= last[:, None, None, None])).reshape(b, h, -1)
        keep &= valid[:, None, :].expand(b, h, -1).gather(2, index)
        density = (taken.sum(-1) / (own[..., 0] + 1)).float().mean()
        return index, keep, density

    def prefill_written(self, key: torch.Tensor, first: torch.Tensor, valid: torch.Tensor, state: dict) -> None:
        fresh = PageBounds.of(key, first, valid, self.block_size)
        kept = _kept(state).get(fresh.cache)
        if kept is None:
            _keep(state, key, fresh)
        else:  # in place: a captured CUDA graph reads these tensors
            kept.lo.copy_(fresh.lo)
            kept.hi.copy_(fresh.hi)


def _cache_id(key: torch.Tensor, page: int) -> tuple:
    """Which cache a set of bounds describes: the tensor's storage, shape and the page size."""
    return key.data_ptr(), tuple(key.shape), page


def _kept(state: dict) -> dict:
    """A layer's page bounds, one set per cache it has decoded from."""
    return state.setdefault("quest", {})


def _keep(state: dict, key: torch.Tensor, bounds: "PageBounds") -> "PageBounds":
    """Keep ``bounds`` for the cache ``key`` for as long as its storage lives. Bounds are never replaced while
    their cache lives (a captured CUDA graph writes into them), and a cache freed lets its bounds go, so a
    new cache at the same address starts afresh."""
    kept = _kept(state)
    kept[bounds.cache] = bounds
    weakref.finalize(key.untyped_storage(), kept.pop, bounds.cache, None)  # the storage: views come and go
    return bounds


@dataclasses.dataclass
class PageBounds:
    """Channel-wise minimum and maximum of the keys of each page of one layer's cache, pages counted from
    each row's first valid slot: ``lo`` and ``hi`` ``[B, Hkv, P, D]`` in float32 (a page with no valid key
    holds +inf and -inf)."""

    cache: tuple
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, key: torch.Tensor, first: torch.Tensor, valid: torch.Tensor, page: int) -> "PageBounds":
        b, kv_heads, length, d = key.shape
        count = -(-length // page)
        slot = first[:, None] + torch.arange(count * page, device=key.device)  # [B, P * page]
        inside = slot < length
        slot = slot.clamp(max=length - 1)
        ok = (inside & valid.gather(1, slot))[:, None, :, None]
        keys = key.gather(2, slot[:, None, :, None].expand(b, kv_heads, -1, d)).float()
        lo = keys.masked_fill(~ok, float("inf")).reshape(b, kv_heads, count, page, d).amin(3)
        hi = keys.masked_fill(~ok, float("-inf")).reshape(b, kv_heads, count, page, d).amax(3)
        return cls(_cache_id(key, page), lo, hi)

    @torch.no_grad()
    def add(self, key: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> None:
        """Update, in place, the bounds of the page that holds slot ``last`` (``[B]``) with its key: widened by
        it, or set to it where the slot starts its page (what the page held before belongs to an earlier
        sequence in a reused cache)."""
        b, kv_heads, _, d = key.shape
        page_size = self.cache[2]
        new = key.gather(2, last[:, None, None, None].expand(b, kv_heads, 1, d)).float()
        offset = (last - first)[:, None, None, None]
        page = (offset // page_size).expand(b, kv_heads, 1, d)
        starts = offset % page_size == 0
        self.lo.scatter_(2, page, torch.where(starts, new, torch.minimum(self.lo.gather(2, page), new)))
        self.hi.scatter_(2, page, torch.where(starts, new, torch.maximum(self.hi.gather(2, page), new)))
