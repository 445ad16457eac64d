"""Triton: quest's decode-step choice of pages, in one launch per layer.

:meth:`sparsa.attention.quest.Quest.decode_query_slots` written with stock
operations takes about thirty small kernels per layer (widen the step's
page bounds, bound every page, mask the pages past the query, top-k, turn
pages into slots, check them against the mask). Replayed from a CUDA graph
each launch still costs a microsecond or two, as much as the attention it
saves on a small model. Here one program per (row, query head):

* reads the step's key and updates its own page's bounds with it on the
  fly, widened by it or, where the key starts the page, set to it (the first
  query head of each key-value group also stores them back: the other heads
  of the group compute the same update, so whichever version of the row
  they read, their scores agree);
* bounds every page, ``sum_d max(q_d lo_d, q_d hi_d)``, pages past the
  query's own at ``-inf``, into a scratch row;
* picks the ``PAGES`` highest one at a time (the first of equal scores), and
  writes each chosen page's slots, then the own page's: ``index`` and
  ``keep`` ``[B, H, (PAGES + 1) * BS]``, as the stock version does.

The stock version stays the reference (and the path on a CPU).
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton

__all__ = ["HAVE_TRITON", "select_pages"]

BLOCK_P = 64  # pages scored per step of the loop


if HAVE_TRITON:

    @triton.jit
    def _page_slots(index_ptr, keep_ptr, valid_ptr, out_at, b, first, limit, page, L, svb, BS: tl.constexpr):
        """Write one page's slots: ``index`` (clamped into the cache) and ``keep`` (up to slot ``limit``: -1 for a
        page not taken)."""
        s = tl.arange(0, BS)
        slot = first + page * BS + s
        inside = slot < L
        clamped = tl.minimum(slot, L - 1)
        seen = tl.load(valid_ptr + b * svb + clamped) != 0
        tl.store(index_ptr + out_at + s, clamped)
        tl.store(keep_ptr + out_at + s, (inside & (slot <= limit) & seen).to(tl.int8))

    @triton.jit
    def _select_pages_kernel(q_ptr, k_ptr, lo_ptr, hi_ptr, first_ptr, last_ptr, valid_ptr, scores_ptr,
                             index_ptr, keep_ptr, share_ptr, H, G, P, L, PAGES,
                             sqb, sqh, skb, skh, skm, slb, slh, slp, svb,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)  # b * H + query head
        b = (pid // H).to(tl.int64)
        h = pid % H
        kvh = (h // G).to(tl.int64)
        first = tl.load(first_ptr + b)
        last = tl.load(last_ptr + b)
        own = (last - first) // BS
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sqb + h * sqh + d, mask=d_ok, other=0.0).to(tl.float32)
        new = tl.load(k_ptr + b * skb + kvh * skh + last * skm + d, mask=d_ok, other=0.0).to(tl.float32)
        scores = scores_ptr + pid.to(tl.int64) * P
        stored = tl.where(h % G == 0, own, -1)  # the page whose updated bounds this program stores: its group's first
        begun = tl.where((last - first) % BS == 0, own, -1)  # the page this step's key starts: set, not widened
        for start in range(0, P, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            p_ok = p < P
            tile = p_ok[:, None] & d_ok[None, :]
            at = b * slb + kvh * slh + p[:, None].to(tl.int64) * slp + d[None, :]
            lo = tl.load(lo_ptr + at, mask=tile, other=0.0)
            hi = tl.load(hi_ptr + at, mask=tile, other=0.0)
            mine = (p == own)[:, None]
            fresh = (p == begun)[:, None]
            lo = tl.where(fresh, new[None, :], tl.where(mine, tl.minimum(lo, new[None, :]), lo))
            hi = tl.where(fresh, new[None, :], tl.where(mine, tl.maximum(hi, new[None, :]), hi))
            widen = tile & (p == stored)[:, None]
            tl.store(lo_ptr + at, lo, mask=widen)
            tl.store(hi_ptr + at, hi, mask=widen)
            s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
            tl.store(scores + p, tl.where(p <= own, s, float("-inf")), mask=p_ok)
        tl.debug_barrier()
        n = (PAGES + 1) * BS
        out = pid.to(tl.int64) * n
        count = 1.0  # the own page
        for j in range(PAGES):
            best = tl.max(tl.full((BLOCK_P,), float("-inf"), tl.float32), axis=0)
            best_p = tl.max(tl.full((BLOCK_P,), -1, tl.int64), axis=0)
            for start in range(0, P, BLOCK_P):
                p = start + tl.arange(0, BLOCK_P)
                s = tl.load(scores + p, mask=p < P, other=float("-inf"))
                m = tl.max(s, axis=0)
                at_max = start + tl.argmax(s, axis=0, tie_break_left=True).to(tl.int64)
                better = m > best
                best_p = tl.where(better, at_max, best_p)
                best = tl.where(better, m, best)
            tl.debug_barrier()
            tl.store(scores + best_p, float("-inf"), mask=best_p >= 0)
            tl.debug_barrier()
            taken = (best > float("-inf")) & (best_p != own)
            count += taken.to(tl.float32)
            _page_slots(index_ptr, keep_ptr, valid_ptr, out + j * BS, b, first, tl.where(taken, last, -1),
                        tl.maximum(best_p, 0), L, svb, BS)
        _page_slots(index_ptr, keep_ptr, valid_ptr, out + PAGES * BS, b, first, last, own, L, svb, BS)
        tl.store(share_ptr + pid, count / (own + 1).to(tl.float32))


def select_pages(q: torch.Tensor, key: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, first: torch.Tensor,
                 last: torch.Tensor, valid: torch.Tensor, pages: int, block: int):
    """One decode step's choice of pages per query head: ``(index, keep, share)``, ``share`` ``[B, H]`` the
    kept pages over the pages up to the query's. Updates ``lo`` and ``hi`` in place with the step's key.

    ``q`` ``[B, H, 1, D]``; ``key`` the cache ``[B, Hkv, L, D]``; ``lo``, ``hi`` ``[B, Hkv, P, D]`` float32
    with unit stride over ``D``; ``first``, ``last`` ``[B]``; ``valid`` ``[B, L]`` (any strides over B).
    """
    if not HAVE_TRITON:
        raise RuntimeError("select_pages needs triton: pip install triton")
    bsz, heads, _, dim = q.shape
    kv_heads, length = key.shape[1], key.shape[2]
    count = lo.shape[2]
    if q.stride(-1) != 1 or key.stride(-1) != 1 or lo.stride(-1) != 1 or lo.stride() != hi.stride():
        raise ValueError("select_pages: the query's, the cache's and the bounds' head dimension must be contiguous")
    n = (pages + 1) * block
    index = torch.empty((bsz, heads, n), dtype=torch.int64, device=q.device)
    keep = torch.empty((bsz, heads, n), dtype=torch.bool, device=q.device)
    share = torch.empty((bsz, heads), dtype=torch.float32, device=q.device)
    scores = torch.empty((bsz * heads, count), dtype=torch.float32, device=q.device)
    valid = valid if valid.stride(-1) == 1 else valid.contiguous()
    valid = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    _select_pages_kernel[(bsz * heads,)](
        q, key, lo, hi, first, last, valid, scores, index, keep.view(torch.int8), share,
        heads, heads // kv_heads, count, length, pages,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        lo.stride(0), lo.stride(1), lo.stride(2), valid.stride(0),
        D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_P=BLOCK_P, BS=block, num_warps=2)
    return index, keep, share
