"""Which path runs a 2:4 layer for a given number of tokens: measured, never guessed.

For a layer shape ``(N, K)``, dtype and token bucket, every available path is
timed once on the real device, and the decision is kept in memory and on disk:

* ``triton``: the small-batch kernels, every configuration that
  :func:`~sparsa.kernels.triton_sparse24.candidate_configs` proposes (kernel
  kind, block sizes, warps, stages, split-K); buckets up to ``TRITON_MAX_M``
  tokens. This is the autotuning of the Triton kernels: its result is cached
  with the decision;
* ``cusparselt``: cuSPARSELt through :mod:`sparsa.kernels.cusparselt`, with
  the fastest of its algorithms for that bucket (kept in the cache, so the
  search runs once per shape and bucket);
* ``dense``: ``F.linear`` (cuBLAS) on the dense weight (decompressed for the
  measurement when the layer keeps none).

Timing: :func:`sparsa.kernels.timing.time_us` (the L2 cache flushed before
every call, the GPU kept busy while the call is issued, the median of several
repetitions). The decision is therefore the GPU's: what a call costs the CPU
(which bounds eager decoding without CUDA graphs) is not in it. Dense is timed
before and after the sparse candidates and keeps
the faster of the two, so a slow first measurement cannot make a sparse path
look better than it is. Each sparse output is also checked against the dense
product before it is timed; a path that disagrees is discarded.

The rule: the sparse layer must never be slower than dense. A sparse path is
chosen only when it beats dense by more than ``MARGIN`` (1%), and a win must
hold twice: the winner and dense are timed once more, and the winner keeps
the slower of its two times, dense the faster of its three.

Tokens are bucketed up to the next power of two (1, 2, 4, ..., 16384; more
than 16384 tokens use the 16384 decision).

Cache file (a :class:`~sparsa.kernels.decisions.DecisionCache`):
``<cache_dir>/dispatch-<gpu-name>.json`` (``cache_dir()`` from
:mod:`sparsa.models.loading`, ``$SPARSA_CACHE`` or ``~/.cache/sparsa``)::

    {"format": 7, "device": "NVIDIA H100 80GB HBM3",
     "versions": {"torch": "...", "triton": "...", "cusparselt": "..."},
     "entries": {"4096x4096:m16:bfloat16": {
         "times_us": {"dense": 14.1, "triton": 8.9, "cusparselt": 31.0},
         "triton_config": "gemv-n32-k256-s2-w4-p4", "cslt_algorithm": "alg3-split1-mode1",
         "choice": "triton", "errors": {}, "measured": "2026-..."}}}

Entries measured under other library versions are ignored (measured again).
During CUDA-graph capture nothing is measured: an unmeasured bucket then runs
Triton up to 64 tokens, else cuSPARSELt from 1024, else dense (not cached).
``SPARSA_DISPATCH_CACHE=0`` keeps decisions in memory only.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decisions import DecisionCache, shape_key
from .timing import flush_l2, time_us

__all__ = ["BUCKETS", "MARGIN", "Plan", "bucket", "cache_path", "choose", "flush_l2", "plan_for", "time_us"]

BUCKETS = tuple(1 << i for i in range(15))  # 1 .. 16384
MARGIN = 0.01
FORMAT = 7  # 7: cuSPARSELt ids picked with their calls interleaved; 6: launch costs kept out (older decisions are measured again)
TOLERANCE = 2e-2  # relative Frobenius error a sparse path may show against dense (fp16/bf16 rounding)
SPARSE_PATHS = ("triton", "cusparselt")


def bucket(m: int) -> int:
    """The measured token count that ``m`` tokens use: the next power of two, at most 16384."""
    for b in BUCKETS:
        if m <= b:
            return b
    return BUCKETS[-1]


@dataclass
class Plan:
    """The measured times of one (shape, dtype, bucket) and the best configuration of each path."""

    times_us: dict[str, float] = field(default_factory=dict)
    triton_config: str | None = None
    cslt_algorithm: str | None = None
    errors: dict[str, str] = field(default_factory=dict)
    measured: bool = True

    def best(self, allowed: tuple[str, ...] | list[str] = ("triton", "cusparselt", "dense")) -> str:
        """The path to run among ``allowed``: the fastest sparse one if it beats dense by ``MARGIN``."""
        inf = math.inf
        dense = self.times_us.get("dense", inf) if "dense" in allowed else inf
        sparse = [(self.times_us.get(p, inf), p) for p in SPARSE_PATHS if p in allowed]
        sparse = [(t, p) for t, p in sparse if t is not None and math.isfinite(t)]
        if sparse:
            t, p = min(sparse)
            if not math.isfinite(dense) or t < dense * (1 - MARGIN):
                return p
        if "dense" in allowed:
            return "dense"
        # no dense weight and nothing measured: the heuristic of the unmeasured case
        return next((p for p in allowed if p in SPARSE_PATHS), "dense")

    def config(self):
        if self.triton_config is None:
            return None
        from .triton_sparse24 import TritonConfig

        return TritonConfig.from_key(self.triton_config)

    def algorithm(self):
        if self.cslt_algorithm is None:
            return None
        from .cusparselt import Algorithm

        return Algorithm.from_key(self.cslt_algorithm)

    def as_dict(self) -> dict:
        return {
            "times_us": {k: (None if not math.isfinite(v) else round(v, 3)) for k, v in self.times_us.items()},
            "triton_config": self.triton_config,
            "cslt_algorithm": self.cslt_algorithm,
            "choice": self.best(),
            "errors": self.errors,
            "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        times = {k: (math.inf if v is None else float(v)) for k, v in d.get("times_us", {}).items()}
        return cls(times, d.get("triton_config"), d.get("cslt_algorithm"), dict(d.get("errors", {})))


# --------------------------------------------------------------------------- the cache


def _versions() -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    # the library sparsa calls (SPARSA_CUSPARSELT may name another than torch's): its algorithm ids differ by version
    from .cusparselt import library_version

    version = library_version() if torch.cuda.is_available() else None
    v["cusparselt"] = None if version is None else str(version)
    return v


_CACHE = DecisionCache("dispatch", FORMAT, _versions, "2:4 dispatch")
cache_path = _CACHE.path
clear_memory = _CACHE.clear_memory


# --------------------------------------------------------------------------- measuring

def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref32 = ref.float()
    return ((y.float() - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()


def measure(layer, m_bucket: int) -> Plan:
    """Time every path available for ``layer`` (a SparseLinear24 on CUDA) at ``m_bucket`` tokens."""
    from .triton_sparse24 import HAVE_TRITON, TRITON_MAX_M, _sm_count, candidate_configs

    device = layer.values.device
    dtype = layer.values.dtype
    n, k = layer.out_features, layer.in_features
    plan = Plan()
    with torch.no_grad():
        gen = torch.Generator(device=device).manual_seed(m_bucket)
        x = torch.randn((m_bucket, k), generator=gen, device=device, dtype=torch.float32).to(dtype)
        dense_w = layer.dense_weight if layer.dense_weight is not None else layer.weight
        bias = layer.bias
        ref = F.linear(x, dense_w, bias)
        dense_before = time_us(lambda: F.linear(x, dense_w, bias), device)

        if HAVE_TRITON and m_bucket <= TRITON_MAX_M:
            best = math.inf
            for cfg in candidate_configs(m_bucket, n, k, _sm_count(device)):
                t = _checked_time(plan, f"triton {cfg.key()}", lambda cfg=cfg: layer.run(x, "triton", config=cfg), ref, device)
                if t < best:
                    best, plan.triton_config = t, cfg.key()
            plan.times_us["triton"] = best
        else:
            plan.times_us["triton"] = math.inf  # not a candidate at this many tokens (or no triton)

        if "cusparselt" in layer.available_paths():
            # the checked first call runs the algorithm search for this bucket; the timing uses its pick
            t = _checked_time(plan, "cusparselt", lambda: layer.run(x, "cusparselt"), ref, device)
            found = layer.cslt.algorithm_for(m_bucket)
            plan.cslt_algorithm = None if found is None else found.key()
            plan.times_us["cusparselt"] = t
        dense = lambda: F.linear(x, dense_w, bias)  # noqa: E731
        plan.times_us["dense"] = min(dense_before, time_us(dense, device))
        winner = plan.best()
        if winner != "dense":  # confirm: a win measured once may be noise
            config = plan.config() if winner == "triton" else None
            again = time_us(lambda: layer.run(x, winner, config=config), device)
            plan.times_us[winner] = max(plan.times_us[winner], again)
            plan.times_us["dense"] = min(plan.times_us["dense"], time_us(dense, device))
    return plan


def _checked_time(plan: Plan, label: str, run, ref: torch.Tensor, device: torch.device) -> float:
    """Time ``run`` if its output matches ``ref``; a wrong or failing candidate is recorded and gets inf."""
    try:
        err = _rel_error(run(), ref)
        if not err < TOLERANCE:
            plan.errors[label] = f"relative error {err:.3g}"
            return math.inf
        return time_us(run, device)
    except Exception as exc:  # noqa: BLE001 - a failing candidate is skipped, and recorded
        plan.errors[label] = f"{type(exc).__name__}: {exc}"[:300]
        return math.inf


def _unmeasured(layer, m_bucket: int) -> Plan:
    """A plan without timing (during CUDA-graph capture): Triton for few tokens, else cuSPARSELt, else dense."""
    from .triton_sparse24 import HAVE_TRITON

    times = {}
    if HAVE_TRITON and m_bucket <= 64:
        times["triton"] = 1.0
    if "cusparselt" in layer.available_paths() and m_bucket >= 1024:
        times["cusparselt"] = 1.0
    return Plan(times, measured=False)


def plan_for(layer, m_bucket: int) -> Plan:
    """The (cached) plan of ``layer``'s shape and dtype at ``m_bucket`` tokens, measuring it if new."""
    key = shape_key(layer.out_features, layer.in_features, m_bucket, layer.values.dtype)
    entry = _CACHE.get(key)
    if entry is not None:
        plan = Plan.from_dict(entry)
        if all(p in plan.times_us for p in layer.available_paths()):
            return plan  # (measured with every path this layer has)
    if torch.cuda.is_current_stream_capturing():
        return _unmeasured(layer, m_bucket)
    plan = measure(layer, m_bucket)
    _CACHE.put(key, plan.as_dict())
    return plan


def choose(n: int, k: int, m_bucket: int, dtype: torch.dtype) -> str:
    """``"triton"``, ``"cusparselt"`` or ``"dense"`` for an ``(n, k)`` 2:4 layer at ``m_bucket`` tokens.

    Measures on the current CUDA device with a random 2:4 weight when the
    decision is not cached yet.
    """
    from ..errors import InputError

    if m_bucket not in BUCKETS:
        raise InputError(f"token bucket {m_bucket} is not one of {BUCKETS}; use dispatch.bucket(tokens)")
    if not torch.cuda.is_available():
        return "dense"
    entry = _CACHE.get(shape_key(n, k, m_bucket, dtype))
    if entry is not None:
        return Plan.from_dict(entry).best()
    from .sparse24 import SparseLinear24, random_24_linear

    layer = SparseLinear24.from_linear(random_24_linear(n, k, dtype, seed=n * 31 + k), f"random {n}x{k}")
    return plan_for(layer, m_bucket).best(layer.available_paths())
