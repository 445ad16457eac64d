"""Launch a compiled Triton kernel straight through the CUDA driver, its arguments packed once.

Triton's own launch from Python costs several microseconds per call: a
Python runner fetches the device and stream and builds launch metadata,
then a C launcher converts every argument, asking each tensor for its
pointer and the driver whether that pointer is valid. In an eager decode
step a 2:4 layer is launched hundreds of times and that cost exceeds the
GPU time it saves (issue 5). A :class:`DriverLaunch` keeps one C array of
the kernel's parameters and, per call, writes the tensors' pointers into
it and makes a single ``cuLaunchKernel`` call through ctypes.

Which arguments reach the kernel is read from the compiled PTX, not from
Triton's internals, which change between versions: the ``.entry``
parameter list gives each parameter's width. Triton drops ``constexpr``
arguments (the caller leaves them out) and may specialise integers equal to
1 into constants; it appends one scratch pointer per scratch buffer its
metadata names. A launch is built only when one reading of the arguments
matches the PTX exactly, the kernel needs no scratch memory and no Triton
launch hook is set when it is built; otherwise :meth:`DriverLaunch.build` returns None and
the caller keeps Triton's launcher.

What the driver launch leaves out: Triton's launch hooks (profilers such as
Proton see no launch made this way, hence none is made while a hook is set)
and its check that every pointer is a device pointer. A caller passing a
host pointer gets an asynchronous illegal-address fault instead of a Python
error, so callers must check devices first (``SparseLinear24`` does).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

import torch

__all__ = ["DRIVER_LAUNCH", "DriverLaunch", "LaunchError", "entry_params"]

DRIVER_LAUNCH = os.environ.get("SPARSA_DRIVER_LAUNCH", "1") != "0"  # 0: always launch through Triton

_CUDA: ctypes.CDLL | None = None
_SCRATCH = ("global_scratch_size", "profile_scratch_size")  # Triton's scratch buffers, one pointer each


class LaunchError(RuntimeError):
    """``cuLaunchKernel`` returned an error."""


def _driver() -> ctypes.CDLL:
    global _CUDA
    if _CUDA is None:
        lib = ctypes.CDLL("libcuda.so.1")
        p, u32 = ctypes.c_void_p, ctypes.c_uint
        lib.cuLaunchKernel.argtypes = [p, u32, u32, u32, u32, u32, u32, u32, p, p, p]
        lib.cuLaunchKernel.restype = ctypes.c_int
        _CUDA = lib
    return _CUDA


def entry_params(ptx: str) -> list[str]:
    """The PTX types (``u64``, ``u32``, ...) of the first ``.entry``'s parameters, in order."""
    entry = re.search(r"\.entry\s+[\w$]+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        return []
    return re.findall(r"\.param\s+\.(\w+)", entry.group(1))


def _ptx_type(arg) -> str | None:
    if isinstance(arg, torch.Tensor):
        return "u64"
    if isinstance(arg, bool) or not isinstance(arg, int):
        return None
    return "u32" if -(2**31) <= arg < 2**31 else "u64"  # Triton's i32 and i64 (both read as raw bits)


def _reading(args: tuple, types: list[str], scratch: int) -> list[int] | None:
    """Indices of ``args`` that are the kernel's parameters: all of them, or all but the integers equal to 1.

    ``types`` must be exactly those parameters followed by ``scratch`` pointers.
    """
    for drop_ones in (False, True):
        kept = [i for i, a in enumerate(args) if not (drop_ones and _ptx_type(a) == "u32" and a == 1)]
        wanted = [_ptx_type(args[i]) for i in kept] + ["u64"] * scratch
        if None not in wanted and types == wanted:
            return kept
    return None


class DriverLaunch:
    """One compiled kernel at one grid, launched by ``cuLaunchKernel`` with most arguments written once.

    ``varying`` names the tensors that change between calls, as lists of
    argument indices: a call passes one pointer per list, written into each
    of its arguments (one output may fill two). Every other argument is
    fixed at build: the caller keeps those tensors alive and unchanged. The
    launch goes to the current CUDA stream, so CUDA graphs capture it like
    any other.
    """

    def __init__(self, function: int, grid: tuple[int, int, int], threads: int, shared: int,
                 args: tuple, kept: list[int], extra: int, varying: list[list[int]], device: int) -> None:
        self.device = device
        self._launch = _driver().cuLaunchKernel
        self._head = (ctypes.c_void_p(function), *grid, threads, 1, 1, shared)
        slot_of = {}
        for i in kept:
            a = args[i]
            if isinstance(a, torch.Tensor):
                slot_of[i] = ctypes.c_uint64(a.data_ptr())
            elif _ptx_type(a) == "u64":
                slot_of[i] = ctypes.c_uint64(a & 0xFFFFFFFFFFFFFFFF)
            else:
                slot_of[i] = ctypes.c_uint32(a & 0xFFFFFFFF)
        # scratch pointers: none is needed (checked in build)
        self._slots = [slot_of[i] for i in kept] + [ctypes.c_uint64(0) for _ in range(extra)]
        self._params = (ctypes.c_void_p * len(self._slots))(*[ctypes.addressof(s) for s in self._slots])
        self._varying = [[slot_of[i] for i in indices] for indices in varying]
        # writing the slots and launching must be one step: another thread could otherwise write its pointers
        # in between (Python may switch threads there, and ctypes lets go of the GIL during the call)
        self._lock = threading.Lock()

    @classmethod
    def build(cls, compiled, grid: tuple[int, int, int], args: tuple, varying: list[list[int]]) -> "DriverLaunch | None":
        """A driver launch of Triton's ``compiled`` kernel for ``args`` (its non-constexpr arguments), or None."""
        meta = compiled.metadata
        if any(getattr(meta, size, 0) for size in _SCRATCH) or _launch_hooks():
            return None
        if getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False) \
                or getattr(meta, "launch_pdl", False):
            return None
        asm = getattr(compiled, "asm", {})
        types = entry_params(asm.get("ptx", "")) if isinstance(asm, dict) else []
        kept = _reading(args, types, sum(hasattr(meta, size) for size in _SCRATCH))
        if kept is None or not all(i in kept and isinstance(args[i], torch.Tensor) for v in varying for i in v):
            return None
        # the function handle belongs to the current device's context: tensors elsewhere keep Triton's launcher
        device = torch.cuda.current_device()
        if any(a.device != torch.device("cuda", device) for a in args if isinstance(a, torch.Tensor)):
            return None
        try:
            compiled._init_handles()
            function = int(compiled.function)
            _driver()
        except (AttributeError, OSError, TypeError):
            return None
        return cls(function, grid, 32 * meta.num_warps, meta.shared, args, kept, len(types) - len(kept), varying, device)

    def __call__(self, *pointers: int) -> None:
        """Launch with these pointers for the ``varying`` tensors, in order."""
        with self._lock:
            for slots, pointer in zip(self._varying, pointers, strict=True):
                for slot in slots:
                    slot.value = pointer
            status = self._launch(*self._head, torch._C._cuda_getCurrentRawStream(self.device), self._params, None)
        if status:
            raise LaunchError(f"cuLaunchKernel failed with CUDA error {status}")


def _launch_hooks() -> bool:
    """Whether a Triton launch hook is set (a profiler listening), which a driver launch would not call."""
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):
        return True  # a Triton without these knobs: keep its own launcher
    # a hook is None or a callable, or (newer Triton) a chain of callables, set when not empty
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)
