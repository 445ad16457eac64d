"""A fused Triton kernel for antidiagonal block scoring (the estimate of :mod:`sparsa.attention.antidiagonal`).

The estimate is a causal softmax over strided scores
``s[i, j] = sum_t q[iS+t] . k[jS+S-1-t]`` (a GEMM with inner dimension
``S * D``), summed per (query block, key block). Done with stock ops, the
``(L/S)^2`` float32 scores go to memory and back several times; here one
program owns ``BM`` strided query rows and walks their causal key tiles once:

* per tile it keeps the tile's row maximum ``m_t`` and the per-key-block sums
  of ``exp(s - m_t)`` (``[BM, BN / PER]``, ``PER = block / S`` strided columns a
  block), writes both to a scratch area, and folds the tile into the row's
  running maximum and normaliser;
* after the last tile, the row's softmax is known: it rereads its own scratch
  (still in L2), rescales every tile by ``exp(m_t - max) / sum``, and adds the
  ``PER`` rows of each query block together.

The scratch holds ``BM x KB`` floats per program, not ``BM x (L/S)``. Queries
and keys are read as ``[B*H, L/S, S*D]`` views through TMA tensor descriptors
(rows past a head read as zeros); on an H100 that, and a 128 x 256 score tile,
make the kernel about 2.5x faster than the stock ops at 64k tokens (measured in
``benchmarks/attention_speed.py``). Triton is imported here only, and guarded,
like the other kernels.

With ``fp8=True`` (GPUs of compute capability 8.9 on) the strided rows are
first scaled so that each row's largest magnitude is 448 and cast to e4m3
(:func:`fp8_rows`, one Triton pass); the GEMM then runs at twice the bf16
tensor-core rate and the epilogue multiplies each score by its row and column
scales. :func:`fp8_rows_reference` is the same rounding with stock ops (the
definition, and the CPU path).
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, TensorDescriptor, row_tile, tl, triton

__all__ = ["E4M3_MAX", "HAVE_TRITON", "antidiagonal_block_mass", "fp8_ready", "fp8_rows", "fp8_rows_reference"]

LOG2E = 1.4426950408889634
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` as the fp8 path sees it (float32): each row scaled to a largest magnitude of 448, rounded to e4m3, scaled back."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, E4M3_MAX / amax, torch.ones_like(amax))
    return (x * inv).to(torch.float8_e4m3fn).float() / inv


def fp8_ready(x: torch.Tensor) -> bool:
    """Whether the fused kernel can score in fp8 here: Triton and a GPU with fp8 tensor cores (compute capability 8.9 on)."""
    return HAVE_TRITON and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


if HAVE_TRITON:

    @triton.jit
    def _fp8_rows_kernel(x_ptr, y_ptr, scale_ptr, R, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, ok, offsets = row_tile(R, N, ROWS, BLOCK_N)
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        inv = tl.where(amax > 0, 448.0 / amax, 1.0)  # E4M3_MAX
        tl.store(y_ptr + offsets, (x * inv[:, None]).to(tl.float8e4nv), mask=ok)
        tl.store(scale_ptr + rows, 1.0 / inv, mask=rows < R)

    @triton.jit
    def _antidiagonal_kernel(
        q_desc, k_desc, q_scale_ptr, k_scale_ptr, part_ptr, tmax_ptr, out_ptr,
        R, ROW0, LK, TILES, KB, KROWS, qk_scale,
        S: tl.constexpr, D: tl.constexpr, PER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        HEAD_MAJOR: tl.constexpr, SCALED: tl.constexpr,
    ):
        # the longest rows first: the causal tail balances. HEAD_MAJOR: one head's row tiles run together and
        # read its keys from L2 (else the same row tile of every head does). int64: scratch offsets pass 2^31
        if HEAD_MAJOR:
            bh = tl.program_id(1).to(tl.int64)
            tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
        else:
            bh = tl.program_id(0).to(tl.int64)
            tile_m = tl.num_programs(1) - 1 - tl.program_id(1)
        rows = tile_m * BM + tl.arange(0, BM)  # strided rows of this program (local to q)
        abs_rows = ROW0 + rows  # ... and their absolute strided index
        row_ok = rows < R
        BPT: tl.constexpr = BN // PER  # key blocks per column tile
        part_row = part_ptr + (bh * R + rows) * KB
        tmax_row = tmax_ptr + (bh * R + rows) * TILES
        # causal: the column tiles up to this program's last row
        last_col = tl.minimum(ROW0 + tile_m * BM + BM - 1, (LK - 1) // S)
        n_tiles = last_col // BN + 1
        run_max = tl.full((BM,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BM,), dtype=tl.float32)
        for tile_n in tl.range(0, n_tiles, flatten=True):  # one flat loop: loads run ahead across tiles
            cols = tile_n * BN + tl.arange(0, BN)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(0, S * D, BK):
                t = kk // D  # which of the S pairs: query iS+t meets key jS+S-1-t
                d0 = kk % D
                # row i of the [R, S*D] view is queries iS..iS+S-1 side by side; the keys' view is read
                # at chunk S-1-t, which pairs key jS+S-1-t with query iS+t (rows past the head read as 0)
                qt = q_desc.load([bh.to(tl.int32), tile_m * BM, t * D + d0]).reshape(BM, BK)
                kt = k_desc.load([bh.to(tl.int32), tile_n * BN, (S - 1 - t) * D + d0]).reshape(BN, BK)
                acc = tl.dot(qt, tl.trans(kt), acc)
            if SCALED:  # fp8 rows: each carries its scale
                q_scale = tl.load(q_scale_ptr + bh * R + rows, mask=row_ok, other=0.0)
                k_scale = tl.load(k_scale_ptr + bh * KROWS + cols, mask=cols < KROWS, other=0.0)
                acc = acc * (q_scale[:, None] * k_scale[None, :])
            s = acc * qk_scale  # log2 units
            allowed = (cols[None, :] <= abs_rows[:, None]) & (cols * S < LK)[None, :]
            s = tl.where(allowed, s, float("-inf"))
            m_t = tl.max(s, axis=1)
            m_safe = tl.where(m_t == float("-inf"), 0.0, m_t)
            p = tl.math.exp2(s - m_safe[:, None])
            block_sums = tl.sum(tl.reshape(p, (BM, BPT, PER)), axis=2)  # [BM, BPT]
            tl.store(part_row[:, None] + tile_n * BPT + tl.arange(0, BPT)[None, :], block_sums, mask=row_ok[:, None])
            tl.store(tmax_row + tile_n, m_t, mask=row_ok)
            new_max = tl.maximum(run_max, m_t)  # finite from the first tile on: column 0 is always allowed
            run_sum = run_sum * tl.math.exp2(run_max - new_max) + tl.sum(p, axis=1) * tl.math.exp2(m_safe - new_max)
            run_max = new_max
        inv = 1.0 / run_sum
        QPB: tl.constexpr = BM // PER  # query blocks of this program
        qblocks = tile_m * QPB + tl.arange(0, QPB)
        out_row = out_ptr + (bh * (R // PER) + qblocks) * KB
        for tile_n in range(0, n_tiles):
            kblocks = tile_n * BPT + tl.arange(0, BPT)
            sums = tl.load(part_row[:, None] + kblocks[None, :], mask=row_ok[:, None], other=0.0)
            m_t = tl.load(tmax_row + tile_n, mask=row_ok, other=float("-inf"))
            weight = tl.where(m_t == float("-inf"), 0.0, tl.math.exp2(m_t - run_max) * inv)
            probs = sums * weight[:, None]
            mass = tl.sum(tl.reshape(probs, (QPB, PER, BPT)), axis=1)  # [QPB, BPT]
            tl.store(out_row[:, None] + kblocks[None, :], mass, mask=(qblocks < R // PER)[:, None])


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., n]`` (CUDA) as e4m3 rows scaled to a largest magnitude of 448, and each row's scale (float32,
    ``x ~ y * scale``): :func:`fp8_rows_reference` in one pass."""
    if not HAVE_TRITON:
        raise RuntimeError("fp8_rows needs triton: pip install triton")
    n = x.shape[-1]
    flat = x.reshape(-1, n).contiguous()
    y = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    block_n = max(16, triton.next_power_of_2(n))
    rows = max(1, 8192 // block_n)
    if flat.numel():
        _fp8_rows_kernel[(triton.cdiv(flat.shape[0], rows),)](flat, y, scale, flat.shape[0], n, ROWS=rows, BLOCK_N=block_n)
    return y.reshape(x.shape), scale.reshape(x.shape[:-1])


def antidiagonal_block_mass(qp: torch.Tensor, kp: torch.Tensor, stride: int, block: int, row0: int, k_len: int,
                            scale: float, *, fp8: bool = False, tile: tuple[int, int, int] | None = None,
                            num_warps: int = 8, num_stages: int = 3, head_major: bool = True) -> torch.Tensor:
    """Per (query block, key block) the summed strided softmax ``[B, H, QB, KB]`` (float32), each row summing to ``block / stride``.

    ``qp [B, H, QB * block, D]`` and ``kp [B, H, KB * block, D]`` are
    block-aligned (padded); ``row0`` is the absolute strided index of qp's
    first strided row; keys from ``k_len`` on do not exist; ``scale``
    multiplies the strided dot products. ``fp8``: score with e4m3 rows (see the
    module notes; needs :func:`fp8_ready`). ``head_major`` launches one head's
    row tiles together (its keys are then read from L2, not memory) rather
    than the same row tile of every head.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the antidiagonal scoring kernel needs triton: pip install triton")
    b, h, lq, d = qp.shape
    per = block // stride
    kb = kp.shape[-2] // block
    rows = lq // stride
    if d % 16 or lq % block or kp.shape[-2] % block or block % stride or kp.shape[:2] != (b, h):
        raise ValueError(f"antidiagonal scoring: q {tuple(qp.shape)}, k {tuple(kp.shape)}, block {block}, stride {stride} do not fit")
    if tile is None:  # measured on an H100 at 64k tokens (k-steps of 128 bytes); smaller where shared memory is
        big = torch.cuda.get_device_properties(qp.device).shared_memory_per_block_optin >= 200 * 1024 if qp.is_cuda else True
        step = 128 if fp8 else 64
        tile, num_warps, num_stages = ((128, 256, step), 8, 3 if fp8 else 4) if big else ((128, 128, step), 8, 3)
    bm, bn, bk = max(tile[0], per), max(tile[1], per), min(tile[2], d & -d)  # whole blocks a tile; bk divides d
    tiles = -(-(kb * per) // bn)
    # [B*H, rows, S*D] views (a free reshape of contiguous inputs), read through TMA descriptors
    q3 = qp.contiguous().reshape(b * h, rows, stride * d)
    k3 = kp.contiguous().reshape(b * h, kb * per, stride * d)
    q_scale = k_scale = None
    if fp8:
        if not fp8_ready(qp):
            raise ValueError("antidiagonal scoring in fp8 needs a GPU of compute capability 8.9 or later")
        (q3, q_scale), (k3, k_scale) = fp8_rows(q3), fp8_rows(k3)
    q_desc = TensorDescriptor.from_tensor(q3, [1, bm, bk])
    k_desc = TensorDescriptor.from_tensor(k3, [1, bn, bk])
    part = torch.empty(b * h, rows, tiles * (bn // per), device=qp.device, dtype=torch.float32)
    tmax = torch.empty(b * h, rows, tiles, device=qp.device, dtype=torch.float32)
    out = torch.zeros(b, h, lq // block, part.shape[-1], device=qp.device, dtype=torch.float32)
    grid = (-(-rows // bm), b * h) if head_major else (b * h, -(-rows // bm))
    _antidiagonal_kernel[grid](
        q_desc, k_desc, q_scale, k_scale, part, tmax, out,
        rows, row0, k_len, tiles, part.shape[-1], kb * per, scale * LOG2E,
        S=stride, D=d, PER=per, BM=bm, BN=bn, BK=bk, HEAD_MAJOR=head_major, SCALED=fp8, num_warps=num_warps, num_stages=num_stages,
    )
    return out[..., :kb]
