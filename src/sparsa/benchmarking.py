"""What every benchmark records: where it ran, with what, when, and which goals it met.

Goals are computed from measurements, never typed in: ``goal("load+eval s",
measured=41.2, target=60, better="lower")``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

# SPARSA_RESULTS redirects results (e.g. to the folder a GPU machine sends back).
RESULTS = Path(os.environ.get("SPARSA_RESULTS", Path(__file__).resolve().parents[2] / "benchmarks" / "results"))


def environment() -> dict:
    import torch
    import transformers

    from . import __version__

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "sparsa": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["versions"]["cuda"] = torch.version.cuda
        try:
            import triton

            env["versions"]["triton"] = triton.__version__
        except ImportError:
            pass
        from .kernels.cusparselt import library_version

        # the library sparsa calls (SPARSA_CUSPARSELT may name another than torch's)
        env["versions"]["cusparselt"] = str(library_version())
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores)"
    return env


def goal(name: str, measured: float, target: float, better: str = "lower") -> dict:
    """One goal, met or not, from a measured number."""
    if better not in ("lower", "higher"):
        raise ValueError("better is 'lower' or 'higher'")
    met = measured <= target if better == "lower" else measured >= target
    return {"name": name, "measured": measured, "target": target, "better": better, "met": bool(met)}


def write_results(name: str, payload: dict, goals: list[dict], directory: Path | None = None) -> Path:
    """Save ``benchmarks/results/NAME.json`` atomically, with environment and goals."""
    from .models.saving import atomic_write_text

    path = (directory or RESULTS) / f"{name}.json"
    document = {"benchmark": name, **environment(), "goals": goals, **payload}
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")
    return path


class Journal:
    """Finished rows of a long benchmark, one JSON line each in ``RESULTS/NAME.partial.jsonl``.

    A rerun skips what is already there, so an interrupted run resumes;
    ``fresh=True`` starts over. ``key`` names a row (it must be the same for a
    row read back from disk, i.e. built from JSON types).
    """

    def __init__(self, name: str, key, fresh: bool = False, directory: Path | None = None) -> None:
        self.path = (directory or RESULTS) / f"{name}.partial.jsonl"
        self.key = key
        if fresh and self.path.exists():
            self.path.unlink()
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []
        self.done: dict = {key(row): row for row in rows}

    def __contains__(self, key) -> bool:
        return key in self.done

    def append(self, row: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # one line per write: a crash loses at most the row being written
            f.write(json.dumps(row, default=str) + "\n")
        self.done[self.key(row)] = row
        return row

    def finish(self) -> None:
        """Forget the rows (the run is complete and its results are saved)."""
        self.path.unlink(missing_ok=True)


def cuda_median_ms(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median GPU time of ``fn()`` in milliseconds: CUDA events around each call, after ``warmup`` untimed calls."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved(measures: dict, rounds: int) -> dict[str, list[float]]:
    """Run each of several measurements once per round, in an order that rotates from round to round.

    ``measures`` maps a name to a function that measures once and returns a
    number (e.g. ``lambda: cuda_median_ms(fn, reps=4)``); the result maps each
    name to its ``rounds`` numbers. A GPU's clock drifts over seconds: cool,
    it boosts; under sustained load it settles at its power limit. Measuring
    one candidate fully and then the next hands the cool start to whichever
    goes first; alternating spreads the drift over all of them alike.
    """
    names = list(measures)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(measures[name]())
    return results


def print_goals(goals: list[dict]) -> None:
    for g in goals:
        mark = "met" if g["met"] else "NOT met"
        cmp = "<=" if g["better"] == "lower" else ">="
        print(f"  goal {g['name']}: measured {g['measured']:.4g} {cmp} target {g['target']:.4g}: {mark}")
