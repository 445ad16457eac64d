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
