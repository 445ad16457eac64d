"""cuSPARSELt, called directly through ctypes, with its plans made once and kept.

Why not torch's private ops (``torch._cslt_sparse_mm``)? They build a
matmul plan, a workspace and the descriptors on *every* call and tear them
down afterwards; that fixed cost (hundreds of microseconds in our H100
measurements, see ``benchmarks/results/linear24.json``) is larger than the
whole product below a few thousand tokens. They also crashed on an H100
(``illegal instruction``) in our first runs. The library itself is a plain C
API shipped with torch's CUDA wheels (``nvidia-cusparselt``), so ctypes
reaches it with no compile step at install.

Here a :class:`CsltWeight` compresses a 2:4 weight once and keeps one
:class:`_Plan` per token count ``M`` (a few, least recently used dropped):
descriptors, algorithm and workspace are made once, and each call is one
``cusparseLtMatmul`` on torch's current stream. The algorithm comes from our
own search, run once per token bucket (the first ``M`` seen in it) and reused
by every plan of that bucket: each configuration id cuSPARSELt offers gets its
own plan (so its own, correctly sized workspace) and is timed as the
dispatcher times paths; the three fastest are timed again with their calls
interleaved (:meth:`CsltWeight._search`). Split-K stays at the library's
default: on an H200 (cuSPARSELt 0.8) a sweep of split-K settings at 16-128
tokens found nothing faster, and several fp16 split-K plans stopped the CUDA
context with an illegal instruction.
cuSPARSELt's built-in ``cusparseLtMatmulSearch`` is not used: on an
H100 with cuSPARSELt 0.8 it returned "internal error" and left the CUDA
context broken ("illegal instruction"), as torch's wrapper of it did.
:attr:`CsltWeight.algorithms` holds what the searches chose so that a
dispatch cache can store them. ``SPARSA_CSLT_SEARCH=0`` keeps the default
algorithm (id 0) without searching; ``SPARSA_CUSPARSELT=/path/libcusparseLt.so.0``
loads that library instead of the one torch ships.

Layout: ``y[M, N] = x[M, K] @ W[N, K]^T`` is cuSPARSELt's ``D = A @ B`` with
A = W (structured, row-major N x K), B = x read as a column-major K x M
matrix (x's own memory), D = y read as a column-major N x M matrix (y's own
memory). So nothing is transposed or copied. cuSPARSELt needs N and K
multiples of 16 and M a multiple of 8 here (16-bit types): callers pad.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["Algorithm", "CsltError", "CsltWeight", "PreparedMatmul", "library_version", "load_library"]

# enum values from cusparseLt.h / its cusparse stub (stable since cuSPARSELt 0.5)
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N = 0
_SPARSITY_50 = 0
_COMPUTE_32F = 2
_ALG_DEFAULT = 0
_ATTR_CONFIG_ID, _ATTR_CONFIG_MAX_ID, _ATTR_SPLIT_K, _ATTR_SPLIT_K_MODE = 0, 1, 3, 4
_CUDA_TYPE = {torch.float16: 2, torch.bfloat16: 14}  # cudaDataType: CUDA_R_16F, CUDA_R_16BF
_OPAQUE_BYTES = 2048  # handle and descriptors are opaque structs of 512 (0.10) or 1024 (older) bytes
ALIGN_ROWS, ALIGN_K, ALIGN_M = 16, 16, 8
PLANS_PER_WEIGHT = 8
SEARCH_FINALISTS = 3
SEARCH_FINAL_MS = 200.0  # GPU time for timing the finalists side by side
# Configuration ids tried by the search at most. On Hopper, bf16 offers 21 and fp16 more than 32, but fp16's ids
# past 31 stopped the CUDA context with an illegal instruction (H200, cuSPARSELt 0.8, 2026-12-03).
MAX_CONFIGS = 32


class CsltError(RuntimeError):
    """A cuSPARSELt call returned an error status."""


class _Opaque:
    """A zeroed, 16-byte aligned block standing in for one of cuSPARSELt's opaque structs."""

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(_OPAQUE_BYTES + 16)
        base = ctypes.addressof(self._buf)
        self.ptr = ctypes.c_void_p(base + (-base % 16))


