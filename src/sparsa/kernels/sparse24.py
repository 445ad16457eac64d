"""2:4 sparse linear layers: the compressed format and the module that runs it.

The format (``Compressed24``)
-----------------------------
A weight ``W[N, K]`` is 2:4 sparse along K: every group of four consecutive
inputs ``4g .. 4g+3`` of a row holds at most two nonzeros. K is padded with
zeros to ``Kp``, a multiple of 32 (cuSPARSELt needs 16; the Triton kernel
reads the metadata as int32 words of 8 groups); a padded group is simply all zero.

* ``values``: ``[N, Kp/2]``, W's dtype. Group ``g`` of row ``n`` keeps exactly
  two values, ``values[n, 2g]`` and ``values[n, 2g+1]``, in increasing input
  order. A group with fewer than two nonzeros stores explicit zeros at the
  lowest free positions, so every group has two *distinct* positions.
* ``meta``: ``uint8 [N, Kp/8]``, 4 bits per group, read as little-endian
  int32 *words* of eight groups. Word ``w`` of a row describes groups
  ``8w .. 8w+7``: group ``8w + j`` has the position (0..3) of its first kept
  value at bits ``s_j .. s_j+1``, ``s_j = 16 (j % 2) + 2 (j // 2)``, and that
  of its second at bits ``s_j+8 .. s_j+9`` (always first < second). So a
  word's byte 0 holds the first positions of its even groups, byte 1 their
  second positions, bytes 2 and 3 the same for the odd groups. Why this
  order: ``(word >> s_j) & 0x0303`` gives a kernel both positions of a group,
  one byte apart, with two instructions, and one multiply-add turns that into
  the selector of a byte permute (see :mod:`sparsa.kernels.triton_sparse24`).

So a weight costs ``Kp/2`` values + ``Kp/8`` bytes per row: 4.5 bytes per
group of four inputs instead of 8 (1.78x less memory traffic).

The module (``SparseLinear24``)
-------------------------------
Holds the compressed weight once for the Triton kernel (small token counts),
the cuSPARSELt-compressed weight for large token counts (when its kept values
turn out identical to ``values``, the two share memory), and, unless
``keep_dense=False``, a reference to the original dense weight for the token
counts where dense cuBLAS measures faster. ``forward`` picks the path per
token-count bucket from :mod:`sparsa.kernels.dispatch`. Inference only.

Memory beside the dense weight it references: 0.5625x of it for values +
metadata, and about as much again for cuSPARSELt's copy (only its metadata,
~0.06x, when the values are shared). With ``keep_dense=False`` the dense
weight can be freed. ``SPARSA_24_PATH=triton|cusparselt|dense`` forces one
path with default settings (tests, diagnosis); it is read when a token count
is first routed, so set it before a layer's first call.

After its first call with a given token count on a measured route, the layer
keeps that call prepared: on the Triton path it launches the compiled kernel
directly (:class:`~sparsa.kernels.triton_sparse24.PreparedCall`), on
cuSPARSELt it calls the library with arguments bound once
(:class:`~sparsa.kernels.cusparselt.PreparedMatmul`). Eager decoding, and
prefill between its large products, are bound by such per-call CPU costs.
Moves, casts and new ``values``/``meta``/``bias`` drop what was prepared.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, require
from ..prune.patterns import check_nm
from .cusparselt import ALIGN_M, ALIGN_ROWS
from .devices import on_input_device

if TYPE_CHECKING:
    from .cusparselt import CsltWeight

__all__ = [
    "PATHS",
    "Compressed24",
    "SparseLinear24",
    "compress_24",
    "cusparselt_available",
    "decompress_24",
    "is_24",
    "random_24",
    "random_24_linear",
]

K_ALIGN = 32  # Kp: K padded to a multiple of this (cuSPARSELt wants 16; the kernel reads metadata as int32 = 8 groups)
N_ALIGN_CSLT = ALIGN_ROWS  # cuSPARSELt also wants the sparse matrix's rows a multiple of 16
M_ALIGN_CSLT = ALIGN_M  # and the dense operand's rows (tokens) a multiple of 8
ROWS_PER_CHUNK = 1024  # compression works on slabs of rows to bound temporaries (~40 bytes per group)
PATHS = ("triton", "cusparselt", "dense")
DTYPES = (torch.float16, torch.bfloat16)
REMEMBERED = 16  # prepared calls, and input shapes bound to them, kept per layer


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _position_table() -> torch.Tensor:
    """For each 4-bit nonzero pattern, the two kept positions (int64 ``[16, 2]``).

    Patterns with more than two nonzeros never reach the table (checked first).
    """
    rows = []
    for code in range(16):
        kept = [p for p in range(4) if code >> p & 1][:2]
        for p in range(4):
            if len(kept) == 2:
                break
            if p not in kept:
                kept.append(p)
        rows.append(sorted(kept))
    return torch.tensor(rows, dtype=torch.int64)


_TABLE = _position_table()
# bit offset of the first position of group 8w + j in word w (the second's is 8 higher): see the docstring
META_SHIFTS = tuple(16 * (j % 2) + 2 * (j // 2) for j in range(8))


def _pack_meta(positions: torch.Tensor) -> torch.Tensor:
    """Positions ``[r, Kp/4, 2]`` (int64) as metadata bytes ``uint8 [r, Kp/8]``."""
    r, groups, _ = positions.shape
    shifts = torch.tensor(META_SHIFTS, device=positions.device)
    by_word = positions.reshape(r, groups // 8, 8, 2)
    words = ((by_word[..., 0] << shifts) | (by_word[..., 1] << (shifts + 8))).sum(2)  # [r, Kp/32], disjoint bits
    byte_shifts = torch.arange(0, 32, 8, device=positions.device)
    return ((words[..., None] >> byte_shifts) & 255).to(torch.uint8).reshape(r, groups // 2)


def _unpack_meta(meta: torch.Tensor) -> torch.Tensor:
    """Metadata bytes ``uint8 [N, Kp/8]`` back to positions ``[N, Kp/4, 2]`` (int64)."""
    n, nbytes = meta.shape
    byte_shifts = torch.arange(0, 32, 8, device=meta.device)
    words = (meta.to(torch.int64).reshape(n, nbytes // 4, 4) << byte_shifts).sum(2)
    shifts = torch.tensor(META_SHIFTS, device=meta.device)
    first = (words[..., None] >> shifts) & 3  # [N, Kp/32, 8]
    second = (words[..., None] >> (shifts + 8)) & 3
    return torch.stack((first, second), dim=3).reshape(n, nbytes * 2, 2)


@dataclass
class Compressed24:
    """A 2:4 weight in the layout described in the module docstring."""

    values: torch.Tensor  # [N, Kp/2], fp16/bf16
    meta: torch.Tensor  # uint8 [N, Kp/8]
    in_features: int  # K before padding

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def padded_in_features(self) -> int:
        return 2 * self.values.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def is_24(weight: torch.Tensor) -> bool:
    """Whether ``weight [N, K]`` has at most two nonzeros in every group of four inputs."""
    return weight.dim() == 2 and weight.shape[1] % 4 == 0 and check_nm(weight != 0, 2, 4)


def _label(name: str) -> str:
    return f"layer {name}" if name else "the layer"


def _require_24(weight: torch.Tensor, name: str) -> None:
    label = _label(name)
    require(weight.dim() == 2, f"{label}: a 2:4 weight is 2-D [out, in], got shape {tuple(weight.shape)}")
    require(
        weight.shape[1] % 4 == 0,
        f"{label} has {weight.shape[1]} input features, not a multiple of 4, so it cannot be 2:4 sparse; leave it dense",
    )
    require(
        check_nm(weight != 0, 2, 4),
        f"{label} is not 2:4 sparse (a group of 4 inputs has more than 2 nonzeros); prune it with --pattern 2:4 first",
    )


def compress_24(weight: torch.Tensor, name: str = "") -> Compressed24:
    """Compress a 2:4 ``weight [N, K]`` (any float dtype, any device) into values + metadata.

    Raises ``InputError`` (naming ``name``) unless the weight is 2:4 sparse.
    """
    _require_24(weight, name)
    n, k = weight.shape
    kp = _round_up(k, K_ALIGN)
    values = torch.empty((n, kp // 2), dtype=weight.dtype, device=weight.device)
    meta = torch.empty((n, kp // 8), dtype=torch.uint8, device=weight.device)
    table = _TABLE.to(weight.device)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = weight[start : start + ROWS_PER_CHUNK]
        if kp != k:
            rows = F.pad(rows, (0, kp - k))
        groups = rows.reshape(rows.shape[0], kp // 4, 4)
        nz = groups != 0
        code = nz[..., 0] | (nz[..., 1] << 1) | (nz[..., 2] << 2) | (nz[..., 3] << 3)  # [r, Kp/4] in 0..15
        positions = table[code.long()]  # [r, Kp/4, 2], first < second
        values[start : start + rows.shape[0]] = torch.gather(groups, 2, positions).reshape(rows.shape[0], kp // 2)
        meta[start : start + rows.shape[0]] = _pack_meta(positions)
    return Compressed24(values, meta, k)


def random_24(n: int, k: int, dtype: torch.dtype, seed: int, device: str = "cuda") -> torch.Tensor:
    """A random 2:4 weight (two of every four inputs kept, chosen at random), built in slabs of rows."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.empty(n, k, device=device, dtype=dtype)
    step = 4096
    for start in range(0, n, step):
        rows = min(step, n - start)
        block = torch.randn(rows, k, generator=g, device=device).mul_(0.02)
        keep = torch.rand(rows, k // 4, 4, generator=g, device=device).argsort(dim=2)[..., :2]
        mask = torch.zeros(rows, k // 4, 4, dtype=torch.bool, device=device).scatter_(2, keep, True)
        w[start : start + rows] = (block * mask.reshape(rows, k)).to(dtype)
    return w


def random_24_linear(n: int, k: int, dtype: torch.dtype, seed: int, device: str = "cuda") -> nn.Linear:
    """A bias-free ``nn.Linear`` with a :func:`random_24` weight (for measurements and benchmarks)."""
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(random_24(n, k, dtype, seed, device))
    return linear


def decompress_24(compressed: Compressed24) -> torch.Tensor:
    """The dense ``[N, K]`` weight back from its compressed form (exact)."""
    values, meta = compressed.values, compressed.meta
    n, half = values.shape
    kp = 2 * half
    positions = _unpack_meta(meta)  # [N, Kp/4, 2]
    dense = torch.zeros((n, kp // 4, 4), dtype=values.dtype, device=values.device)
    dense.scatter_(2, positions, values.reshape(n, kp // 4, 2))
    return dense.reshape(n, kp)[:, : compressed.in_features].contiguous()


# --------------------------------------------------------------------------- cuSPARSELt


def cusparselt_available() -> bool:
    """cuSPARSELt usable here: a CUDA GPU and the library (see :mod:`sparsa.kernels.cusparselt`).

    ``SPARSA_CUSPARSELT=0`` turns the path off.
    """
    if os.environ.get("SPARSA_CUSPARSELT", "1") == "0" or not torch.cuda.is_available():
        return False
    from .cusparselt import load_library

    return load_library() is not None


# --------------------------------------------------------------------------- the module


def _remember(cache: dict, key, value, size: int = REMEMBERED) -> None:
    """``cache[key] = value``, the oldest entry dropped beyond ``size`` (prompt lengths vary without bound).

    A dropped call or binding is made again on its next use (one slower call).
    """
    if len(cache) >= size:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _shaped(call, m: int, k: int, out_shape: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
    """``call`` (on ``[m, k]`` rows) for inputs of one shape: flatten, run, give the output its shape.

    A call that knows a faster way for one input shape offers ``bind(out_shape, rows)``, ``rows`` being
    this flatten-and-run for the inputs its way does not take.
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(m, k)
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        return call(x2d).view(out_shape)

    bind = getattr(call, "bind", None)
    return forward if bind is None else bind(out_shape, forward)


class _DenseCall:
    """The dense route: ``F.linear``, which takes any leading shape itself (no reshape around it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def bind(self, out_shape: tuple, rows) -> "_DenseCall":
        return self


class SparseLinear24(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is 2:4 sparse, for inference on a CUDA GPU.

    Build it with :meth:`from_linear`. ``forward`` accepts ``x [..., K]`` in
    the layer's dtype and routes by the number of tokens (see
    :mod:`sparsa.kernels.dispatch`).
    """

    def __init__(
        self,
        compressed: Compressed24,
        bias: torch.Tensor | None = None,
        *,
        name: str = "",
        dense_weight: torch.Tensor | None = None,
        cslt: "CsltWeight | None" = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_features = compressed.in_features
        self.out_features = compressed.out_features
        self.padded_in_features = compressed.padded_in_features
        self.register_buffer("values", compressed.values)
        self.register_buffer("meta", compressed.meta)
        # not a buffer: module casts and moves (model.half(), .to()) must leave cuSPARSELt's bytes alone
        self.cslt = cslt
        self.register_buffer("dense_weight", dense_weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.cslt_rows = _round_up(self.out_features, N_ALIGN_CSLT)
        self._routes: dict[tuple, tuple] = {}  # (token bucket, dtype) -> (path, triton config, cuSPARSELt algorithm)
        # (input shape, dtype, device index) -> that input's whole forward, its checks passed once
        self._bound: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._calls: dict[int, object] = {}  # tokens -> a call bound once on the measured route
        self.shares_values = False

    # ----------------------------------------------------------------- building

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "", *, keep_dense: bool = True) -> "SparseLinear24":
        """Compress ``linear`` (2:4 sparse, fp16/bf16, on CUDA) once; ``InputError`` names ``name`` otherwise.

        ``keep_dense`` keeps a reference to the dense weight (no copy) so that
        token counts where cuBLAS is faster run dense; without it those run on
        the faster sparse path and the dense weight can be freed.
        """
        require(isinstance(linear, nn.Linear), f"{_label(name)} is a {type(linear).__name__}, not nn.Linear")
        weight = linear.weight.detach()
        _require_24(weight, name)
        require(
            weight.dtype in DTYPES,
            f"{_label(name)} has dtype {str(weight.dtype).replace('torch.', '')}; 2:4 kernels need float16 or "
            "bfloat16: load the model in one of them (e.g. --dtype bfloat16)",
        )
        require(
            weight.is_cuda,
            f"{_label(name)} is on {weight.device}; 2:4 kernels need a CUDA GPU: move the model to cuda first",
        )
        with torch.no_grad(), torch.cuda.device(weight.device):
            compressed = compress_24(weight, name)
            bias = None if linear.bias is None else linear.bias.detach()
            cslt = None
            if cusparselt_available():
                try:
                    cslt = cls._cslt_compress(weight, compressed.padded_in_features)
                except (RuntimeError, ValueError) as exc:
                    warnings.warn(f"{_label(name)}: cuSPARSELt compression failed ({exc}); using the Triton and dense paths", RuntimeWarning)
            layer = cls(compressed, bias, name=name, dense_weight=weight if keep_dense else None, cslt=cslt)
            layer._share_values()
        return layer

    @staticmethod
    def _cslt_compress(weight: torch.Tensor, kp: int) -> "CsltWeight":
        from .cusparselt import CsltWeight

        n, k = weight.shape
        rows = _round_up(n, N_ALIGN_CSLT)
        if rows != n or kp != k:
            weight = F.pad(weight, (0, kp - k, 0, rows - n))
        return CsltWeight(weight)

    def _cslt_ready(self) -> bool:
        return self.cslt is not None and self.cslt.dtype == self.values.dtype and self.cslt.device == self.values.device

    def _share_values(self) -> None:
        """Point ``values`` into the cuSPARSELt buffer when its kept values are ours, in our order.

        cuSPARSELt may store the kept values first; where they match exactly
        (checked, not assumed), the Triton path reads them from there and our
        copy is freed.
        """
        if not self._cslt_ready():
            return
        nbytes = self.values.numel() * self.values.element_size()
        raw = self.cslt.compressed
        if raw.numel() < nbytes or self.cslt.rows != self.out_features:
            return
        candidate = raw[:nbytes].view(self.values.dtype).view(self.values.shape)
        if torch.equal(candidate, self.values):
            self.values = candidate
            self.shares_values = True

    # ----------------------------------------------------------------- running

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (kept, or rebuilt from the compressed form: slow, for inspection)."""
        if self.dense_weight is not None:
            return self.dense_weight
        return decompress_24(Compressed24(self.values, self.meta, self.in_features))

    def available_paths(self) -> tuple[str, ...]:
        from . import triton_sparse24

        paths = []
        if triton_sparse24.HAVE_TRITON:
            paths.append("triton")
        if self._cslt_ready():
            paths.append("cusparselt")
        if self.dense_weight is not None:
            paths.append("dense")
        return tuple(paths)

    def run(self, x2d: torch.Tensor, path: str, *, config=None, algorithm=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x2d [M, K] @ W^T + bias`` on one named path (``triton``, ``cusparselt`` or ``dense``).

        ``config`` is the Triton configuration, ``algorithm`` the cuSPARSELt one
        (None: sparsa's search over cuSPARSELt's configurations, once per token bucket).
        """
        if path == "triton":
            from .triton_sparse24 import sparse24_matmul

            return sparse24_matmul(x2d, self.values, self.meta, self.in_features, self.bias, config, out=out)
        if path == "cusparselt":
            y = self._run_cslt(x2d, algorithm)
        elif path == "dense":
            require(self.dense_weight is not None, f"{_label(self.name)} kept no dense weight (keep_dense=False)")
            y = F.linear(x2d, self.dense_weight, self.bias)
        else:
            raise InputError(f"unknown 2:4 path {path!r}; choose one of: {', '.join(PATHS)}")
        if out is not None:
            out.copy_(y)
            return out
        return y

    def _run_cslt(self, x2d: torch.Tensor, algorithm) -> torch.Tensor:
        from .dispatch import bucket

        require(self._cslt_ready(), f"{_label(self.name)} has no cuSPARSELt weight (cuSPARSELt unavailable)")
        m, k = x2d.shape
        rows = _round_up(m, M_ALIGN_CSLT)
        if rows != m or self.padded_in_features != k:
            x2d = F.pad(x2d, (0, self.padded_in_features - k, 0, rows - m))
        elif not x2d.is_contiguous():
            x2d = x2d.contiguous()
        y = self.cslt.matmul(x2d, bucket=bucket(m), algorithm=algorithm)
        if rows != m or self.cslt_rows != self.out_features:
            y = y[:m, : self.out_features]
        if self.bias is not None:
            y += self.bias
        return y

    def _route_key(self, m: int) -> tuple:
        from .dispatch import bucket

        return (bucket(m), self.values.dtype)

    def route(self, m: int) -> tuple:
        """``(path, triton config, cuSPARSELt algorithm)`` for ``m`` tokens, measured once per bucket."""
        from . import dispatch

        key = self._route_key(m)
        route = self._routes.get(key)
        if route is None:
            paths = self.available_paths()
            forced = os.environ.get("SPARSA_24_PATH")  # for tests and diagnosis: one path, default settings
            if forced:
                require(forced in paths, f"SPARSA_24_PATH={forced} but {_label(self.name)} can run: {', '.join(paths)}")
                return (forced, None, None)
            plan = dispatch.plan_for(self, key[0])
            route = (plan.best(paths), plan.config(), plan.algorithm())
            if plan.measured:
                self._routes[key] = route
        return route

    @on_input_device()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.dtype, x.get_device())
        bound = self._bound.get(key)
        if bound is not None and not (x.requires_grad and torch.is_grad_enabled()):
            return bound(x)  # an input like one already checked and routed: a decode step's every call
        if x.shape[-1] != self.in_features:
            raise InputError(f"{_label(self.name)} expects {self.in_features} input features, got shape {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise InputError(f"{_label(self.name)} is {self.values.dtype} but got a {x.dtype} input; cast the input or the model")
        if x.device != self.values.device:
            raise InputError(f"{_label(self.name)} is on {self.values.device} but got an input on {x.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise InputError(f"{_label(self.name)}: 2:4 sparse layers are inference-only; run under torch.no_grad()")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        m = x2d.shape[0]
        call = self._calls.get(m)
        if call is None:
            path, config, algorithm = self.route(m)
            if self._route_key(m) not in self._routes:  # forced, or not measured (graph capture): no binding
                return self.run(x2d, path, config=config, algorithm=algorithm).reshape(*lead, self.out_features)
            call = self._prepare(x2d, path, config, algorithm)
            if call is None:
                return self.run(x2d, path, config=config, algorithm=algorithm).reshape(*lead, self.out_features)
            _remember(self._calls, m, call)
        bound = _shaped(call, m, self.in_features, (*lead, self.out_features))
        _remember(self._bound, key, bound)
        return bound(x)

    def _prepare(self, x2d: torch.Tensor, path: str, config, algorithm):
        """A call bound once for ``x2d``'s token count on its measured path, or None where one does not apply."""
        m = x2d.shape[0]
        if path == "triton" and config is not None:
            from .triton_sparse24 import PreparedCall

            return PreparedCall(m, self.values, self.meta, self.in_features, self.bias, config)
        unpadded = m % M_ALIGN_CSLT == 0 and self.padded_in_features == self.in_features and self.cslt_rows == self.out_features
        if path == "cusparselt" and self._cslt_ready() and unpadded:
            from .cusparselt import PreparedMatmul
            from .dispatch import bucket

            prepared, bias = PreparedMatmul(self.cslt, x2d.contiguous(), bucket(m), algorithm), self.bias

            def call(x: torch.Tensor) -> torch.Tensor:
                y = prepared(x.contiguous())  # (x itself when it already is)
                return y if bias is None else y.add_(bias)

            return call
        if path == "dense" and self.dense_weight is not None:
            return _DenseCall(self.dense_weight, self.bias)
        return None

    def _forget_prepared(self) -> None:
        self._bound.clear()
        self._calls.clear()
        self._routes.clear()

    def _apply(self, fn, *args, **kwargs):
        # a move or cast makes new tensors: prepared calls and routes would point at the old ones
        self._forget_prepared()
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):
        if name in ("values", "meta", "bias") and "_calls" in self.__dict__:  # (also load_state_dict(assign=True))
            self._forget_prepared()
        super().__setattr__(name, value)

    def __getstate__(self):
        # prepared calls hold compiled kernels, which neither copy nor pickle; they are made again on use
        state = self.__dict__.copy()
        state["_calls"], state["_bound"] = {}, {}
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={self.values.dtype}, paths={','.join(self.available_paths())}"
        )
