"""Which operand layout makes cuSPARSELt's 2:4 product fastest? Every layout, each with its best configuration id.

    PYTHONPATH=src python benchmarks/cslt_layouts.py [--models 8B,70B] [--tokens 4096,16384] [--name cslt_layouts]

``y[M, N] = x[M, K] @ W[N, K]^T`` can be handed to cuSPARSELt in several
ways that leave x, W and y where they are in memory (or, for one, W copied
transposed once at compression). sparsa uses ``a_row``: the weight is the
structured operand A, row-major, and x and y are read as column-major
matrices (so both inputs are K-major, the layout dense GEMMs favour). The
others:

=========  ==================================================================
a_row      A = W (N x K, row-major), B = x (K x M, column-major), D = y (N x M, column-major)
a_t        A^T stored as W's memory read column-major (K x N), op(A) = transpose
a_col      A = W copied transposed once (N x K, column-major: the sparse operand MN-major)
b_t        as a_row, but B = x read row-major (M x K) with op(B) = transpose
sparse_b   D = y (M x N, row-major) = x (M x K, row-major) @ B, B = W^T (K x N, column-major) structured
sparse_bt  as sparse_b, but B stored as W (N x K, row-major) with op(B) = transpose
=========  ==================================================================

Each layout runs in its own process (a configuration that stops the CUDA
context with an illegal instruction loses only that layout), and each case's
row is kept as it arrives (``results/NAME.partial.jsonl``: a cut run resumes;
``--fresh`` starts over; rows from another GPU are not resumed). In it, for
each Llama-3 shape, dtype and token count, configuration ids 0 to 31 (the
ids sparsa's search tries, ``cusparselt.MAX_CONFIGS``) go through sparsa's
own search (:func:`sparsa.kernels.timing.fastest_of`, with the settings
:meth:`~sparsa.kernels.cusparselt.CsltWeight._search` uses), with dense
cuBLAS (``F.linear``) timed among the finalists, their calls interleaved.
Until 2026-12-04 21:00 UTC the script ran its own copy of the search (five
calls per id, 300 ms for the finalists): the two runs kept were taken so. A layout's speed-up is dense's
median over its fastest finalist's, measured in that one interleaved run.
Id 0's and the fastest id's outputs are checked against a float32 reference
(written into a NaN-filled output). Split-K is left at the library's
default.

Goal: sparsa's layout (``a_row``) within 2% of the fastest layout in every case.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from sparsa.benchmarking import Journal, goal, print_goals, write_results

_OP_N, _OP_T = 0, 1  # cusparseOperation_t: non-transpose, transpose


@dataclass(frozen=True)
class Layout:
    """How ``y = x @ W^T`` is described to cuSPARSELt."""

    sparse_a: bool  # the weight is the structured A (else the structured B)
    transposed_copy: bool  # the weight is copied transposed before compression
    sparse_op_t: bool  # the structured operand goes through a transpose op
    dense_op_t: bool  # x goes through a transpose op

    def shapes(self, m: int, n: int, k: int):
        """(structured operand, dense operand, output) descriptors' (rows, cols, ld, row_major)."""
        if self.sparse_a:
            if self.transposed_copy:
                sparse = (n, k, n, False)
            elif self.sparse_op_t:
                sparse = (k, n, k, False)
            else:
                sparse = (n, k, k, True)
            dense = (m, k, k, True) if self.dense_op_t else (k, m, k, False)
            return sparse, dense, (n, m, n, False)
        sparse = (n, k, k, True) if self.sparse_op_t else (k, n, k, False)
        return sparse, (m, k, k, True), (m, n, n, True)

    @property
    def op_sparse(self) -> int:
        return _OP_T if self.sparse_op_t else _OP_N

    @property
    def op_dense(self) -> int:
        return _OP_T if self.dense_op_t else _OP_N

    def matmul_ops(self) -> tuple[int, int]:
        """(op A, op B) for ``cusparseLtMatmulDescriptorInit``."""
        return (self.op_sparse, self.op_dense) if self.sparse_a else (self.op_dense, self.op_sparse)

    def operands(self, sparse, dense) -> tuple:
        """(A, B), in that order, of a structured and a dense thing (descriptors or data pointers)."""
        return (sparse, dense) if self.sparse_a else (dense, sparse)


