"""What benchmarks record: goals computed from measurements, and journals that let a long run resume."""

import json

import pytest

from sparsa.benchmarking import Journal, goal, interleaved, write_results


def test_goal_compares_in_the_stated_direction():
    assert goal("speedup", 1.6, 1.5, better="higher")["met"]
    assert not goal("speedup", 1.4, 1.5, better="higher")["met"]
    assert goal("perplexity ratio", 1.0, 1.0)["met"] and not goal("perplexity ratio", 1.01, 1.0)["met"]
    with pytest.raises(ValueError):
        goal("x", 1.0, 1.0, better="bigger")


def test_journal_resumes_skips_done_rows_and_starts_over_when_fresh(tmp_path):
    key = lambda row: (row["method"], row["level"])  # noqa: E731
    first = Journal("run", key, directory=tmp_path)
    first.append({"method": "teal", "level": 0.5, "value": 1.0})
    first.append({"method": "wina", "level": 0.5, "value": 2.0})
    again = Journal("run", key, directory=tmp_path)  # what an interrupted run finds
    assert ("teal", 0.5) in again and ("wina", 0.25) not in again
    assert again.done[("wina", 0.5)]["value"] == 2.0
    assert not Journal("run", key, fresh=True, directory=tmp_path).done
    assert not (tmp_path / "run.partial.jsonl").exists()
    done = Journal("run", key, directory=tmp_path)
    done.append({"method": "teal", "level": 0.5, "value": 1.0})
    done.finish()
    assert not (tmp_path / "run.partial.jsonl").exists()


def test_results_carry_environment_and_goals(tmp_path):
    path = write_results("unit", {"rows": [1, 2]}, [goal("x", 1.0, 2.0)], directory=tmp_path)
    document = json.loads(path.read_text())
    assert document["benchmark"] == "unit" and document["rows"] == [1, 2] and document["goals"][0]["met"]
    assert {"date", "device", "versions"} <= set(document)


def test_interleaved_rotates_the_order_every_round():
    calls = []
    measures = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("dense", "ours", "peer")}
    results = interleaved(measures, rounds=4)
    assert calls == ["dense", "ours", "peer", "ours", "peer", "dense", "peer", "dense", "ours", "dense", "ours", "peer"]
    assert results == {"dense": [1, 6, 8, 10], "ours": [2, 4, 9, 11], "peer": [3, 5, 7, 12]}


