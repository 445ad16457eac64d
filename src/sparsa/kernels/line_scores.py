"""Fused Triton kernels for the column and diagonal scores of the last queries (vertical-slash and FlexPrefill).

Both patterns estimate important key columns and diagonals from the causal
attention of the last ``n`` queries: a column's score is its probability
summed over those queries, a diagonal's the probability along it. With stock
ops the ``n x L`` probabilities are written, padded, skewed and summed (about
4 GB of traffic per 64k-token layer of 32 heads). Here:

* pass 1 (``_row_stats_kernel``): per (head, key chunk), each query's running
  maximum and normaliser over the chunk's keys; the chunks are merged into
  one maximum and normaliser per query with stock ops (``n`` values a head);
* pass 2 (``_line_scores_kernel``): per (head, ``n`` keys), the probabilities of
  a ``2n``-key window, summed down the columns for the window's last ``n``
  keys and, after ``tl.gather`` lines up row ``r`` shifted by ``r``, down the
  diagonals. Nothing of size ``n x L`` reaches memory.

Diagonal ``o`` (keys ``o`` positions before the query) of query ``r`` (at
``L - n + r``) holds key ``L - n + r - o``; pass 2 indexes it by
``u = key - r``, and the caller turns ``u`` back into ``o``.
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton

__all__ = ["HAVE_TRITON", "last_query_line_scores"]

LOG2E = 1.4426950408889634
CHUNK_KEYS = 1024  # the fewest keys per program in pass 1; more where there would be over ~1024 programs


if HAVE_TRITON:

    @triton.jit
    def _scores(q, k_head, keys, skm, dims, q_pos, LK, qk_scale):
        """Scores of the query tile against ``keys`` (log2 units), -inf where causality or the length forbids."""
        ok = (keys >= 0) & (keys < LK)
        k = tl.load(k_head + keys[:, None] * skm + dims[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        return tl.where(ok[None, :] & (keys[None, :] <= q_pos[:, None]), s, float("-inf"))

    @triton.jit
    def _head(q_ptr, k_ptr, H, sqb, sqh, sqm, skb, skh, N: tl.constexpr, D: tl.constexpr):
        """This program's (batch x head) index, its ``N`` queries ``[N, D]`` and its keys' base pointer."""
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        q = tl.load(q_ptr + b * sqb + h * sqh + tl.arange(0, N)[:, None] * sqm + tl.arange(0, D)[None, :])
        return bh, q, k_ptr + b * skb + h * skh

    @triton.jit
    def _row_stats_kernel(q_ptr, k_ptr, max_ptr, sum_ptr, H, LK, FIRST, CHUNKS, qk_scale,
                          sqb, sqh, sqm, skb, skh, skm,
                          N: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr):
        bh, q, k_head = _head(q_ptr, k_ptr, H, sqb, sqh, sqm, skb, skh, N, D)
        chunk = tl.program_id(1)
        dims = tl.arange(0, D)
        rows = tl.arange(0, N)
        q_pos = FIRST + rows
        run_max = tl.full((N,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((N,), dtype=tl.float32)
        for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, LK), BN):
            s = _scores(q, k_head, start + tl.arange(0, BN), skm, dims, q_pos, LK, qk_scale)
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.math.exp2(run_max - safe) + tl.sum(tl.math.exp2(s - safe[:, None]), axis=1)
            run_max = new_max
        out = (bh * CHUNKS + chunk) * N + rows
        tl.store(max_ptr + out, run_max)
        tl.store(sum_ptr + out, run_sum)

    @triton.jit
    def _line_scores_kernel(q_ptr, k_ptr, max_ptr, inv_ptr, col_ptr, diag_ptr, H, LK, FIRST, TILES, qk_scale,
                            sqb, sqh, sqm, skb, skh, skm,
                            N: tl.constexpr, D: tl.constexpr):
        bh, q, k_head = _head(q_ptr, k_ptr, H, sqb, sqh, sqm, skb, skh, N, D)
        t = tl.program_id(1)
        dims = tl.arange(0, D)
        rows = tl.arange(0, N)
        q_pos = FIRST + rows
        row_max = tl.load(max_ptr + bh * N + rows)
        row_inv = tl.load(inv_ptr + bh * N + rows)
        # the window: keys t*N - N .. t*N + N - 1; its last N are this program's columns
        window = t * N - N + tl.arange(0, 2 * N)
        s = _scores(q, k_head, window, skm, dims, q_pos, LK, qk_scale)
        p = tl.math.exp2(s - row_max[:, None]) * row_inv[:, None]  # [N, 2N], 0 where forbidden
        _, right = tl.split(tl.permute(tl.reshape(p, (N, 2, N)), (0, 2, 1)))
        cols = t * N + tl.arange(0, N)
        tl.store(col_ptr + bh * (TILES * N) + cols, tl.sum(right, axis=0))
        # u = key - row runs over t*N - N + c (c < N): row r needs window column c + r
        shifted = tl.gather(p, tl.arange(0, N)[None, :] + rows[:, None], axis=1)
        tl.store(diag_ptr + bh * (TILES * N) + cols, tl.sum(shifted, axis=0))


def last_query_line_scores(q_last: torch.Tensor, k: torch.Tensor, k_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal probability mass ``[B, H, Lk]`` (float32) of the last ``n`` queries' causal softmax.

    ``q_last [B, H, n, D]`` are the queries at positions ``Lk - n .. Lk - 1``
    (``n`` a power of two, at least 16; ``D`` a power of two), ``k [B, H, Lk, D]``.
    Equals :func:`sparsa.attention.vertical_slash.column_and_diagonal_scores`
    of :func:`sparsa.attention.base.last_queries_softmax`.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the line-score kernels need triton: pip install triton")
    b, h, n, d = q_last.shape
    if n & (n - 1) or n < 16 or d & (d - 1) or d < 16 or k.shape[:2] != (b, h) or k.shape[-2] != k_len:
        raise ValueError(f"line scores: q {tuple(q_last.shape)}, k {tuple(k.shape)} do not fit")
    q_last, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_last, k))
    qk_scale = scale * LOG2E
    chunk_keys = max(CHUNK_KEYS, triton.next_power_of_2(-(-k_len * b * h // 1024)))
    chunks = -(-k_len // chunk_keys)
    maxes = torch.empty(b * h, chunks, n, device=k.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    strides = (q_last.stride(0), q_last.stride(1), q_last.stride(2), k.stride(0), k.stride(1), k.stride(2))
    _row_stats_kernel[(b * h, chunks)](q_last, k, maxes, sums, h, k_len, k_len - n, chunks, qk_scale, *strides,
                                       N=n, D=d, BN=64, CHUNK=chunk_keys, num_warps=4)
    row_max = maxes.amax(dim=1)
    total = (sums * torch.exp2(maxes - row_max[:, None, :])).sum(dim=1)  # every query sees key 0: finite maxima
    tiles = k_len // n + 1  # u + n runs over 0 .. Lk
    columns = torch.empty(b * h, tiles * n, device=k.device, dtype=torch.float32)
    shifted = torch.empty_like(columns)
    _line_scores_kernel[(b * h, tiles)](q_last, k, row_max.contiguous(), (1.0 / total).contiguous(), columns, shifted,
                                        h, k_len, k_len - n, tiles, qk_scale, *strides, N=n, D=d, num_warps=8)
    # shifted[x] is diagonal u = x - n, i.e. offset (Lk - n) - u = Lk - x
    diagonals = shifted[:, 1 : k_len + 1].flip(-1)
    return columns[:, :k_len].reshape(b, h, k_len), diagonals.reshape(b, h, k_len)