LAYOUTS = {
    "a_row": Layout(True, False, False, False),
    "a_t": Layout(True, False, True, False),
    "a_col": Layout(True, True, False, False),
    "b_t": Layout(True, False, False, True),
    "sparse_b": Layout(False, False, False, False),
    "sparse_bt": Layout(False, False, True, False),
}


class _Structs:
    """cuSPARSELt structs, each destroyed (in reverse order) when this object goes."""

    def __init__(self, lib) -> None:
        self.lib, self.live = lib, []

    def made(self, destroy: str, struct):
        self.live.append((destroy, struct))
        return struct

    def __del__(self) -> None:
        for destroy, struct in reversed(self.live):
            try:
                getattr(self.lib, destroy)(struct.ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class _LayoutMatmul:
    """One compressed weight in one layout, and one plan per configuration id for one token count."""

    def __init__(self, layout: Layout, w: torch.Tensor) -> None:
        from sparsa.kernels import cusparselt as cs

        self.cs, self.layout, self.lib = cs, layout, cs._LIB
        self.n, self.k = w.shape
        self.h = cs._handle(w.device).ptr
        self.cuda_type = cs._CUDA_TYPE[w.dtype]
        self.structs = _Structs(self.lib)
        source = w.t().contiguous() if layout.transposed_copy else w
        self.sparse = self._descriptor("cusparseLtStructuredDescriptorInit", layout.shapes(8, self.n, self.k)[0],
                                       cs._SPARSITY_50)
        size, scratch_size = ctypes.c_size_t(0), ctypes.c_size_t(0)
        cs._check(self.lib.cusparseLtSpMMACompressedSize2(self.h, self.sparse.ptr, ctypes.byref(size), ctypes.byref(scratch_size)),
                  "compressed size")
        self.compressed = torch.empty(size.value, dtype=torch.uint8, device=w.device)
        scratch = torch.empty(max(scratch_size.value, 1), dtype=torch.uint8, device=w.device)
        cs._check(self.lib.cusparseLtSpMMACompress2(
            self.h, self.sparse.ptr, int(layout.sparse_a), layout.op_sparse, ctypes.c_void_p(source.data_ptr()),
            ctypes.c_void_p(self.compressed.data_ptr()), ctypes.c_void_p(scratch.data_ptr()),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "compress")
        torch.cuda.synchronize()

    def _descriptor(self, init: str, shape: tuple, *extra, structs: _Structs | None = None):
        cs = self.cs
        rows, cols, ld, row_major = shape
        struct = cs._Opaque()
        cs._check(getattr(self.lib, init)(self.h, struct.ptr, rows, cols, ld, 16, self.cuda_type,
                                          cs._ORDER_ROW if row_major else cs._ORDER_COL, *extra), init)
        return (structs or self.structs).made("cusparseLtMatDescriptorDestroy", struct)

    def plan(self, m: int, config_id: int):
        """A function ``run(x, y)`` for ``m`` tokens and configuration id (raises CsltError where unsupported), and the id count."""
        cs, lib, h, layout = self.cs, self.lib, self.h, self.layout
        structs = _Structs(lib)  # this plan's own, destroyed with ``run``
        _, dense_shape, out_shape = layout.shapes(m, self.n, self.k)
        dense = self._descriptor("cusparseLtDenseDescriptorInit", dense_shape, structs=structs)
        out = self._descriptor("cusparseLtDenseDescriptorInit", out_shape, structs=structs)
        matmul, alg, plan = cs._Opaque(), cs._Opaque(), cs._Opaque()
        mat_a, mat_b = layout.operands(self.sparse, dense)
        cs._check(lib.cusparseLtMatmulDescriptorInit(h, matmul.ptr, *layout.matmul_ops(), mat_a.ptr, mat_b.ptr, out.ptr,
                                                     out.ptr, cs._COMPUTE_32F), "matmul descriptor")
        cs._check(lib.cusparseLtMatmulAlgSelectionInit(h, alg.ptr, matmul.ptr, cs._ALG_DEFAULT), "algorithm selection")
        structs.made("cusparseLtMatmulAlgSelectionDestroy", alg)
        value, top = ctypes.c_int(config_id), ctypes.c_int(0)
        cs._check(lib.cusparseLtMatmulAlgSetAttribute(h, alg.ptr, cs._ATTR_CONFIG_ID, ctypes.byref(value),
                                                      ctypes.sizeof(value)), "set algorithm")
        cs._check(lib.cusparseLtMatmulAlgGetAttribute(h, alg.ptr, cs._ATTR_CONFIG_MAX_ID, ctypes.byref(top),
                                                      ctypes.sizeof(top)), "max id")
        cs._check(lib.cusparseLtMatmulPlanInit(h, plan.ptr, matmul.ptr, alg.ptr), "plan init")
        structs.made("cusparseLtMatmulPlanDestroy", plan)
        size = ctypes.c_size_t(0)
        cs._check(lib.cusparseLtMatmulGetWorkspace(h, plan.ptr, ctypes.byref(size)), "workspace size")
        workspace = torch.empty(max(size.value, 1), dtype=torch.uint8, device=self.compressed.device)
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        streams = (ctypes.c_void_p * 1)()

        def run(x: torch.Tensor, y: torch.Tensor) -> None:
            a, b = layout.operands(self.compressed.data_ptr(), x.data_ptr())
            streams[0] = torch.cuda.current_stream().cuda_stream
            cs._check(lib.cusparseLtMatmul(h, plan.ptr, ctypes.byref(alpha), a, b, ctypes.byref(beta), y.data_ptr(),
                                           y.data_ptr(), workspace.data_ptr(), streams, 1), "matmul")

        run.owners = (self, structs, matmul, workspace)  # the weight and the plan's structs live as long as ``run``
        return run, top.value


def _key(row: dict) -> tuple:
    return row["layout"], row["model"], row["layer"], row["dtype"], row["m"]


def worker(name: str, models: set[str], tokens: list[int], done: dict) -> None:
    """Time one layout on every case not ``done``; one JSON line per case on stdout."""
    import torch.nn.functional as F

    from sparsa.kernels import cusparselt as cs
    from sparsa.kernels.bench_linear import DTYPES, SHAPES, rel_error
    from sparsa.kernels.sparse24 import random_24
    from sparsa.kernels.timing import fastest_of

    if cs.load_library() is None:
        sys.exit("cslt_layouts.py needs cuSPARSELt")
    layout, device = LAYOUTS[name], torch.device("cuda")
    where = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cusparselt=cs.library_version())
    for model, group in SHAPES.items():
        if model not in models:
            continue
        for layer, n, k in group:
            for dname, dtype in DTYPES.items():
                case = dict(layout=name, model=model, layer=layer, n=n, k=k, dtype=dname, **where)
                todo = [m for m in tokens if _key(dict(case, m=m)) not in done]
                if not todo:
                    continue
                w = random_24(n, k, dtype, seed=n + k, device="cuda")
                try:
                    op = _LayoutMatmul(layout, w)
                except cs.CsltError as exc:
                    for m in todo:
                        print(json.dumps(dict(case, m=m, error=str(exc))), flush=True)
                    continue
                for m in todo:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    y = torch.empty(m, n, device=device, dtype=dtype)
                    t0 = time.perf_counter()
                    try:
                        run, top = op.plan(m, 0)
                    except cs.CsltError as exc:
                        print(json.dumps(dict(case, m=m, error=str(exc))), flush=True)
                        continue
                    ref = x.float() @ w.float().t()

                    def error_of(fn) -> float:  # every output element written, and right
                        y.fill_(float("nan"))
                        fn(x, y)
                        return rel_error(y, ref)

                    error = error_of(run)

                    def candidates():
                        for config_id in range(min(top, cs.MAX_CONFIGS - 1) + 1):
                            try:
                                fn, _ = op.plan(m, config_id)
                                fn(x, y)
                            except cs.CsltError:
                                continue
                            yield f"alg{config_id}", (lambda fn=fn: fn(x, y)), fn

                    medians, finalists = fastest_of(candidates(), device, cs.SEARCH_FINALISTS, cs.SEARCH_FINAL_MS,
                                                    beside={"dense": lambda: F.linear(x, w)}, skip=cs.CsltError)
                    if not finalists:
                        print(json.dumps(dict(case, m=m, error="no configuration id ran")), flush=True)
                        continue
                    dense_us = medians.pop("dense")
                    best = min(medians, key=medians.get)
                    error_best = error_of(finalists[best])
                    del ref
                    print(json.dumps(dict(case, m=m, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ids=top + 1,
                                          ids_tried=min(top, cs.MAX_CONFIGS - 1) + 1, error_rel=error, error_best=error_best,
                                          correct=max(error, error_best) < 1e-2, best=best,
                                          best_us=round(medians[best], 2), dense_us=round(dense_us, 2),
                                          speedup=dense_us / medians[best], finalists_us={key: round(t, 2) for key, t in medians.items()},
                                          seconds=round(time.perf_counter() - t0, 1))), flush=True)


def compare(rows: list[dict], ours: str = "a_row") -> dict:
    """Layouts against each other over the cases every layout ran correctly: each one's mean speed-up,
    how often each was the fastest, and ``ours``'s worst relative loss to a case's fastest layout."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("correct") and "speedup" in r:
            cases.setdefault((r["model"], r["layer"], r["dtype"], r["m"]), {})[r["layout"]] = r["speedup"]
    names = set().union(*cases.values()) if cases else set()
    common = [by_layout for by_layout in cases.values() if set(by_layout) == names]
    wins: dict[str, int] = {}
    for by_layout in common:
        fastest = max(by_layout, key=by_layout.get)
        wins[fastest] = wins.get(fastest, 0) + 1
    losses = [1.0 - c[ours] / max(c.values()) for c in common] if ours in names else []
    return {
        "mean_speedup": {name: statistics.mean(c[name] for c in common) for name in sorted(names)} if common else {},
        "common_cases": len(common),
        "fastest_counts": wins,
        "worst_loss": round(max(losses), 4) if losses else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="8B,70B", help="which models' shapes, comma-separated (8B, 70B)")
    parser.add_argument("--tokens", default="4096,16384", help="token counts M, comma-separated (multiples of 8)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--name", default="cslt_layouts", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = {m.strip().upper() for m in args.models.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    if not torch.cuda.is_available():
        sys.exit("cslt_layouts.py needs a CUDA GPU")
    if args.worker:
        return worker(args.worker, models, tokens, Journal(args.name, key=_key).done)
    from sparsa.kernels.cusparselt import library_version

    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, cuSPARSELt {library_version()}", flush=True)
    started, failures = time.perf_counter(), {}
    journal = Journal(args.name, key=_key, fresh=args.fresh)
    elsewhere = {r.get("gpu") for r in journal.done.values()} - {torch.cuda.get_device_name()}
    if elsewhere:  # rows kept by a run on another GPU are not resumed here
        print(f"starting over: the kept rows were measured on {', '.join(map(str, sorted(elsewhere, key=str)))}", flush=True)
        journal = Journal(args.name, key=_key, fresh=True)
    for name in args.layouts.split(","):
        command = [sys.executable, __file__, "--worker", name, "--models", args.models, "--tokens", args.tokens,
                   "--name", args.name]
        with tempfile.TemporaryFile("w+") as stderr, subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True) as worker_process:  # a file: no pipe to fill
            for line in worker_process.stdout:  # each row is kept as it arrives: a cut run resumes after it
                if not line.startswith("{"):
                    continue
                r = journal.append(json.loads(line))
                text = (f"{r['speedup']:.3f}x {r['best']:>6} {r['best_us']:9.1f} us  dense {r['dense_us']:9.1f} us  "
                        f"err {max(r['error_rel'], r['error_best']):.1e}" if "speedup" in r else f"error: {r['error'][:80]}")
                print(f"{name:10} {r['model']:4} {r['layer']:8} {r['dtype']:5} {r['m']:6}  {text}", flush=True)
            worker_process.wait()
            stderr.seek(0)
            last = stderr.read().strip().splitlines()[-1:]
        if worker_process.returncode:
            failures[name] = f"exit {worker_process.returncode}: {' '.join(last)}"[:300]
            print(f"{name}: {failures[name]}", flush=True)
    rows = list(journal.done.values())
    compared = compare(rows)
    print(f"mean speed-up over dense by layout, over the {compared['common_cases']} cases all ran: "
          + ", ".join(f"{k} {v:.3f}x" for k, v in sorted(compared["mean_speedup"].items())), flush=True)
    print(f"fastest layout per case: {compared['fastest_counts']}", flush=True)
    goals = [goal("a_row's worst loss to the fastest layout", compared["worst_loss"], 0.02)]
    print_goals(goals)
    path = write_results(args.name, dict(models=sorted(models), tokens=tokens, layouts={k: vars(v) for k, v in LAYOUTS.items()},
                                         **compared, failures=failures,
                                         elapsed_s=round(time.perf_counter() - started, 1), cases=rows), goals)
    if failures:
        print(f"saved {path}; the rows stay in {journal.path} so that a rerun resumes the layouts that failed", flush=True)
    else:
        journal.finish()
        print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
