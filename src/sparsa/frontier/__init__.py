"""The sparsity frontier: which sparsity to ship, in one sweep.

``frontier(model, "sweep.toml", out="frontier")`` runs every configuration of
a sweep (weights x attention x activations, and their combinations) on one
model, appends each result to ``out/results.jsonl`` as it finishes (a rerun
resumes), and writes the report: the Pareto table in the terminal,
``out/frontier.png`` and the self-contained ``out/report.html``.

Modules: ``config`` (typed configurations, the sweep TOML), ``sweep`` (JSONL,
resume, Ray), ``costmodel`` (speed predicted from stored GPU measurements),
``pareto`` and ``report``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import ActivationSpec, AttentionSpec, Config, Settings, Sweep, WeightSpec, default_sweep_path, load_sweep, parse_sweep
from .pareto import dominates, pareto_indices
from .sweep import ResultStore, evaluate_config, run_sweep

__all__ = [
    "ActivationSpec", "AttentionSpec", "Config", "FrontierResult", "ResultStore", "Settings", "Sweep", "WeightSpec",
    "default_sweep_path", "dominates", "evaluate_config", "frontier", "load_sweep", "pareto_indices", "parse_sweep",
    "run_sweep", "write_report",
]


@dataclasses.dataclass
class FrontierResult:
    records: list[dict]
    rows: list  # report.Row, one per configuration
    results: Path
    png: Path | None
    html: Path

    @property
    def pareto(self) -> list:
        """Rows on the prefill or the decode frontier."""
        return [r for r in self.rows if r.frontier]


def _title(model_name: str) -> str:
    return f"{model_name}: the sparsity frontier (perplexity vs speedup)"


def speed_note(records: list[dict]) -> str:
    kinds = {(r.get("speed") or {}).get("kind") for r in records if r.get("status") == "ok"}
    sources = sorted({s for r in records for s in (r.get("speed") or {}).get("sources", [])})
    devices = sorted({(r.get("speed") or {}).get("device") for r in records if (r.get("speed") or {}).get("device")})
    if kinds == {"measured"}:
        modes = [(r.get("speed") or {}).get("decode_mode", "eager") for r in records if r.get("status") == "ok"]
        eager = modes.count("eager")
        how = ("decode from CUDA graphs" if not eager else "decode eager, no CUDA graph" if eager == len(modes)
               else f"decode from CUDA graphs, eager for {eager} configuration(s) whose step could not be captured")
        return f"speed measured on {', '.join(devices)} ({how})"
    if "predicted" in kinds:
        src = ", ".join(f"benchmarks/results/{s}" for s in sources) or "no stored measurement applied"
        return f"speed PREDICTED by sparsa's cost model from stored GPU measurements ({src}), not measured here"
    return ""


def write_report(records: list[dict], out: str | os.PathLike, *, model_name: str, settings: dict | None = None,
                 print_table: bool = True, all_rows: bool = False):
    """Table (terminal), ``frontier.png`` and ``report.html`` from the records; returns (rows, png, html)."""
    from . import report

    out = Path(out)
    rows = report.frontier_rows(records)
    note = speed_note(records)
    title = _title(model_name)
    png = report.plot(rows, out / "frontier.png", title, note)
    meta = [note]
    if settings:
        meta.append(f"perplexity: {settings.get('perplexity_tokens') or 'all'} tokens of the {settings.get('text')} text in windows of "
                    f"{settings.get('seq_len')}; prefill speed at {settings.get('prefill_tokens')} tokens, decode at a "
                    f"{settings.get('decode_context')}-token context"
                    + (f"; long-context tasks ({', '.join(settings.get('longctx_tasks'))}) at {settings.get('longctx_length')} tokens"
                       if settings.get("longctx_tasks") else ""))
    meta.append("Bold rows are on the Pareto frontier of perplexity against prefill or decode speedup. A measured speedup "
                "whose rounds straddle 1.0 counts as 1.0 there: it is not told apart from dense.")
    html = report.write_html(rows, png, out / "report.html", title, meta)
    if print_table:
        report.print_table(rows, f"{model_name}: Pareto frontier ({note.split(' (')[0] if note else 'speed'})", all_rows=all_rows)
    return rows, png, html


def frontier(model: str | os.PathLike | None = None, config: str | os.PathLike | Sweep | None = None, out: str | os.PathLike = "frontier", *,
             fresh: bool = False, ray: str | None = None, device: str = "cpu", dtype: str = "auto", max_tokens: int | None = None,
             progress: bool = True, print_table: bool = True, all_rows: bool = False) -> FrontierResult:
    """Run (or resume) a sweep on ``model`` and write its report under ``out``.

    ``config``: a sweep TOML path or a :class:`Sweep` (default: the shipped
    default sweep). ``max_tokens`` overrides the perplexity token budget.
    ``ray``: a Ray address, or ``"local"`` for an in-process Ray instance.
    """
    sweep = config if isinstance(config, Sweep) else load_sweep(config, perplexity_tokens=max_tokens)
    if max_tokens is not None and isinstance(config, Sweep):
        sweep = dataclasses.replace(sweep, settings=dataclasses.replace(sweep.settings, perplexity_tokens=max_tokens))
    records = run_sweep(sweep, None if model is None else str(model), out, fresh=fresh, ray=ray, device=device, dtype=dtype, progress=progress)
    name = _model_name(model)
    rows, png, html = write_report(records, out, model_name=name, settings=sweep.settings.to_dict(), print_table=print_table, all_rows=all_rows)
    return FrontierResult(records, rows, Path(out) / "results.jsonl", png, html)


def _model_name(model) -> str:
    if model is None:
        from ..models.loading import DEFAULT_NAME

        return DEFAULT_NAME
    return Path(str(model)).name or str(model)
