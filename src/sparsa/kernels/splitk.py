"""Split-K in one launch: the last program of an output tile sums the others' partials.

When a layer has few output tiles (decode: one token, a few thousand
outputs), one program per tile cannot keep the GPU's memory pipes busy, so
``split`` programs share each tile's K range. Each writes its float32 partial
to a workspace and increments the tile's arrival counter; the program that
arrives last sums the partials in a fixed order (deterministic), adds the
bias, stores the output and resets the counter to zero, so the counters are
ready for the next launch and no second kernel is needed.

:func:`finish` is called by every kernel with a split-K mode (2:4 and
activation-sparse GEMV, 2:4 MMA); :func:`counters` holds the per-device
counters. Launches on different streams at once must not share a device.
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton

__all__ = ["counters", "finish", "workspace", "zeroed"]

_ZEROED: dict[tuple[str, torch.device], torch.Tensor] = {}


def zeroed(name: str, device: torch.device, size: int, dtype: torch.dtype, minimum: int) -> torch.Tensor:
    """A per-device buffer of at least ``size`` elements that is all zero between launches.

    The kernels that use one leave it zero again when they finish (the counters are reset, the accumulator
    is cleared as it is read), so it is allocated once and never cleared by a separate launch. It is
    allocated generously (``minimum``) so that it does not move: a CUDA graph keeps its address.
    """
    buf = _ZEROED.get((name, device))
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, minimum), dtype=dtype, device=device)
        _ZEROED[(name, device)] = buf
    return buf


def counters(device: torch.device, count: int) -> torch.Tensor:
    """Per-device arrival counters, all zero between launches (the kernels reset their own)."""
    return zeroed("counters", device, count, torch.int32, 1 << 16)


def workspace(split: int, m: int, n: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partials ``[split, m, n]`` and the counters for ``tiles`` output tiles.

    Without split-K both are placeholders of the same types, so one compiled kernel serves both cases.
    """
    if split > 1:
        return torch.empty((split, m, n), dtype=torch.float32, device=device), counters(device, tiles)
    count = counters(device, 1)
    return count.view(torch.float32)[:1], count


if HAVE_TRITON:

    @triton.jit
    def finish(acc, y_ptr, bias_ptr, ws_ptr, count_ptr, offs_n, offs_m, M, N, stride_ym, tile, pid_k, split_k,
               HAS_BIAS: tl.constexpr, SUM_AT_ONCE: tl.constexpr = 0):
        """Store ``acc`` [BLOCK_N, BLOCK_M] as y^T (+ bias); with split-K, the last program of a tile sums the partials.

        ``SUM_AT_ONCE`` (a power of two >= split_k, or 0): load every partial in
        one go instead of one after another, so the sum waits for one memory
        round trip rather than ``split_k`` of them (for small tiles: decode).
        """
        out_ty = y_ptr.dtype.element_ty
        n_ok = offs_n < N
        out_ok = n_ok[:, None] & (offs_m < M)[None, :]
        y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        if split_k == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + y_offs, acc.to(out_ty), mask=out_ok)
        else:
            plane = M.to(tl.int64) * N
            ws_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
            tl.store(ws_ptr + pid_k * plane + ws_offs, acc, mask=out_ok)
            # every thread's partial is written before one thread signals arrival
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                if SUM_AT_ONCE > 0:
                    s = tl.arange(0, SUM_AT_ONCE)
                    parts = tl.load(ws_ptr + s[:, None, None] * plane + ws_offs[None, :, :],
                                    mask=(s < split_k)[:, None, None] & out_ok[None, :, :], other=0.0,
                                    cache_modifier=".cg")
                    total = tl.sum(parts, axis=0)
                else:
                    total = tl.zeros_like(acc)
                    for s in range(0, split_k):
                        total += tl.load(ws_ptr + s * plane + ws_offs, mask=out_ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                tl.store(y_ptr + y_offs, total.to(out_ty), mask=out_ok)
                tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
else:  # pragma: no cover - CPU machines without triton import this module too
    finish = None
