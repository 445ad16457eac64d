"""The frontier report: a terminal table, PNG plots and one self-contained HTML file.

Accuracy is perplexity (lower is better); speed is the prefill and the
decode speedup over dense (higher is better), each with its own Pareto set.
Speeds are labelled "predicted" (cost model over stored GPU measurements)
or "measured" (this machine's GPU).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import math
import textwrap
from pathlib import Path

from .pareto import pareto_indices

__all__ = ["Row", "front_speed", "frontier_rows", "plot", "print_table", "write_html"]

FRONTIER_COLOUR = "#d62728"  # the frontier line; tests look for it in a screenshot
POINT_COLOUR = "#1f77b4"
DOMINATED_COLOUR = "#9a9a9a"
SPEEDS = (("prefill", "prefill_speedup"), ("decode", "decode_speedup"))


@dataclasses.dataclass
class Row:
    id: str
    label: str
    status: str
    perplexity: float = math.nan
    vs_dense: float = math.nan
    longctx: float | None = None
    prefill: float = math.nan
    decode: float = math.nan
    speed_kind: str = ""
    linear_sparsity: float | None = None
    activation_sparsity: float | None = None
    attention_density: float | None = None
    on_prefill_front: bool = False
    on_decode_front: bool = False
    notes: tuple[str, ...] = ()
    error: str = ""

    @property
    def frontier(self) -> str:
        return ", ".join(n for n, on in (("prefill", self.on_prefill_front), ("decode", self.on_decode_front)) if on)


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def front_speed(speed: dict, name: str) -> float:
    """The ``name`` speedup the Pareto sets compare. A measured speedup whose per-round ratios straddle 1.0 is
    not told apart from dense and counts as 1.0 (the table still shows the median)."""
    value = _num(speed.get(f"{name}_speedup"))
    bounds = speed.get(f"{name}_speedup_range")
    if bounds and min(bounds) <= 1.0 <= max(bounds):
        return 1.0
    return value


def frontier_rows(records: list[dict]) -> list[Row]:
    """One row per record, with the dense ratio and both Pareto memberships (on :func:`front_speed`)."""
    dense = next((r for r in records if r["id"] == "dense" and r.get("status") == "ok"), None)
    base = _num(dense.get("perplexity")) if dense else math.nan
    rows = []
    for r in records:
        speed = r.get("speed") or {}
        err = r.get("error") or {}
        rows.append(Row(
            id=r["id"], label=r.get("label", r["id"]), status=r.get("status", "?"),
            perplexity=_num(r.get("perplexity")), vs_dense=_num(r.get("perplexity")) / base if base == base else math.nan,
            longctx=(r.get("longctx") or {}).get("score"),
            prefill=_num(speed.get("prefill_speedup")), decode=_num(speed.get("decode_speedup")), speed_kind=speed.get("kind", ""),
            linear_sparsity=r.get("linear_sparsity"), activation_sparsity=r.get("activation_sparsity"),
            attention_density=r.get("attention_density"), notes=tuple(speed.get("notes", ())),
            error=f"{err.get('type', '')}: {err.get('message', '')}" if err else "",
        ))
    ok = [i for i, row in enumerate(rows) if row.status == "ok"]
    for name, _ in SPEEDS:
        points = [(front_speed(records[i].get("speed") or {}, name), rows[i].perplexity) for i in ok]
        for k in pareto_indices(points, higher_x=True, higher_y=False):
            setattr(rows[ok[k]], f"on_{name}_front", True)
    return rows


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


TABLE_COLUMNS = ["configuration", "perplexity", "vs dense", "long-ctx", "prefill x", "decode x", "speed", "frontier"]


def _cells(row: Row) -> list[str]:
    return [row.label, _fmt(row.perplexity, ".2f"), _fmt(row.vs_dense, ".2f") + ("x" if math.isfinite(row.vs_dense) else ""),
            _fmt(row.longctx, ".2f"), _fmt(row.prefill, ".3f"), _fmt(row.decode, ".3f"), row.speed_kind, row.frontier]


def print_table(rows: list[Row], title: str, *, all_rows: bool = False, console=None) -> None:
    """The Pareto set (or every row) as a rich table; failed configurations listed below it."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(150, Console().width))
    shown = [r for r in rows if r.status == "ok" and (all_rows or r.frontier)]
    shown.sort(key=lambda r: (-_sortable(r.decode), _sortable(r.perplexity)))
    table = Table(title=title, title_justify="left")
    for c in TABLE_COLUMNS:
        table.add_column(c, no_wrap=c == "configuration")
    for r in shown:
        table.add_row(*_cells(r))
    console.print(table)
    others = sum(1 for r in rows if r.status == "ok") - len(shown)
    if others > 0:
        console.print(f"{others} other configuration{'s' if others > 1 else ''} dominated on both speeds (all rows: the HTML report)")
    for r in rows:
        if r.status != "ok":
            console.print(f"failed: {r.label}: {r.error}", markup=False)


