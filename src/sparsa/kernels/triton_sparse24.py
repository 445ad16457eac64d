"""Triton kernels for small batches: ``y[M, N] = x[M, K] @ W^T`` with W 2:4 sparse.

W arrives compressed (see :mod:`sparsa.kernels.sparse24` for the layout):
``values`` ``[N, Kp/2]`` (the two kept values of every group of four inputs)
and ``meta`` ``uint8 [N, Kp/8]`` (two 2-bit positions per group, in an order
chosen for these kernels). The kernels never materialise W in memory. They
read the values as int32 (one per group: both kept values), the metadata as
int32 words (eight groups each) and x as int64 words of four inputs
(``gemv``) or as 16-bit tiles (``mma``), so every load is at least 4 bytes
wide and Triton's pipeliner can stream it asynchronously (``num_stages``).
Rows and tokens past the end wrap around (their results are not stored),
and when the K steps cover the groups exactly (``EVEN``: the usual case) no
load in the loop is masked at all.

``mma`` (any M, tokens padded to ``BLOCK_M`` >= 16): a program owns
``BLOCK_N`` output features and ``BLOCK_M`` tokens and walks its share of K
``BLOCK_K`` inputs at a time. It rebuilds the dense ``[BLOCK_N, BLOCK_K]``
weight tile in registers (each group's four weights are two 32-bit words,
each one byte permute of the kept pair and zero) and multiplies it on the
tensor cores with the ``[BLOCK_K, BLOCK_M]`` tile of x, accumulating in
float32. The tile built in one step is multiplied in the next, which keeps
it in shared memory, where the tensor cores read it, instead of in
registers that would have to be stored and shuffled again.

``gemv`` (the decode step, one token per program): no tensor cores; each kept
value is multiplied by the x element its 2-bit position names (both of a
group's picked out of its int64 word by one byte permute, ``prmt``) and
accumulated in float32. On an H200 this loop is bound by its instruction
count, not by memory, so the metadata layout and the mask-free loop are
there to keep that count low: about 14 instructions per group of four
inputs in the compiled loop, half of what the first version needed.

Split-K: with few output tiles (tall-skinny layers, decode), ``split_k``
programs share a tile's K range and the last to arrive sums the partials in
the same launch (:mod:`sparsa.kernels.splitk`). ``split_k`` is a runtime
argument: it costs no recompilation (the GEMV's all-at-once sum compiles once
per power of two).

Triton is imported here only, and guarded; the rest of the package imports
this module lazily, so CPU machines without Triton work.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ._triton import HAVE_TRITON, tl, triton
from .launch import DRIVER_LAUNCH, DriverLaunch, LaunchError
from .splitk import finish, workspace

__all__ = [
    "GEMV_SHAPES",
    "HAVE_TRITON",
    "KERNEL_SHAPES",
    "MMA_SHAPES",
    "PreparedCall",
    "TRITON_MAX_M",
    "TritonConfig",
    "block_m_for",
    "candidate_configs",
    "default_config",
    "sparse24_matmul",
]

# Token counts above this are left to cuSPARSELt or dense: the kernel rebuilds
# the weight for every BLOCK_M tokens, which stops paying off long before.
TRITON_MAX_M = 256

# (block_n, block_k, num_warps, num_stages). Each is one compilation per dtype
# (and per BLOCK_M for "mma"); split_k is a runtime argument and costs none.
# "mma": tensor cores, tokens padded to BLOCK_M >= 16 (the fastest at Llama-3-8B
# shapes and 16-128 tokens on an H200 were all among these).
MMA_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 4, 2),
    (128, 128, 4, 2),  # not with BLOCK_M = 64: out of registers
    (128, 128, 8, 3),
)
# "gemv": one token per program, no tensor cores: the decode step (M = 1..4). The
# fastest at every Llama-3 8B/70B shape on an H200, fp16 and bf16, within 5%.
GEMV_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (16, 512, 4, 3),
    (16, 512, 4, 4),
    (16, 512, 4, 2),
    (16, 256, 4, 4),
    (32, 256, 4, 4),
    (32, 512, 8, 4),
)
KERNEL_SHAPES = {"mma": MMA_SHAPES, "gemv": GEMV_SHAPES}
SPLITS = (1, 2, 4, 8)
GEMV_MAX_M = 4  # gemv runs a program per token, re-reading the weight tile (from L2)
# the kernels' byte permutes are NVIDIA PTX: not under Triton's interpreter, not on ROCm
_PRMT = os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None
# PreparedCall launches compiled kernels with every argument in signature order, constexprs included: what
# Triton 3's launchers take (read in 3.6 and 3.9); other versions always go through kernel[grid](...)
_DIRECT_LAUNCH = HAVE_TRITON and triton.__version__.split(".")[0] == "3"
# ... and, where the compiled kernel allows, through the CUDA driver itself (unless launch.DRIVER_LAUNCH is off)


@dataclass(frozen=True)
class TritonConfig:
    kind: str  # "mma" or "gemv"
    block_n: int
    block_k: int  # dense input columns per step: 4 * BLOCK_G groups, BLOCK_G a multiple of 8 (whole metadata words)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def key(self) -> str:
        return f"{self.kind}-n{self.block_n}-k{self.block_k}-s{self.split_k}-w{self.num_warps}-p{self.num_stages}"

    @classmethod
    def from_key(cls, key: str) -> "TritonConfig":
        kind, *parts = key.split("-")
        fields = {part[0]: int(part[1:]) for part in parts}
        return cls(kind, fields["n"], fields["k"], fields["s"], fields["w"], fields["p"])

    def as_dict(self) -> dict:
        return asdict(self)


def block_m_for(m: int) -> int:
    """Tokens per "mma" program: the tensor-core minimum 16, up to 64."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _splits(tiles: int, k: int, block_k: int, sms: int) -> list[int]:
    """split_k = 1, then the factors that first give about four programs per SM.

    Never fewer than two K steps per split, never more than eight programs per SM.
    """
    out = [1]
    for split in SPLITS[1:]:
        if tiles * (split // 2) >= 4 * sms or tiles * split > 8 * sms or k // split < 2 * block_k:
            break
        out.append(split)
    return out


def candidate_configs(m: int, n: int, k: int, sms: int = 132) -> list[TritonConfig]:
    """The configurations worth timing for ``m`` tokens of an ``(n, k)`` layer."""
    out: list[TritonConfig] = []
    kinds = ("gemv", "mma") if m <= GEMV_MAX_M else ("mma",)
    for kind in kinds:
        for bn, bk, warps, stages in KERNEL_SHAPES[kind]:
            if kind == "mma" and block_m_for(m) == 64 and (bn, warps) == (128, 4):
                continue
            tiles = _cdiv(n, bn) * (m if kind == "gemv" else _cdiv(m, block_m_for(m)))
            splits = _splits(tiles, k, bk, sms) if m <= 64 else [1]
            out.extend(TritonConfig(kind, bn, bk, split, warps, stages) for split in splits)
    return out


def default_config(m: int, n: int, k: int, sms: int = 132) -> TritonConfig:
    """A reasonable configuration without measuring (the dispatcher measures)."""
    kind = "gemv" if m <= GEMV_MAX_M else "mma"
    bn, bk, warps, stages = KERNEL_SHAPES[kind][1 if kind == "gemv" else 0]
    tiles = _cdiv(n, bn) * (m if kind == "gemv" else _cdiv(m, block_m_for(m)))
    # the GEMV keeps the memory pipes busy from about one tile per SM (H200 measurements)
    split = 1 if m > 64 or (kind == "gemv" and tiles >= sms) else _splits(tiles, k, bk, sms)[-1]
    return TritonConfig(kind, bn, bk, split, warps, stages)


if HAVE_TRITON:

    @triton.jit
    def _load_weights(pair_rows, word_rows, g0, G, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
        """Groups g0 .. g0+BLOCK_G-1 of the tile's rows: kept values (int32, both of a group) and metadata words.

        The words are loaded once (eight groups each) and repeated in registers, so
        ``word[:, i]`` is group ``g0 + i``'s word. The rows are always in range
        (callers wrap them); with ``EVEN`` the groups are too, and nothing is masked.
        """
        g = g0 + tl.arange(0, BLOCK_G)
        gw = g0 // 8 + tl.arange(0, BLOCK_G // 8)
        if EVEN:
            pairs = tl.load(pair_rows + g[None, :])
            words = tl.load(word_rows + gw[None, :])
        else:
            pairs = tl.load(pair_rows + g[None, :], mask=(g < G)[None, :], other=0)
            words = tl.load(word_rows + gw[None, :], mask=(gw < G // 8)[None, :], other=0)
        word = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, BLOCK_G // 8, 8)), (BLOCK_N, BLOCK_G))
        return pairs, word

    @triton.jit
    def _meta_shifts(BLOCK_G: tl.constexpr):
        """Where each of BLOCK_G consecutive groups (from a multiple of 8) finds its positions in its word."""
        j = tl.arange(0, BLOCK_G) % 8
        return (16 * (j % 2) + 2 * (j // 2))[None, :]

    @triton.jit
    def _unpack2(word, dt: tl.constexpr):
        """The two 16-bit floats of int32 ``word`` (low half first) as float32.

        A bfloat16 is the top half of a float32, so for bf16 moving it there is
        the whole conversion: one integer operation each.
        """
        if dt == tl.bfloat16:
            return (word << 16).to(tl.float32, bitcast=True), (word & -65536).to(tl.float32, bitcast=True)
        return word.to(tl.int16).to(dt, bitcast=True).to(tl.float32), (word >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)

    @triton.jit
    def _pick_inputs(xq, positions, dt: tl.constexpr, PRMT: tl.constexpr):
        """x at each kept value's position, as float32: ``x[4g + first]`` and ``x[4g + second]``.

        ``xq`` [BLOCK_G] holds each group's four 16-bit inputs, ``positions``
        [BLOCK_N, BLOCK_G] each row's first position in bits 0-1 and second in
        bits 8-9 (``(word >> shift) & 0x0303``). With ``PRMT``, one multiply-add
        makes that the selector of a byte permute (``prmt``), which picks both
        16-bit inputs out of the group's two 32-bit halves: position p becomes
        the byte pair (2p, 2p+1), i.e. the selector nibbles 0x10 + 0x22 p. The
        GEMV's loop is bound by instructions on an H200, not by bytes, so this
        count matters. The permute is NVIDIA PTX: Triton's interpreter and ROCm
        take compare-and-select chains, which give the same values.
        """
        lo = xq.to(tl.int32)[None, :]
        hi = (xq >> 32).to(tl.int32)[None, :]
        if PRMT:
            selector = positions * 0x22 + 0x1010
            both = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, selector],
                                             dtype=tl.int32, is_pure=True, pack=1)
            return _unpack2(both, dt)
        first = positions & 3  # 0..2
        second = positions >> 8  # 1..3
        x0, x1 = _unpack2(lo, dt)
        x2, x3 = _unpack2(hi, dt)
        xa = tl.where(first == 0, x0, tl.where(first == 1, x1, x2))
        xb = tl.where(second == 3, x3, tl.where(second == 2, x2, x1))
        return xa, xb

    # The selectors of the weight-tile builder's byte permutes (see _dense_words). prmt.b4e with control c
    # (0..3) writes source byte (c - i) mod 8 to byte i; with both sources one of these constants, byte 0
    # lands in byte c and the equal other bytes fill the rest. First: 0x10 (the first kept value) at byte
    # `first`, 0x76 elsewhere; second: 0x32 (the second value) at byte `second`, 0x54 elsewhere. Their AND
    # picks, per output byte pair, the first value, the second, or 0x54: bytes of the zero operand.
    _SEL_FIRST, _SEL_SECOND = tl.constexpr(0x76767610), tl.constexpr(0x54545432)
    _DENSE_WORDS_ASM = tl.constexpr(f"""{{
    .reg .b32 f, s, sel, selh;
    shr.b32 f, $3, $4;
    shr.b32 s, $3, $5;
    prmt.b32.b4e f, $6, {_SEL_FIRST.value:#x}, f;
    prmt.b32.b4e s, $7, {_SEL_SECOND.value:#x}, s;
    and.b32 sel, f, s;
    shr.b32 selh, sel, 16;
    prmt.b32 $0, $2, 0, sel;
    prmt.b32 $1, $2, 0, selh;
    }}""")

    @triton.jit
    def _selector_constants(N, PRMT: tl.constexpr):
        """``_SEL_FIRST`` and ``_SEL_SECOND`` as per-thread run-time values (``N >= 0``, so ``N >> 31 == 0``).

        As immediates, or as warp-uniform values, ptxas copies them into a register
        again before every permute: one more instruction per group each.
        """
        zero = N >> 31
        if PRMT:
            tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [zero], dtype=tl.int32, is_pure=True, pack=1)
            zero = (N + tid) >> 31
        return zero + _SEL_FIRST, zero + _SEL_SECOND

    @triton.jit
    def _dense_words(pairs, word, shifts, sel_first, sel_second, PRMT: tl.constexpr):
        """Each group's four dense weights as two int32 words: inputs 0, 1 (``lo``) and 2, 3 (``hi``), low half first.

        With ``PRMT`` each word is one byte permute of the group's kept pair and
        zero, whose selector two ``prmt.b4e`` lookups make from the positions (the
        two low bits of ``word >> shift`` and of ``word >> (shift + 8)``: no masks):
        eight instructions per group. Triton's interpreter and ROCm take
        compare-and-select chains, which give the same words.
        """
        if PRMT:
            lo, hi = tl.inline_asm_elementwise(_DENSE_WORDS_ASM, "=r,=r,r,r,r,r,r,r",
                                               [pairs, word, shifts, shifts + 8, sel_first, sel_second],
                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            positions = (word >> shifts) & 0x0303
            first = positions & 3  # 0..2
            second = positions >> 8  # 1..3
            v0 = pairs & 0xFFFF
            v1 = (pairs >> 16) & 0xFFFF
            d1 = tl.where(first == 1, v0, tl.where(second == 1, v1, 0))
            d2 = tl.where(first == 2, v0, tl.where(second == 2, v1, 0))
            lo = tl.where(first == 0, v0, 0) | (d1 << 16)
            hi = d2 | (tl.where(second == 3, v1, 0) << 16)
        return lo, hi

    @triton.jit
    def _dense_tile(pairs, word, shifts, sel_first, sel_second, dt: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_G: tl.constexpr, PRMT: tl.constexpr):
        """The dense ``[BLOCK_N, 4 * BLOCK_G]`` weight tile of ``BLOCK_G`` groups, in dtype ``dt``."""
        lo, hi = _dense_words(pairs, word, shifts, sel_first, sel_second, PRMT)
        w32 = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_G))
        w16 = tl.reshape(tl.join(w32.to(tl.int16), (w32 >> 16).to(tl.int16)), (BLOCK_N, 4 * BLOCK_G))
        return w16.to(dt, bitcast=True)

    @triton.jit
    def _load_x(x_cols, g0, KG, offs_k, EVEN: tl.constexpr):
        """Inputs ``4 g0 .. 4 g0 + BLOCK_K`` of the program's tokens: a ``[BLOCK_K, BLOCK_M]`` tile."""
        k = 4 * g0 + offs_k
        if EVEN:
            return tl.load(x_cols + k[:, None])
        return tl.load(x_cols + k[:, None], mask=(k < 4 * KG)[:, None], other=0.0)

    @triton.jit(do_not_specialize=["M", "N", "KG", "G", "split_k", "steps_per_split"])
    def _sparse24_mma_kernel(
        xq_ptr, pairs_ptr, words_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
        M, N, KG, G,
        stride_xm, stride_pn, stride_wn, stride_ym,
        split_k, steps_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
        NUM_STAGES: tl.constexpr, EVEN: tl.constexpr, PRMT: tl.constexpr,
    ):
        # xq: x as int64, one word = the 4 inputs of a group (here read as 16-bit values); pairs: int32 =
        # the 2 kept values of a group; words: int32 = the metadata of 8 consecutive groups
        # (layout: sparsa.kernels.sparse24). EVEN: the splits cover the G groups exactly and x has all of
        # them (KG == G): no masks in the loop.
        pid_m = tl.program_id(0)  # token blocks vary fastest: programs sharing a weight tile run together
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        dt = y_ptr.dtype.element_ty
        BLOCK_K: tl.constexpr = 4 * BLOCK_G

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_g = tl.arange(0, BLOCK_G)
        shifts = _meta_shifts(BLOCK_G)

        # this program's groups: [g_begin, g_end), clipped to G by the masks unless EVEN (only the
        # last split can overrun, and it has the least work); g_begin is a multiple of BLOCK_G,
        # which the compiler sees, so the value loads are wide
        g_begin = pid_k * steps_per_split * BLOCK_G
        g_end = g_begin + steps_per_split * BLOCK_G

        # rows and tokens past the end wrap around (in range, so unmasked); their results are not stored
        pair_rows = pairs_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_pn
        word_rows = words_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn
        x16_ptr = xq_ptr.to(tl.pointer_type(dt), bitcast=True)
        x_cols = x16_ptr + (offs_m % M)[None, :].to(tl.int64) * (stride_xm * 4)
        sel_first, sel_second = _selector_constants(N, PRMT)

        # The tile built in one step is multiplied in the next: a loop-carried operand reaches the
        # tensor cores from shared memory (one store per step) rather than from registers (store,
        # reload and shuffles). Step 0 multiplies a zero tile, so that every weight load is in the
        # software-pipelined loop, and the last tile is multiplied after it. The zero tile is built
        # from run-time zeros: from a constant the compiler would keep the carried tile as 16-bit
        # registers and repack it in every step.
        zero = (offs_n[:, None] * BLOCK_G + offs_g[None, :]) * (N >> 31)
        w = _dense_tile(zero, zero, shifts, sel_first, sel_second, dt, BLOCK_N, BLOCK_G, PRMT)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for g0 in tl.range(g_begin, g_end, BLOCK_G, num_stages=NUM_STAGES):
            xt = _load_x(x_cols, tl.maximum(g0 - BLOCK_G, g_begin), KG, offs_k, EVEN)
            pairs, word = _load_weights(pair_rows, word_rows, g0, G, BLOCK_N, BLOCK_G, EVEN)
            acc = tl.dot(w, xt, acc)
            w = _dense_tile(pairs, word, shifts, sel_first, sel_second, dt, BLOCK_N, BLOCK_G, PRMT)
        acc = tl.dot(w, _load_x(x_cols, g_end - BLOCK_G, KG, offs_k, EVEN), acc)

        tile = pid_n * tl.num_programs(0) + pid_m
        finish(acc, y_ptr, bias_ptr, ws_ptr, count_ptr, offs_n, offs_m, M, N, stride_ym, tile, pid_k, split_k, HAS_BIAS)

    @triton.jit(do_not_specialize=["M", "N", "KG", "G", "split_k", "steps_per_split"])
    def _sparse24_gemv_kernel(
        xq_ptr, pairs_ptr, words_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
        M, N, KG, G,
        stride_xm, stride_pn, stride_wn, stride_ym,
        split_k, steps_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr,
        EVEN: tl.constexpr, SUM_AT_ONCE: tl.constexpr, PRMT: tl.constexpr,
    ):
        # One token per program (grid axis 0): no tensor cores; each kept value meets the
        # x element its 2-bit position names (see _pick_inputs). Arguments as in the mma kernel.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        dt = y_ptr.dtype.element_ty

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, BLOCK_G)
        shifts = _meta_shifts(BLOCK_G)

        g_begin = pid_k * steps_per_split * BLOCK_G
        g_end = g_begin + steps_per_split * BLOCK_G

        pair_rows = pairs_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_pn
        word_rows = words_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn
        x_row = xq_ptr + pid_m.to(tl.int64) * stride_xm

        acc2 = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
        # no dot in this loop, so ask for the software pipeline explicitly
        for g0 in tl.range(g_begin, g_end, BLOCK_G, num_stages=NUM_STAGES):
            g = g0 + offs_g
            pairs, word = _load_weights(pair_rows, word_rows, g0, G, BLOCK_N, BLOCK_G, EVEN)
            if EVEN:
                xq = tl.load(x_row + g)
            else:
                xq = tl.load(x_row + g, mask=g < KG, other=0)
            xa, xb = _pick_inputs(xq, (word >> shifts) & 0x0303, dt, PRMT)
            v0, v1 = _unpack2(pairs, dt)
            acc2 += v0 * xa
            acc2 += v1 * xb

        acc = tl.sum(acc2, axis=1)[:, None]
        offs_m = pid_m + tl.arange(0, 1)
        tile = pid_n * tl.num_programs(0) + pid_m
        finish(acc, y_ptr, bias_ptr, ws_ptr, count_ptr, offs_n, offs_m, M, N, stride_ym, tile, pid_k, split_k, HAS_BIAS,
               SUM_AT_ONCE)


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    config: TritonConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[M, K] @ W^T (+ bias)`` for W compressed as ``values``/``meta``; returns ``[M, N]``.

    ``x`` must be 2-D with unit stride along K, of the values' dtype; ``out``
    (optional) is a contiguous ``[M, N]`` tensor that every element of is
    written.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the 2:4 Triton kernel needs triton: pip install triton")
    m, k = x.shape
    n, half = values.shape
    kp = 2 * half
    if k != in_features or k % 4 or kp < k or kp % 32 or meta.shape != (n, kp // 8):
        raise ValueError(f"x {tuple(x.shape)} does not match 2:4 weight values {tuple(values.shape)}, meta {tuple(meta.shape)}")
    if x.dtype != values.dtype or x.stride(1) != 1:
        raise ValueError(f"x must be {values.dtype} with unit stride along K, got {x.dtype} strides {x.stride()}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(m, n)}")
    if m == 0:
        return out
    cfg = config or default_config(m, n, k, _sm_count(x.device))
    return PreparedCall(m, values, meta, in_features, bias, cfg)(x, out)


class PreparedCall:
    """:func:`sparse24_matmul` for one weight, token count and configuration, worked out once.

    A layer keeps one per token count, so that a decode step's call is an
    output allocation and a launch. After the first call, which compiles or
    finds the kernel through ``kernel[grid](...)``, later calls launch the
    compiled kernel directly: Triton's binding and specialisation of every
    argument on every call is most of a small call's CPU time. That is valid
    while every argument the kernel was specialised on is unchanged. Only
    ``x``, the output and a split-K workspace vary, so what is checked before
    a direct launch is ``x``'s row stride, the 16-byte alignment of ``x`` and
    the output, and the current CUDA device (whose context holds the loaded
    kernel); anything else takes ``kernel[grid](...)``. The direct launch goes
    through the CUDA driver (:class:`~sparsa.kernels.launch.DriverLaunch`)
    where the compiled kernel allows, else through Triton's launcher.
    Inputs are not validated (:func:`sparse24_matmul` does that).
    """

    def __init__(self, m: int, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None, cfg: TritonConfig) -> None:
        if cfg.kind not in KERNEL_SHAPES:
            raise ValueError(f"unknown 2:4 Triton kernel kind {cfg.kind!r}; choose one of: {', '.join(KERNEL_SHAPES)}")
        n, half = values.shape
        groups = half // 2
        self.m, self.n, self.in_features, self.device = m, n, in_features, values.device
        gemv = cfg.kind == "gemv"
        bg = cfg.block_k // 4
        steps = _cdiv(_cdiv(groups, cfg.split_k), bg)  # BLOCK_G steps per split
        self.split = _cdiv(groups, steps * bg)
        even = groups == self.split * steps * bg and in_features // 4 == groups
        self.grid = (_cdiv(m, 1 if gemv else block_m_for(m)), _cdiv(n, cfg.block_n), self.split)
        self.tiles = self.grid[0] * self.grid[1]
        # without split-K the workspace is a placeholder the kernel never touches: fixed
        self._fixed_ws = workspace(1, m, n, self.tiles, self.device) if self.split == 1 else None
        self.bias = bias
        self.pairs, self.words = values.view(torch.int32), meta.view(torch.int32)
        self.sizes = (m, n, in_features // 4, groups)
        self.tail = (self.pairs.stride(0), self.words.stride(0), n, self.split, steps)  # strides of W and y; split-K
        if gemv:
            self.kernel = _sparse24_gemv_kernel
            self.constexprs = dict(HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_G=bg, NUM_STAGES=cfg.num_stages,
                                   EVEN=even, SUM_AT_ONCE=triton.next_power_of_2(self.split) if self.split > 1 else 0,
                                   PRMT=_PRMT)
        else:
            self.kernel = _sparse24_mma_kernel
            self.constexprs = dict(HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_M=block_m_for(m), BLOCK_G=bg,
                                   NUM_STAGES=cfg.num_stages, EVEN=even, PRMT=_PRMT)
        self.options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        # the arguments that change between calls: x, the output (also in the bias slot when there is no
        # bias) and a split-K workspace; the others stay as built
        self._varying = [[0], [3, 4] if bias is None else [4]] + ([[5], [6]] if self.split > 1 else [])
        # after the first call: the compiled kernel's launcher, and what it was specialised and loaded for
        # (x's row stride in int64 words; the current CUDA device, whose context holds the loaded kernel);
        # False once a launcher refused its arguments, or where Triton's launcher is not known
        self._direct: tuple | bool | None = None if _DIRECT_LAUNCH else False
        # the driver launch, once made; _rows: the same, where x and the output alone vary (no split-K) and the
        # kernel was compiled for x's rows back to back, so that bind's fast path may take it
        self._driver: DriverLaunch | None = None
        self._rows: DriverLaunch | None = None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = x.new_empty((self.m, self.n))  # (x has the weight's dtype and device: the layer checked)
        if x.stride(0) % 4 or x.storage_offset() % 4:
            x = x.contiguous()  # the int64 view needs 8-byte aligned rows
        xq = x.view(torch.int64)
        ws, counters = self._fixed_ws or workspace(self.split, self.m, self.n, self.tiles, self.device)
        args = (xq, self.pairs, self.words, out if self.bias is None else self.bias, out, ws, counters,
                *self.sizes, xq.stride(0), *self.tail)
        aligned = xq.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
        direct = self._direct
        if direct and aligned and direct[1:] == (xq.stride(0), torch.cuda.current_device()):
            try:
                direct[0](args)
                return out
            except (TypeError, LaunchError):  # a launcher that takes other arguments, or the driver refused
                self._give_up_direct()
                direct = False
        compiled = self.kernel[self.grid](*args, **self.constexprs, **self.options)
        if direct is None and aligned and hasattr(compiled, "__getitem__"):
            self._direct = (self._launcher(compiled, args), xq.stride(0), torch.cuda.current_device())
        return out

    def bind(self, out_shape: tuple, rows: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """This call for inputs ``[..., K]`` of one shape holding its ``m`` rows: the output comes in ``out_shape``.

        Once the kernel is launched through the driver, a contiguous input
        on a 16-byte boundary costs an allocation and one launch, with no
        reshape or view. (The output needs that alignment too: torch's
        allocator gives at least 512 bytes.) Other inputs take ``rows``, the
        caller's reshape around this call. The caller has checked the
        input's dtype and device, as a layer's binding does.
        """

        def forward(x: torch.Tensor) -> torch.Tensor:
            launch = self._rows
            if launch and x.is_contiguous() and not x.data_ptr() % 16 and launch.device == torch.cuda.current_device():
                out = x.new_empty(out_shape)
                try:
                    launch(x.data_ptr(), out.data_ptr())
                    return out
                except LaunchError:
                    self._give_up_direct()
            return rows(x)

        return forward

    def _give_up_direct(self) -> None:
        """Launch through ``kernel[grid](...)`` from now on (which raises if the CUDA context itself is broken)."""
        self._direct = False
        self._driver = self._rows = None

    def _launcher(self, compiled, args: tuple):
        """How later calls launch ``compiled``: through the driver if it can, else Triton's launcher, all arguments in order."""
        launch = DriverLaunch.build(compiled, self.grid, args, self._varying) if DRIVER_LAUNCH else None
        if launch is not None:
            self._driver = launch
            if self.split == 1 and args[0].stride(0) * 4 == self.in_features:
                self._rows = launch
            varying = [indices[0] for indices in self._varying]
            return lambda args: launch(*[args[i].data_ptr() for i in varying])
        runner, constexprs = compiled[self.grid], tuple(self.constexprs.values())
        return lambda args: runner(*args, *constexprs)