def _cslt_layouts():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cslt_layouts.py"
    spec = importlib.util.spec_from_file_location("cslt_layouts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cslt_layouts", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_cslt_layout_describes_the_same_memory_as_y_equals_x_w_transposed():
    """Each layout's descriptors, read with their ops, address x, W (or its one transposed copy) and y where they lie."""
    layouts = _cslt_layouts().LAYOUTS
    m, n, k = 24, 48, 64

    def addr(desc, i, j):  # element (i, j) of a stored matrix, in elements from its start
        rows, cols, ld, row_major = desc
        assert 0 <= i < rows and 0 <= j < cols and ld >= (cols if row_major else rows)
        return i * ld + j if row_major else j * ld + i

    for name, layout in layouts.items():
        sparse, dense, out = layout.shapes(m, n, k)
        w_addr = (lambda nn, kk: kk * n + nn) if layout.transposed_copy else (lambda nn, kk: nn * k + kk)
        for mm, nn, kk in [(0, 0, 0), (m - 1, n - 1, k - 1), (5, 17, 33), (23, 1, 62)]:
            if layout.sparse_a:  # D[N, M] = op(A)[N, K] @ op(B)[K, M]
                a = (kk, nn) if layout.sparse_op_t else (nn, kk)
                b = (mm, kk) if layout.dense_op_t else (kk, mm)
                assert addr(sparse, *a) == w_addr(nn, kk), name
                assert addr(dense, *b) == mm * k + kk, name
                assert addr(out, nn, mm) == mm * n + nn, name
            else:  # D[M, N] = op(A)[M, K] @ op(B)[K, N]
                b = (nn, kk) if layout.sparse_op_t else (kk, nn)
                assert addr(dense, mm, kk) == mm * k + kk, name
                assert addr(sparse, *b) == w_addr(nn, kk), name
                assert addr(out, mm, nn) == mm * n + nn, name


def test_cslt_layouts_compares_layouts_on_the_cases_all_of_them_ran():
    compare = _cslt_layouts().compare
    row = lambda layout, m, speedup, correct=True: dict(layout=layout, model="8B", layer="o", dtype="fp16", m=m,  # noqa: E731
                                                       speedup=speedup, correct=correct)
    rows = [row("a_row", 4096, 1.40), row("a_col", 4096, 1.47), row("b_t", 4096, 1.41),
            row("a_row", 16384, 1.50), row("a_col", 16384, 1.45), row("b_t", 16384, 9.0, correct=False),
            row("a_row", 8, 2.0), row("a_col", 8, 2.0), row("b_t", 8, 2.2),
            row("a_row", 64, 1.0)]  # a case the others did not reach: no win and no loss for anyone
    got = compare(rows)
    assert got["common_cases"] == 2  # 16384 lacks a correct b_t, 64 has a_row alone
    assert got["mean_speedup"] == pytest.approx({"a_col": 1.735, "a_row": 1.70, "b_t": 1.805})
    assert got["fastest_counts"] == {"a_col": 1, "b_t": 1}
    assert got["worst_loss"] == pytest.approx(round(1 - 2.0 / 2.2, 4))  # the worst case, not the first


def test_cslt_layouts_hand_the_structured_operand_to_the_side_its_layout_names():
    module = _cslt_layouts()
    m, n, k = 24, 48, 64
    for name, layout in module.LAYOUTS.items():
        sparse, dense, _ = layout.shapes(m, n, k)
        op_a, op_b = layout.matmul_ops()
        a, b = layout.operands("compressed W", "x")
        assert (a == "compressed W") == layout.sparse_a and {a, b} == {"compressed W", "x"}, name
        op_sparse, op_dense = (op_a, op_b) if layout.sparse_a else (op_b, op_a)
        # the product's shapes: op(A) is [rows of D, K] and op(B) is [K, columns of D]
        (sr, sc), (dr, dc) = sparse[:2], dense[:2]
        op_s = (sc, sr) if op_sparse == 1 else (sr, sc)
        op_d = (dc, dr) if op_dense == 1 else (dr, dc)
        if layout.sparse_a:
            assert op_s == (n, k) and op_d == (k, m), name
        else:
            assert op_d == (m, k) and op_s == (k, n), name
        assert layout.op_sparse == op_sparse and layout.op_dense == op_dense, name


def test_linear24_summary_keeps_the_rounds_headline_and_the_interleaved_timing_beside_it():
    from sparsa.kernels.bench_linear import format_case, format_summary, summarize

    case = lambda m, ratio, together=None, correct=True: dict(  # noqa: E731
        model="8B", layer="o", n=4096, k=4096, dtype="bf16", m=m, path="cusparselt", correct=correct, dense_us=1.0,
        ours_us=1.0 / ratio, ratio_ours=ratio, **({} if together is None else {"ratio_ours_interleaved": together}))
    cases = [case(4096, 1.46, 1.50), case(16384, 1.52, 1.56), case(1, 1.7), case(4096, 3.0, 3.0, correct=False)]
    s = summarize(cases)
    assert s["mean_ratio_m_ge_4096"] == pytest.approx(1.49) and s["mean_ratio_m_ge_4096_interleaved"] == pytest.approx(1.53)
    assert s["wrong"] == 1 and s["min_ratio"] == pytest.approx(1.46)
    assert "1.490 in rounds, 1.530 interleaved" in format_summary(s)[-1]
    assert "1.50x" in format_case(cases[0]) and "1.70x" in format_case(cases[2])
    # a file from before 2026-12-04 (no interleaved timing) mixed with a newer one: no interleaved mean over part of the cases
    assert summarize([case(4096, 1.46, 1.50), case(16384, 1.52)])["mean_ratio_m_ge_4096_interleaved"] is None


def test_fastest_of_shortlists_then_times_the_finalists_beside_the_reference(monkeypatch):
    """What the cuSPARSELt search and the layout study share: the fastest few by time_us (the earlier on a tie,
    a failing one left out), then those and the reference timed together; only finalists are kept."""
    from sparsa.kernels import timing

    alone = {"a": 5.0, "b": 3.0, "c": 3.0, "d": 9.0, "e": 1.0}
    monkeypatch.setattr(timing, "time_us", lambda fn, device: fn())
    seen = []
    monkeypatch.setattr(timing, "time_each", lambda fns, device, budget_ms: seen.append((set(fns), budget_ms))
                        or {name: 10.0 * alone.get(name, 0.5) for name in fns})

    def fails():
        raise KeyError("unsupported")

    def candidates():
        for name in "abcdxe":
            yield name, (fails if name == "x" else (lambda name=name: alone[name])), f"plan {name}"

    medians, kept = timing.fastest_of(candidates(), "cpu", finalists=3, final_ms=50.0, beside={"dense": lambda: 0.0},
                                      skip=KeyError)
    assert kept == {"e": "plan e", "b": "plan b", "c": "plan c"}  # b before c: the earlier on a tie
    assert seen == [({"e", "b", "c", "dense"}, 50.0)]
    assert medians == {"e": 10.0, "b": 30.0, "c": 30.0, "dense": 5.0}
    with pytest.raises(KeyError):
        timing.fastest_of(candidates(), "cpu")  # not skipped unless asked
    assert timing.fastest_of(iter(()), "cpu") == ({}, {})