def _sortable(x: float) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[Row], path: str | Path, title: str, speed_note: str = "") -> Path | None:
    """Perplexity against prefill and decode speedup, the Pareto frontier drawn; None without matplotlib."""
    plt = _require_matplotlib()
    if plt is None:
        return None
    ok = [r for r in rows if r.status == "ok" and math.isfinite(r.perplexity)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), dpi=110)
    for ax, (name, _) in zip(axes, SPEEDS):
        pts = [r for r in ok if math.isfinite(getattr(r, name))]
        front = sorted((r for r in pts if getattr(r, f"on_{name}_front")), key=lambda r: getattr(r, name))
        rest = [r for r in pts if not getattr(r, f"on_{name}_front")]
        if pts and max(r.perplexity for r in pts) / max(min(r.perplexity for r in pts), 1e-9) > 5:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.scatter([getattr(r, name) for r in rest], [r.perplexity for r in rest], s=28, color=DOMINATED_COLOUR, label="dominated", zorder=2)
        ax.scatter([getattr(r, name) for r in front], [r.perplexity for r in front], s=46, color=POINT_COLOUR, label="Pareto frontier", zorder=3)
        if front:
            ax.plot([getattr(r, name) for r in front], [r.perplexity for r in front], color=FRONTIER_COLOUR, lw=2.2, zorder=2.5, drawstyle="steps-pre")
        _label(ax, pts, name)

        kinds = sorted({r.speed_kind for r in pts if r.speed_kind})
        ax.set_xlabel(f"{name} speedup over dense ({' / '.join(kinds) or 'n/a'})")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"{name}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        xs = [getattr(r, name) for r in pts]
        if xs:
            lo, hi = min(xs), max(xs)
            pad = max(0.05, (hi - lo) * 0.12)
            ax.set_xlim(lo - pad, hi + pad * 2.5)
    fig.suptitle(title + ("\n" + "\n".join(textwrap.wrap(speed_note, 150)) if speed_note else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _label(ax, pts: list[Row], name: str, radius: float = 8.0) -> None:
    """Name every point; points closer than ``radius`` pixels share one label, a line per name, best first."""
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel is final
    where = {id(r): ax.transData.transform((getattr(r, name), r.perplexity)) for r in pts}
    clusters: list[list[Row]] = []
    for r in sorted(pts, key=lambda r: r.perplexity):
        for c in clusters:
            if any(math.dist(where[id(r)], where[id(o)]) < radius for o in c):
                c.append(r)
                break
        else:
            clusters.append([r])
    blocks = []  # (x px, wanted centre y px, height px, text, on the frontier)
    for c in clusters:
        on = any(getattr(r, f"on_{name}_front") for r in c)
        c.sort(key=lambda r: -r.perplexity)  # top line: the highest point
        lines = list(dict.fromkeys(r.label for r in c))
        size = 7.5 if on else 6.5
        height = len(lines) * size * ax.figure.dpi / 72 * 1.3
        blocks.append([float(where[id(c[0])][0]), float(sum(where[id(r)][1] for r in c) / len(c)), height, "\n".join(lines), on, size])
    # labels in one column must not overlap: push each block up past the one below it
    blocks.sort(key=lambda b: (round(b[0] / 40), b[1]))
    for below, above in zip(blocks, blocks[1:]):
        if round(below[0] / 40) == round(above[0] / 40):
            above[1] = max(above[1], below[1] + (below[2] + above[2]) / 2 + 1)
    for x, y, _, text, on, size in blocks:
        ax.annotate(text, ax.transData.inverted().transform((x, y)), textcoords="offset points", xytext=(7, 0), va="center",
                    fontsize=size, color="black" if on else "#555555", annotation_clip=False)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1a1a1a; background: #ffffff; }
h1 { font-size: 20px; margin: 0 0 6px 0; }
p.meta { color: #555555; font-size: 13px; margin: 4px 0 14px 0; }
img.plot { max-width: 100%; border: 1px solid #dddddd; }
table { border-collapse: collapse; font-size: 13px; margin-top: 16px; }
th, td { border: 1px solid #dddddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.front td { font-weight: 600; }
td.notes { font-weight: 400; font-size: 11px; color: #555555; max-width: 420px; }
"""


def write_html(rows: list[Row], png: Path | None, path: str | Path, title: str, meta: list[str]) -> Path:
    """One self-contained HTML file: the plot as a data URI, then every configuration in a table."""
    from ..models.saving import atomic_write_text

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='meta'>{html.escape(m)}</p>" for m in meta]
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f"<img class='plot' alt='perplexity against speedup, Pareto frontier' src='data:image/png;base64,{data}'>")
    else:
        parts.append("<p class='meta'>(no plot: matplotlib is not installed; pip install 'sparsa[frontier]')</p>")
    head = TABLE_COLUMNS + ["linear sparsity", "activation sparsity", "attention density", "notes"]
    parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>")
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: (-_sortable(r.decode), _sortable(r.perplexity)))
    for r in ok:
        cells = _cells(r) + [_fmt(r.linear_sparsity, ".3f"), _fmt(r.activation_sparsity, ".3f"), _fmt(r.attention_density, ".3f")]
        parts.append(f"<tr class='{'front' if r.frontier else ''}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                     + f"<td class='notes'>{html.escape('; '.join(r.notes))}</td></tr>")
    parts.append("</tbody></table>")
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        parts.append("<h2 style='font-size:16px'>Failed configurations</h2><table><tr><th>configuration</th><th>error</th></tr>")
        parts += [f"<tr><td>{html.escape(r.label)}</td><td>{html.escape(r.error)}</td></tr>" for r in failed]
        parts.append("</table>")
    parts.append(f"<p class='meta'>written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by sparsa frontier</p></body></html>\n")
    atomic_write_text(path, "".join(parts))
    Path(path).chmod(0o644)  # a report to share, not a private temp file
    return Path(path)
