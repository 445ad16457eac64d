"""How sparsa times one GPU call when it chooses between kernels (the 2:4 dispatch and cuSPARSELt's search).

CUDA events around each call; the L2 cache flushed before every call by
*reading* a 128 MiB buffer (see :func:`flush_l2`); then the GPU held busy for
about 0.2 ms (``LEAD_CYCLES``) while the call is issued, so the events time
the GPU's work even where issuing a small kernel from Python takes the CPU
longer than the flush takes the GPU, and the GPU is not left idle between
repetitions. Warm-up calls run for at least ``WARM_MS`` of GPU time (which
also compiles Triton kernels and brings the clocks up after compilation left
the GPU idle); the result is the median of several repetitions.
"""

from __future__ import annotations

import statistics

import torch

from ..benchmarking import interleaved

__all__ = ["fastest_of", "flush_l2", "time_each", "time_us"]

FLUSH_BYTES = 128 << 20
WARM_MS = 5.0
LEAD_CYCLES = 400_000  # GPU clock cycles of busy-waiting before each timed call: ~0.2 ms at 2 GHz

_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    buf = _FLUSH.get(device)
    if buf is None:
        buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        _FLUSH[device] = buf
    return buf


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache by reading a buffer larger than it.

    Reading leaves L2 full of clean lines, as a decode step finds it (the
    previous layer's weights). A write flush (``zero_()``, as common
    benchmark helpers do) leaves up to the whole L2 dirty, and the timed
    kernel then pays for writing that back: on an H100 this doubled the time
    of a 4096 x 4096 GEMV and pulled every ratio towards 1.
    """
    torch.sum(_flush_buffer(device))


def time_us(fn, device: torch.device, reps: int = 10, warmup: int = 3, budget_ms: float | None = None) -> float:
    """Median GPU time of ``fn()`` on ``device`` in microseconds, L2 flushed before each call.

    ``budget_ms``: instead of ``reps``, as many repetitions as fit in that much GPU time (5 to 200).
    """
    return time_each({"fn": fn}, device, reps, warmup, budget_ms)["fn"]


def time_each(fns: dict, device: torch.device, reps: int = 10, warmup: int = 3,
              budget_ms: float | None = None) -> dict:
    """:func:`time_us` of several functions at once, their calls interleaved.

    Repetition ``i`` of every function runs before repetition ``i + 1`` of any
    (:func:`sparsa.benchmarking.interleaved`: in an order that rotates), so all of them meet the same clocks: under
    sustained load a GPU's clock drifts by more than the few percent that can
    separate two kernels, and timing one function after another lets the
    drift decide between them. ``budget_ms`` and the repetition count apply to
    one call of every function together.
    """
    names = list(fns)
    if not names:
        return {}
    with torch.cuda.device(device):  # the events and the busy-wait go to the current device's stream
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        torch.cuda.synchronize(device)
        first = [_timed_call(fn, device) for fn in fns.values()]
        torch.cuda.synchronize(device)
        round_ms = sum(start.elapsed_time(end) for start, end in first)
        for _ in range(min(200, int(WARM_MS / max(round_ms, 0.01)))):  # clocks up before the timed calls
            for fn in fns.values():
                fn()
        if budget_ms is not None:
            reps = max(5, min(200, int(budget_ms / max(round_ms, 0.001))))
        elif round_ms > 5.0:  # long calls: their medians settle with fewer repetitions
            reps = max(3, min(reps, int(50.0 / round_ms)))
        events = interleaved({name: (lambda fn=fn: _timed_call(fn, device)) for name, fn in fns.items()}, reps)
        torch.cuda.synchronize(device)
    return {name: 1000.0 * statistics.median(start.elapsed_time(end) for start, end in pairs)
            for name, pairs in events.items()}


def fastest_of(candidates, device: torch.device, finalists: int = 3, final_ms: float = 200.0,
               beside: dict | None = None, skip: type[Exception] | tuple = ()) -> tuple[dict, dict]:
    """Shortlist, then decide side by side: ``(medians, kept)`` for ``candidates``, an iterable of
    ``(name, fn, thing)``.

    Each ``fn`` is timed with :func:`time_us` as it comes, and only the ``finalists`` fastest (the earlier on a
    tie) keep their ``thing``; those are then timed again with :func:`time_each`, their calls interleaved with
    ``beside``'s (functions timed for comparison, never kept) within ``final_ms`` of GPU time per round.
    A candidate whose timing raises one of ``skip`` is left out. ``medians`` maps the finalists' and
    ``beside``'s names to microseconds; ``kept`` the finalists' names to their things. Candidates are made one at a time, so a generator that builds each one holds at most
    ``finalists + 1`` of them.
    """
    short: list[tuple[float, int, str, object, object]] = []
    for order, (name, fn, thing) in enumerate(candidates):
        try:
            short.append((time_us(fn, device), order, name, fn, thing))
        except skip:
            continue
        short = sorted(short, key=lambda t: t[:2])[:finalists]
    if not short:
        return {}, {}
    fns = {name: fn for _, _, name, fn, _ in short}
    medians = time_each({**fns, **(beside or {})}, device, budget_ms=final_ms)
    return medians, {name: thing for _, _, name, _, thing in short}


def _timed_call(fn, device: torch.device) -> tuple:
    """Issue one call of ``fn`` after an L2 flush and a busy lead, between two CUDA events (not waited for)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush_l2(device)
    torch.cuda._sleep(LEAD_CYCLES)  # the call is queued before the GPU reaches its start event
    start.record()
    fn()
    end.record()
    return start, end
