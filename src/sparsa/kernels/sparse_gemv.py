"""Triton GEMV that skips the weight rows of inactive channels: ``y[M, N] = (x * keep)[M, K] @ W^T`` for 1 to 8 tokens.

With activation sparsity most input channels of a decode step are cut, and
channel ``k`` of ``x`` only ever meets column ``k`` of W. Stored transposed
once (``wt = W^T``, ``[K, N]`` row-major, i.e. W column-major), that column
is one contiguous row of ``wt``. The selection is fused: a channel is active
where ``|x_k| >= threshold_k`` (a per-channel threshold, which is how both a
plain magnitude cut and a weight-informed score ``|x_k| * ||W[:, k]||`` are
expressed), or where ``x_k != 0`` without thresholds. A NaN input is
always active, so that it reaches the output as it would through the cut
and a dense product (a broken model shows, whatever the thresholds).

Work split: a program owns one ``[BLOCK_K, BLOCK_N]`` tile of ``wt`` for one
token. It loads its ``BLOCK_K`` inputs and thresholds, then the whole tile in
one masked load: a masked-off row issues no memory traffic, so the bytes
read fall with the sparsity. There is no loop on purpose: the weight load
depends on the input load (its mask), and a loop would pay that round trip
to memory at every step; one tile per program pays it once, and the many
short programs on each SM keep enough loads in flight to stream at full
bandwidth. (Programs that loop over K for their outputs, one launch and no
accumulator, were slower in every shape measured on an H200, SmolLM2-135M's
small layers included: ``benchmarks/results/gemv_loop_variant_h200.json``.)
The ``K / BLOCK_K`` programs of an output tile add their float32 partial
sums into a float32 accumulator with atomic adds, which the program never
waits for; a second small kernel casts the accumulator to the output and
zeroes it again, so it is ready for the next call (the accumulator is kept
per device: launches on different streams at once must not share a device).
Counting arrivals so that the last program sums a workspace, as the 2:4
kernels do, measured 1.1x dense instead of 1.75x here
(``benchmarks/results/activation_speed_splitk_counters.json``): every short
program then waits for a fenced atomic. The float32 atomics make the
summation order, and so the last bits of the output, vary from run to run.

The tile sizes that run a layer are measured per shape
(:mod:`sparsa.kernels.gemv_dispatch`).
"""

from __future__ import annotations

import dataclasses

import torch

from ._triton import HAVE_TRITON, tl, triton
from .launch import DRIVER_LAUNCH, DriverLaunch, LaunchError
from .splitk import zeroed

__all__ = ["MAX_TOKENS", "GemvConfig", "PreparedGemv", "sparse_gemv", "transpose_weight"]

MAX_TOKENS = 8