_LIB: ctypes.CDLL | None = None
_LIB_ERROR: str | None = None
_LOCK = threading.Lock()


def _candidates() -> list[str]:
    chosen = os.environ.get("SPARSA_CUSPARSELT")  # a library file to use instead of torch's (another version)
    if chosen:
        return [chosen]
    names = ["libcusparseLt.so.0", "libcusparseLt.so"]
    for root in sys.path:
        for pattern in ("nvidia/cusparselt/lib/libcusparseLt.so*", "nvidia/cu*/lib/libcusparseLt.so*"):
            names += sorted(glob.glob(os.path.join(root, pattern)))
    return names


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
    sigs = {
        "cusparseLtInit": [p],
        "cusparseLtGetVersion": [p, ctypes.POINTER(ctypes.c_int)],
        "cusparseLtStructuredDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32, i32],
        "cusparseLtDenseDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32],
        "cusparseLtMatDescriptorDestroy": [p],
        "cusparseLtMatmulDescriptorInit": [p, p, i32, i32, p, p, p, p, i32],
        "cusparseLtMatmulAlgSelectionInit": [p, p, p, i32],
        "cusparseLtMatmulAlgSelectionDestroy": [p],
        "cusparseLtMatmulAlgSetAttribute": [p, p, i32, p, ctypes.c_size_t],
        "cusparseLtMatmulAlgGetAttribute": [p, p, i32, p, ctypes.c_size_t],
        "cusparseLtMatmulPlanInit": [p, p, p, p],
        "cusparseLtMatmulPlanDestroy": [p],
        "cusparseLtMatmulGetWorkspace": [p, p, ctypes.POINTER(ctypes.c_size_t)],
        "cusparseLtMatmul": [p, p, p, p, p, p, p, p, p, p, i32],
        "cusparseLtSpMMACompressedSize2": [p, p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
        "cusparseLtSpMMACompress2": [p, p, i32, i32, p, p, p, p],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.cusparseLtGetErrorString.argtypes, lib.cusparseLtGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p


def load_library() -> ctypes.CDLL | None:
    """The cuSPARSELt shared library (the one torch loaded, where it did), or None."""
    global _LIB, _LIB_ERROR
    with _LOCK:
        if _LIB is not None or _LIB_ERROR is not None:
            return _LIB
        if not torch.cuda.is_available():
            _LIB_ERROR = "no CUDA GPU"
            return None
        try:  # makes torch load its own copy first, so that ctypes finds that one by its soname
            torch.backends.cusparselt.version()
        except Exception:  # noqa: BLE001 - torch without cuSPARSELt: look on disk
            pass
        for name in _candidates():
            try:
                lib = ctypes.CDLL(name)
                _declare(lib)
            except (OSError, AttributeError) as exc:
                _LIB_ERROR = f"{name}: {exc}"
                continue
            _LIB, _LIB_ERROR = lib, None
            return lib
        _LIB_ERROR = _LIB_ERROR or "libcusparseLt.so not found"
        return None


def _check(status: int, what: str) -> None:
    if status != 0:
        message = _LIB.cusparseLtGetErrorString(status).decode() if _LIB is not None else "?"
        raise CsltError(f"cuSPARSELt {what} failed: {message} (status {status})")


_HANDLES: dict[int, _Opaque] = {}


def _handle(device: torch.device) -> _Opaque:
    index = device.index if device.index is not None else torch.cuda.current_device()
    handle = _HANDLES.get(index)
    if handle is None:
        lib = load_library()
        if lib is None:
            raise CsltError(f"cuSPARSELt is unavailable: {_LIB_ERROR}")
        handle = _Opaque()
        with torch.cuda.device(index):
            _check(lib.cusparseLtInit(handle.ptr), "init")
        _HANDLES[index] = handle
    return handle


def library_version() -> int | None:
    """cuSPARSELt's version number (e.g. 800 for 0.8.0), or None without it."""
    if load_library() is None:
        return None
    value = ctypes.c_int(0)
    try:
        _check(_LIB.cusparseLtGetVersion(_handle(torch.device("cuda")).ptr, ctypes.byref(value)), "get version")
    except CsltError:
        return None
    return value.value


@dataclass(frozen=True)
class Algorithm:
    """One cuSPARSELt kernel choice: configuration id and split-K settings."""

    config_id: int
    split_k: int = 1
    split_k_mode: int = 1

    def key(self) -> str:
        return f"alg{self.config_id}-split{self.split_k}-mode{self.split_k_mode}"

    @classmethod
    def from_key(cls, key: str) -> "Algorithm":
        a, s, m = key.split("-")
        return cls(int(a[3:]), int(s[5:]), int(m[4:]))


def _raw_stream(device: torch.device):
    """A function returning the current CUDA stream's handle on ``device`` as an int, cheaply."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's launcher uses; ~20x cheaper
    if raw is None:
        return lambda: torch.cuda.current_stream(index).cuda_stream
    return lambda: raw(index)


class _Plan:
    """Descriptors, algorithm, plan and workspace for one token count; destroyed with the object."""

    def __init__(self, weight: "CsltWeight", m: int, algorithm: Algorithm | None) -> None:
        lib, h = _LIB, weight.handle.ptr
        self.lib, self.h = lib, h
        n, k, dtype = weight.rows, weight.cols, _CUDA_TYPE[weight.dtype]
        self.mat_b, self.mat_c, self.matmul, self.alg, self.plan = (_Opaque() for _ in range(5))
        self._live: list[tuple[str, _Opaque]] = []
        _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_b.ptr, k, m, k, 16, dtype, _ORDER_COL), "B descriptor")
        self._live.append(("cusparseLtMatDescriptorDestroy", self.mat_b))
        _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_c.ptr, n, m, n, 16, dtype, _ORDER_COL), "C descriptor")
        self._live.append(("cusparseLtMatDescriptorDestroy", self.mat_c))
        _check(
            lib.cusparseLtMatmulDescriptorInit(
                h, self.matmul.ptr, _OP_N, _OP_N, weight.mat_a.ptr, self.mat_b.ptr, self.mat_c.ptr, self.mat_c.ptr, _COMPUTE_32F
            ),
            "matmul descriptor",
        )
        _check(lib.cusparseLtMatmulAlgSelectionInit(h, self.alg.ptr, self.matmul.ptr, _ALG_DEFAULT), "algorithm selection")
        self._live.append(("cusparseLtMatmulAlgSelectionDestroy", self.alg))
        if algorithm is not None:
            self._set(h, _ATTR_CONFIG_ID, algorithm.config_id)
            if algorithm.split_k > 1:
                self._set(h, _ATTR_SPLIT_K, algorithm.split_k)
                self._set(h, _ATTR_SPLIT_K_MODE, algorithm.split_k_mode)
        _check(lib.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.matmul.ptr, self.alg.ptr), "plan init")
        self._live.append(("cusparseLtMatmulPlanDestroy", self.plan))
        self.algorithm = algorithm or Algorithm(0)
        self._workspace_for(weight)
        # cusparseLtMatmul's arguments, bound once: each launch fills in x, y and the stream
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._streams = (ctypes.c_void_p * 1)()
        self._stream = _raw_stream(weight.device)
        self._args = [h, self.plan.ptr, ctypes.byref(self._alpha), weight.compressed.data_ptr(), 0,
                      ctypes.byref(self._beta), 0, 0, self.workspace.data_ptr(), self._streams, 1]

    def _set(self, h, attribute: int, value: int) -> None:
        v = ctypes.c_int(value)
        _check(self.lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, attribute, ctypes.byref(v), ctypes.sizeof(v)), "set algorithm")

    def _get(self, h, attribute: int) -> int:
        v = ctypes.c_int(0)
        _check(self.lib.cusparseLtMatmulAlgGetAttribute(h, self.alg.ptr, attribute, ctypes.byref(v), ctypes.sizeof(v)), "get algorithm")
        return v.value

    def _workspace_for(self, weight: "CsltWeight") -> None:
        size = ctypes.c_size_t(0)
        _check(self.lib.cusparseLtMatmulGetWorkspace(weight.handle.ptr, self.plan.ptr, ctypes.byref(size)), "workspace size")
        self.workspace = torch.empty(max(size.value, 1), dtype=torch.uint8, device=weight.device)

    def max_config_id(self) -> int:
        return self._get(self.h, _ATTR_CONFIG_MAX_ID)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y = x @ W^T`` on the current stream (the weight this plan was made for)."""
        args = self._args
        args[4] = x.data_ptr()
        args[6] = args[7] = y.data_ptr()
        self._streams[0] = self._stream()
        status = self.lib.cusparseLtMatmul(*args)
        if status:
            _check(status, "matmul")

    def __del__(self) -> None:
        for fn, obj in reversed(getattr(self, "_live", [])):
            try:
                getattr(self.lib, fn)(obj.ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class CsltWeight:
    """A 2:4 weight ``[N, K]`` compressed by cuSPARSELt, multiplied as ``x @ W^T``.

    ``N`` must be a multiple of 16 and ``K`` of 16 (pad first); the weight
    must be 2:4 along K, float16 or bfloat16, contiguous, on a CUDA device.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        if load_library() is None:
            raise CsltError(f"cuSPARSELt is unavailable: {_LIB_ERROR}")
        n, k = weight.shape
        if n % ALIGN_ROWS or k % ALIGN_K or weight.dtype not in _CUDA_TYPE or not weight.is_cuda:
            raise ValueError(f"cuSPARSELt needs a CUDA fp16/bf16 weight with rows and columns multiples of 16, got "
                             f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
        weight = weight.contiguous()
        self.rows, self.cols, self.dtype, self.device = n, k, weight.dtype, weight.device
        self.handle = _handle(weight.device)
        self.mat_a = _Opaque()
        lib, h = _LIB, self.handle.ptr
        _check(
            lib.cusparseLtStructuredDescriptorInit(h, self.mat_a.ptr, n, k, k, 16, _CUDA_TYPE[self.dtype], _ORDER_ROW, _SPARSITY_50),
            "A descriptor",
        )
        size, buffer_size = ctypes.c_size_t(0), ctypes.c_size_t(0)
        _check(lib.cusparseLtSpMMACompressedSize2(h, self.mat_a.ptr, ctypes.byref(size), ctypes.byref(buffer_size)), "compressed size")
        self.compressed = torch.empty(size.value, dtype=torch.uint8, device=self.device)
        scratch = torch.empty(max(buffer_size.value, 1), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _check(
            lib.cusparseLtSpMMACompress2(
                h, self.mat_a.ptr, 1, _OP_N, ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(self.compressed.data_ptr()),
                ctypes.c_void_p(scratch.data_ptr()), ctypes.c_void_p(stream),
            ),
            "compress",
        )
        torch.cuda.current_stream(self.device).synchronize()  # scratch is freed on return
        self.algorithms: dict[int, Algorithm] = {}  # token bucket -> the search's choice
        self.search_us: dict[int, dict[str, float]] = {}  # token bucket -> the search finalists' median times
        self._plans: OrderedDict[int, _Plan] = OrderedDict()

    def nbytes(self) -> int:
        return self.compressed.numel()

    def _plan(self, x: torch.Tensor, y: torch.Tensor, bucket: int, algorithm: Algorithm | None) -> _Plan:
        """The plan for ``x``'s token count: cached, made with a known algorithm, or searched for."""
        m = x.shape[0]
        wanted = algorithm or self.algorithms.get(bucket)
        if wanted is None and (torch.cuda.is_current_stream_capturing() or os.environ.get("SPARSA_CSLT_SEARCH") == "0"):
            wanted = Algorithm(0)  # a search launches timed runs: never inside a graph capture
        plan = self._plans.get(m)
        if plan is not None and wanted is not None and plan.algorithm == wanted:
            self._plans.move_to_end(m)
            return plan
        if wanted is None:
            plan = self._search(x, y, bucket)
            self.algorithms[bucket] = plan.algorithm
        else:
            try:
                plan = _Plan(self, m, wanted)
            except CsltError:
                if wanted.config_id == 0:
                    raise
                plan = _Plan(self, m, Algorithm(0))  # a stored algorithm that this M does not accept
        self._plans[m] = plan
        self._plans.move_to_end(m)
        while len(self._plans) > PLANS_PER_WEIGHT:
            self._plans.popitem(last=False)
        return plan

    def _search(self, x: torch.Tensor, y: torch.Tensor, bucket: int) -> _Plan:
        """Time every configuration id on ``x`` (into ``y``) and keep the fastest one's plan.

        Each id is timed as the dispatcher times paths (:func:`~sparsa.kernels.timing.time_us`:
        L2 flushed, median of several calls). The ``SEARCH_FINALISTS`` fastest are
        then timed again with their calls interleaved (:func:`~sparsa.kernels.timing.fastest_of`),
        so that they meet the same clocks: timed one after another at 4096-16384
        tokens, the same id's median moved by up to 15% between passes (H200, power
        capped), more than separates the best ids.
        """
        from .timing import fastest_of

        m = x.shape[0]
        default = _Plan(self, m, Algorithm(0))
        last = min(default.max_config_id(), MAX_CONFIGS - 1)

        def candidates():
            for config_id in range(last + 1):
                try:
                    plan = default if config_id == 0 else _Plan(self, m, Algorithm(config_id))
                    plan.run(x, y)  # the status check
                except CsltError:
                    continue  # a configuration this problem does not support
                yield plan.algorithm.key(), (lambda plan=plan: plan.run(x, y)), plan

        medians, finalists = fastest_of(candidates(), self.device, SEARCH_FINALISTS, SEARCH_FINAL_MS, skip=CsltError)
        if not finalists:
            return default
        self.search_us.pop(bucket, None)  # the newest search last
        self.search_us[bucket] = {key: round(t, 2) for key, t in medians.items()}
        return finalists[min(medians, key=medians.get)]

    def matmul(self, x: torch.Tensor, bucket: int | None = None, algorithm: Algorithm | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``x[M, K] @ W^T`` as ``[M, N]`` (``M`` a multiple of 8, ``x`` contiguous, same dtype and device).

        ``bucket`` groups token counts that share one algorithm search
        (default: ``M`` itself); ``algorithm`` forces one instead.
        """
        m, k = x.shape
        if k != self.cols or m % ALIGN_M or x.dtype != self.dtype or not x.is_contiguous() or x.device != self.device:
            raise ValueError(f"cuSPARSELt input must be a contiguous {self.dtype} [M, {self.cols}] on {self.device} with M a "
                             f"multiple of {ALIGN_M}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        bucket = m if bucket is None else bucket
        y = torch.empty((m, self.rows), dtype=self.dtype, device=self.device) if out is None else out
        self._plan(x, y, bucket, algorithm).run(x, y)
        return y

    def algorithm_for(self, bucket: int) -> Algorithm | None:
        return self.algorithms.get(bucket)


class PreparedMatmul:
    """:meth:`CsltWeight.matmul` for one token count and algorithm, its plan looked up once.

    A call here is an output allocation and the plan's launch: the checks and
    the plan lookup of :meth:`CsltWeight.matmul` cost more CPU time than the
    library call itself (issuing a 4096-token forward of four
    Llama-3-8B-shaped layers took 6.7 ms of an H200 host's CPU time before,
    5.1 ms after). ``x`` must be a contiguous ``[m, K]`` tensor of the
    weight's dtype on its device (not checked: the layer that prepared this
    call has checked it).
    """

    def __init__(self, weight: CsltWeight, x: torch.Tensor, bucket: int, algorithm: Algorithm | None) -> None:
        self.m, self.n = x.shape[0], weight.rows
        probe = x.new_empty((self.m, self.n))
        # both kept: the plan holds pointers into the weight's compressed buffer and its own workspace
        self.weight, self.plan = weight, weight._plan(x, probe, bucket, algorithm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty((self.m, self.n))
        self.plan.run(x, y)
        return y
