"""Which operand layout makes cuSPARSELt's 2:4 product fastest? Every layout, each with its best configuration id.

    PYTHONPATH=src python benchmarks/cslt_layouts.py [--models 8B,70B] [--tokens 4096,16384] [--name cslt_layouts]

``y[M, N] = x[M, K] @ W[N, K]^T`` can be handed to cuSPARSELt in several
ways that leave x, W and y where they are in memory (or, for one, W copied
transposed once at compression). sparsa uses ``a_row``: the weight is the
structured operand A, row-major, and x and y are read as column-major
matrices (so every operand is K-major, the layout dense GEMMs favour). The
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
``--fresh`` starts over). In it, for each
Llama-3 shape, dtype and token count: the product is checked against a float32
reference, every configuration id is timed as the dispatcher times paths
(:func:`sparsa.kernels.timing.time_us`), and the three fastest are timed again
side by side with dense cuBLAS (``F.linear``), their calls interleaved
(:func:`sparsa.kernels.timing.time_each`). A layout's speed-up is dense's
median over its fastest finalist's, measured in that one interleaved run.

Goal: sparsa's layout (``a_row``) within 2% of the fastest layout in every case.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from sparsa.benchmarking import Journal, goal, print_goals, write_results

FINALISTS = 3
FINAL_BUDGET_MS = 300.0


@dataclass(frozen=True)
class Layout:
    """How ``y = x @ W^T`` is described to cuSPARSELt; sizes as (rows, cols, leading dimension, order)."""

    sparse_a: bool
    transposed_copy: bool  # the weight is copied transposed before compression
    sparse_op_t: bool
    dense_op_t: bool

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


LAYOUTS = {
    "a_row": Layout(True, False, False, False),
    "a_t": Layout(True, False, True, False),
    "a_col": Layout(True, True, False, False),
    "b_t": Layout(True, False, False, True),
    "sparse_b": Layout(False, False, False, False),
    "sparse_bt": Layout(False, False, True, False),
}


class _LayoutMatmul:
    """One compressed weight in one layout, and one plan per configuration id for one token count."""

    def __init__(self, layout: Layout, w: torch.Tensor) -> None:
        from sparsa.kernels import cusparselt as cs

        self.cs, self.layout, self.lib = cs, layout, cs._LIB
        self.n, self.k = w.shape
        self.dtype, self.device = w.dtype, w.device
        self.h = cs._handle(w.device).ptr
        self.cuda_type = cs._CUDA_TYPE[w.dtype]
        source = w.t().contiguous() if layout.transposed_copy else w
        rows, cols, ld, row_major = layout.shapes(8, self.n, self.k)[0]
        self.sparse = cs._Opaque()
        cs._check(self.lib.cusparseLtStructuredDescriptorInit(
            self.h, self.sparse.ptr, rows, cols, ld, 16, self.cuda_type, cs._ORDER_ROW if row_major else cs._ORDER_COL,
            cs._SPARSITY_50), "structured descriptor")
        size, scratch_size = ctypes.c_size_t(0), ctypes.c_size_t(0)
        cs._check(self.lib.cusparseLtSpMMACompressedSize2(self.h, self.sparse.ptr, ctypes.byref(size), ctypes.byref(scratch_size)),
                  "compressed size")
        self.compressed = torch.empty(size.value, dtype=torch.uint8, device=self.device)
        scratch = torch.empty(max(scratch_size.value, 1), dtype=torch.uint8, device=self.device)
        op = 1 if layout.sparse_op_t else cs._OP_N
        cs._check(self.lib.cusparseLtSpMMACompress2(
            self.h, self.sparse.ptr, int(layout.sparse_a), op, ctypes.c_void_p(source.data_ptr()),
            ctypes.c_void_p(self.compressed.data_ptr()), ctypes.c_void_p(scratch.data_ptr()),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "compress")
        torch.cuda.synchronize()

    def plan(self, m: int, config_id: int):
        """A function ``run(x, y)`` for ``m`` tokens and configuration id (raises CsltError where unsupported), and the id count."""
        cs, lib, h = self.cs, self.lib, self.h
        layout = self.layout
        _, dense, out = layout.shapes(m, self.n, self.k)
        keep = [cs._Opaque() for _ in range(5)]
        mat_dense, mat_out, matmul, alg, plan = keep

        def order(row_major):
            return cs._ORDER_ROW if row_major else cs._ORDER_COL

        cs._check(lib.cusparseLtDenseDescriptorInit(h, mat_dense.ptr, dense[0], dense[1], dense[2], 16, self.cuda_type,
                                                    order(dense[3])), "dense descriptor")
        cs._check(lib.cusparseLtDenseDescriptorInit(h, mat_out.ptr, out[0], out[1], out[2], 16, self.cuda_type,
                                                    order(out[3])), "output descriptor")
        op_sparse = 1 if layout.sparse_op_t else cs._OP_N
        op_dense = 1 if layout.dense_op_t else cs._OP_N
        if layout.sparse_a:
            ops, mats = (op_sparse, op_dense), (self.sparse.ptr, mat_dense.ptr)
        else:
            ops, mats = (op_dense, op_sparse), (mat_dense.ptr, self.sparse.ptr)
        cs._check(lib.cusparseLtMatmulDescriptorInit(h, matmul.ptr, ops[0], ops[1], mats[0], mats[1], mat_out.ptr,
                                                     mat_out.ptr, cs._COMPUTE_32F), "matmul descriptor")
        cs._check(lib.cusparseLtMatmulAlgSelectionInit(h, alg.ptr, matmul.ptr, cs._ALG_DEFAULT), "algorithm selection")
        value = ctypes.c_int(config_id)
        cs._check(lib.cusparseLtMatmulAlgSetAttribute(h, alg.ptr, cs._ATTR_CONFIG_ID, ctypes.byref(value),
                                                      ctypes.sizeof(value)), "set algorithm")
        top = ctypes.c_int(0)
        cs._check(lib.cusparseLtMatmulAlgGetAttribute(h, alg.ptr, cs._ATTR_CONFIG_MAX_ID, ctypes.byref(top),
                                                      ctypes.sizeof(top)), "max id")
        cs._check(lib.cusparseLtMatmulPlanInit(h, plan.ptr, matmul.ptr, alg.ptr), "plan init")
        size = ctypes.c_size_t(0)
        cs._check(lib.cusparseLtMatmulGetWorkspace(h, plan.ptr, ctypes.byref(size)), "workspace size")
        workspace = torch.empty(max(size.value, 1), dtype=torch.uint8, device=self.device)
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        streams = (ctypes.c_void_p * 1)()
        compressed = self.compressed.data_ptr()

        def run(x: torch.Tensor, y: torch.Tensor) -> None:
            a, b = (compressed, x.data_ptr()) if layout.sparse_a else (x.data_ptr(), compressed)
            streams[0] = torch.cuda.current_stream().cuda_stream
            run.keep = (keep, workspace)  # the plan's structs and workspace live as long as this function
            cs._check(lib.cusparseLtMatmul(h, plan.ptr, ctypes.byref(alpha), a, b, ctypes.byref(beta), y.data_ptr(),
                                           y.data_ptr(), workspace.data_ptr(), streams, 1), "matmul")

        run.keep = (keep, workspace)
        return run, top.value


def _key(row: dict) -> tuple:
    return row["layout"], row["model"], row["layer"], row["dtype"], row["m"]


def worker(name: str, models: set[str], tokens: list[int], done: dict) -> None:
    """Time one layout on every case not ``done``; one JSON line per case on stdout."""
    import torch.nn.functional as F

    from sparsa.kernels import cusparselt as cs
    from sparsa.kernels.bench_linear import DTYPES, SHAPES, rel_error
    from sparsa.kernels.sparse24 import random_24
    from sparsa.kernels.timing import time_each, time_us

    if cs.load_library() is None:
        sys.exit("cslt_layouts.py needs cuSPARSELt")
    layout, device = LAYOUTS[name], torch.device("cuda")
    where = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cusparselt=cs.library_version())
    for model, group in SHAPES.items():
        if model not in models:
            continue
        for layer, n, k in group:
            for dname, dtype in DTYPES.items():
                w = random_24(n, k, dtype, seed=n + k, device="cuda")
                case = dict(layout=name, model=model, layer=layer, n=n, k=k, dtype=dname, **where)
                todo = [m for m in tokens if _key(dict(case, m=m)) not in done]
                if not todo:
                    continue
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
                    y.fill_(float("nan"))
                    run(x, y)
                    error = rel_error(y, x.float() @ w.float().t())
                    timed = []
                    for config_id in range(min(top, cs.MAX_CONFIGS - 1) + 1):
                        try:
                            fn, _ = op.plan(m, config_id)
                            fn(x, y)
                        except cs.CsltError:
                            continue
                        timed.append((time_us(lambda fn=fn: fn(x, y), device, reps=5), config_id, fn))
                        timed = sorted(timed, key=lambda t: t[:2])[:FINALISTS]
                    fns = {f"alg{cid}": (lambda fn=fn: fn(x, y)) for _, cid, fn in timed}
                    fns["dense"] = lambda: F.linear(x, w)
                    medians = time_each(fns, device, budget_ms=FINAL_BUDGET_MS)
                    dense_us = medians.pop("dense")
                    best = min(medians, key=medians.get)
                    print(json.dumps(dict(case, m=m, ids=top + 1, error_rel=error, correct=error < 1e-2, best=best,
                                          best_us=round(medians[best], 2), dense_us=round(dense_us, 2),
                                          speedup=dense_us / medians[best], finalists_us={key: round(t, 2) for key, t in medians.items()},
                                          seconds=round(time.perf_counter() - t0, 1))), flush=True)


def compare(rows: list[dict], ours: str = "a_row") -> dict:
    """Layouts against each other over the correct rows: each layout's mean speed-up over the cases every
    layout ran, how often each was the fastest, and ``ours``'s worst relative loss to the fastest layout of a case."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("correct") and "speedup" in r:
            cases.setdefault((r["model"], r["layer"], r["dtype"], r["m"]), {})[r["layout"]] = r["speedup"]
    names = set().union(*cases.values()) if cases else set()
    common = [by_layout for by_layout in cases.values() if set(by_layout) == names]
    wins: dict[str, int] = {}
    losses = []
    for by_layout in cases.values():
        if ours in by_layout:
            fastest = max(by_layout, key=by_layout.get)
            wins[fastest] = wins.get(fastest, 0) + 1
            losses.append(1.0 - by_layout[ours] / by_layout[fastest])
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
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as worker_process:
            for line in worker_process.stdout:  # each row is kept as it arrives: a cut run resumes after it
                if not line.startswith("{"):
                    continue
                r = journal.append(json.loads(line))
                text = (f"{r['speedup']:.3f}x {r['best']:>6} {r['best_us']:9.1f} us  dense {r['dense_us']:9.1f} us  "
                        f"err {r['error_rel']:.1e}" if "speedup" in r else f"error: {r['error'][:80]}")
                print(f"{name:10} {r['model']:4} {r['layer']:8} {r['dtype']:5} {r['m']:6}  {text}", flush=True)
            stderr = worker_process.stderr.read().strip()
        if worker_process.returncode:
            failures[name] = f"exit {worker_process.returncode}: {stderr.splitlines()[-1] if stderr else ''}"[:300]
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
    journal.finish()
    print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