if HAVE_TRITON:

    @triton.jit
    def _sparse_gemv_kernel(x_ptr, thr_ptr, wt_ptr, bias_ptr, acc_ptr, N, K, stride_xm, stride_wk,
                            HAS_THR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        k_ok = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_THR:
            # a NaN input stays (x != x): it reaches the output, as it does through the cut and a dense product
            active = (tl.abs(x) >= tl.load(thr_ptr + offs_k, mask=k_ok, other=float("inf"))) | (x != x)
            x = tl.where(active, x, 0.0)
        else:
            active = x != 0.0
        w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                    mask=active[:, None] & n_ok[None, :], other=0.0)
        acc = tl.sum(x[:, None] * w.to(tl.float32), axis=0)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.atomic_add(acc_ptr + m * N + offs_n, acc, mask=n_ok, sem="relaxed")

    @triton.jit
    def _cast_and_clear_kernel(acc_ptr, out_ptr, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        tl.store(out_ptr + offs, tl.load(acc_ptr + offs, mask=ok).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(acc_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=ok)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """One launch configuration: the tile of a program and its warps."""

    block_n: int = 64  # outputs per program
    block_k: int = 64  # input channels per program
    num_warps: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {value}")

    @classmethod
    def for_shape(cls, n: int, k: int) -> "GemvConfig":
        """Without a measurement: one-warp programs of 64 x 64, or 64 x 128 where 64 x 64 tiles would be
        fewer than 6144 (the fastest configurations measured on an H100 for the Llama-3-8B shapes)."""
        programs = -(-n // 64) * -(-k // 64)
        return cls(64, 64 if programs >= 6144 else 128, 1)

    def key(self) -> str:
        return f"n{self.block_n}-k{self.block_k}-w{self.num_warps}"

    @classmethod
    def from_key(cls, key: str) -> "GemvConfig":
        values = {f[0]: int(f[1:]) for f in key.split("-")}
        return cls(values["n"], values["k"], values["w"])


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W [N, K]`` stored as ``W^T [K, N]`` contiguous (once, at load)."""
    return weight.detach().t().contiguous()


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, *,
                threshold: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``(x * keep) [M, K] @ W^T (+ bias)`` reading only the rows of ``wt = W^T`` whose channel is active; ``M <= 8``.

    ``threshold`` (float32 ``[K]``) keeps channel ``k`` where ``|x_k| >= threshold[k]`` (or ``x_k`` is NaN);
    without it, the nonzero channels are active.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the sparse GEMV kernel needs triton: pip install triton")
    m, k = x.shape
    if m > MAX_TOKENS or wt.shape[0] != k or x.dtype != wt.dtype or wt.stride(1) != 1:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} {x.dtype} and wt {tuple(wt.shape)} {wt.dtype} do not fit "
                         f"(at most {MAX_TOKENS} tokens, wt = W^T contiguous, same dtype)")
    if threshold is not None and (threshold.shape != (k,) or threshold.dtype != torch.float32):
        raise ValueError(f"sparse_gemv: threshold must be float32 [{k}], got {tuple(threshold.shape)} {threshold.dtype}")
    n = wt.shape[1]
    c = config or GemvConfig.for_shape(n, k)
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _launch(x, wt, bias, threshold, c, out)
    return out


def _launch(x, wt, bias, threshold, c: GemvConfig, out) -> list[tuple]:
    """Launch the GEMV through Triton; per kernel launched: (compiled kernel, grid, arguments, varying), where
    ``varying`` maps ``"x"`` and ``"out"`` to the indices of the arguments that take that tensor's pointer."""
    m, k = x.shape
    n = wt.shape[1]
    thr = threshold if threshold is not None else x  # unused pointer when HAS_THR is False
    b = bias if bias is not None else x
    takes_x = [0] + ([1] if threshold is None else []) + ([3] if bias is None else [])
    flags = dict(HAS_THR=threshold is not None, HAS_BIAS=bias is not None, BLOCK_N=c.block_n, BLOCK_K=c.block_k)
    acc = _accumulator(x.device, m * n)
    grid = (triton.cdiv(n, c.block_n), m, triton.cdiv(k, c.block_k))
    args = (x, thr, wt, b, acc, n, k, x.stride(0), wt.stride(0))
    compiled = _sparse_gemv_kernel[grid](*args, **flags, num_warps=c.num_warps)
    cast_grid = (triton.cdiv(m * n, 1024), 1, 1)
    cast_args = (acc, out, m * n)
    cast = _cast_and_clear_kernel[cast_grid](*cast_args, BLOCK=1024, num_warps=4)
    return [(compiled, grid, args, {"x": takes_x}), (cast, cast_grid, cast_args, {"out": [1]})]


class PreparedGemv:
    """One layer's GEMV at one token count and configuration, launched through the CUDA driver after its first call.

    In eager decoding the CPU's cost of a launch bounds a small model (see
    :mod:`sparsa.kernels.launch`). The first call runs :func:`sparse_gemv`
    and keeps its compiled kernels as :class:`~sparsa.kernels.launch.DriverLaunch`
    calls with the weight, thresholds and bias written once; a later call on a
    contiguous input on a 16-byte boundary then costs an allocation and two
    ``cuLaunchKernel`` calls (the GEMV and the cast). Any other input,
    or a kernel the driver launch cannot take, runs :func:`sparse_gemv`. The
    caller has checked the input's dtype, device and width.
    """

    def __init__(self, wt: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor | None, config: GemvConfig, m: int) -> None:
        self.wt, self.bias, self.threshold, self.config, self.m = wt, bias, threshold, config, m
        self._launches: list | bool | None = None if DRIVER_LAUNCH else False  # None: not built yet; False: never

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        launches = self._launches
        if launches and x.is_contiguous() and not x.data_ptr() % 16 and launches[0][0].device == torch.cuda.current_device():
            out = x.new_empty((self.m, self.wt.shape[1]))
            try:
                pointers = {"x": x.data_ptr(), "out": out.data_ptr()}
                for launch, takes in launches:
                    launch(*[pointers[t] for t in takes])
                return out
            except LaunchError:
                self._launches = False
        if launches is not None:
            return sparse_gemv(x, self.wt, self.bias, threshold=self.threshold, config=self.config)
        x = x.contiguous()
        out = torch.empty((self.m, self.wt.shape[1]), dtype=x.dtype, device=x.device)
        kernels = _launch(x, self.wt, self.bias, self.threshold, self.config, out)
        self._launches = self._build(kernels) if not x.data_ptr() % 16 else False
        return out

    @staticmethod
    def _build(kernels: list[tuple]) -> list | bool:
        built = []
        for compiled, grid, args, varying in kernels:
            launch = DriverLaunch.build(compiled, grid, args, list(varying.values()))
            if launch is None:
                return False
            built.append((launch, list(varying)))
        return built


def _accumulator(device: torch.device, size: int) -> torch.Tensor:
    """The per-device float32 accumulator, zero between calls (the cast kernel clears what it read);
    room for 8 tokens of 131072 outputs, so a model never regrows it."""
    return zeroed("gemv accumulator", device, size, torch.float32, 1 << 20)
