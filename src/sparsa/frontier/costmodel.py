"""Predicted GPU speedup of a sparse model, from the GPU measurements the project stores.

Used when no GPU is present. Time is split Amdahl-style between the decoder
linears (and the head) and attention, for this model's own shapes:

* prefill of ``L`` tokens is compute-bound: a linear costs ``2 L n k`` FLOPs,
  causal attention ``2 H d L^2`` per layer;
* one decode step at context ``L`` is memory-bound: a linear reads its
  ``n k`` weights, attention reads ``2 H_kv d L`` cached values per layer.

Each part is then divided by the speedup its kernel measured on an H100:

* 2:4 weights (every linear whose weight is exactly 2:4): sparsa's
  ``SparseLinear24`` over dense cuBLAS at the nearest token counts
  (``linear24.json``, geometric mean over layer shapes, interpolated in
  log tokens); unstructured or other N:M patterns have no kernel: 1.0x;
  structured pruning is a smaller dense model, counted from its shapes;
* activation sparsity, decode only: the sparse GEMV over dense at the
  nearest measured sparsity (``activation_speed.json``); teal and wina cut
  every projection input, cats the down projection's; where a layer is both
  2:4 and activation-sparse the faster kernel counts (they do not combine);
* sparse attention, prefill: dense time x (density / kernel efficiency) plus
  the pattern's mask-estimation time (``attention_speed.json``, nearest
  length), with the density measured in this run; decode patterns (quest)
  have no stored measurement: 1.0x.

Numbers are read from the JSON files when called, never typed in. Whatever
a file lacks is predicted as 1.0x and said in ``notes``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["ModelCost", "Prediction", "measurements_dir", "model_cost", "predict"]


def measurements_dir() -> Path:
    from ..benchmarking import RESULTS

    return Path(RESULTS)


@lru_cache(maxsize=16)
def _read(directory: str, name: str) -> dict | None:
    path = Path(directory) / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class LinearCost:
    name: str
    numel: int  # weight elements (out x in)
    is_24: bool = False
    activation_sparse: bool = False


@dataclasses.dataclass
class ModelCost:
    """What the cost model needs to know about a model."""

    linears: list[LinearCost]
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def attention_flops(self, length: int) -> float:
        return 2.0 * self.layers * self.heads * self.head_dim * length * length

    def kv_elements(self, length: int) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * length


def _is_24(weight: torch.Tensor) -> bool:
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(-1, 4) != 0).sum(-1) <= 2).all())


def model_cost(model: nn.Module, activation_modules: set[str] = frozenset()) -> ModelCost:
    """Shapes of ``model``'s linears (2:4 or not, activation-sparse or not) and attention."""
    linears = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) or (type(module).__name__ == "SparseLinear24" and weight is not None):
            linears.append(LinearCost(name, int(module.weight.numel()), _is_24(module.weight), name in activation_modules))
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or (config.hidden_size // max(heads, 1)))
    # structured pruning may have removed heads: count them from the projections
    q_outs = [m.out_features for n, m in model.named_modules() if n.endswith("self_attn.q_proj") and isinstance(m, nn.Linear)]
    k_outs = [m.out_features for n, m in model.named_modules() if n.endswith("self_attn.k_proj") and isinstance(m, nn.Linear)]
    if q_outs and head_dim:
        heads = round(sum(q_outs) / len(q_outs) / head_dim)
    if k_outs and head_dim:
        kv_heads = round(sum(k_outs) / len(k_outs) / head_dim)
    return ModelCost(linears, layers, heads, kv_heads, head_dim)


@dataclasses.dataclass
class Prediction:
    prefill_speedup: float
    decode_speedup: float
    sources: list[str]
    notes: list[str]
    parts: dict  # the factors, for the record

    def to_dict(self) -> dict:
        return {"kind": "predicted", **dataclasses.asdict(self)}


# -- factors from the stored measurements -------------------------------------------------

def _loginterp(points: dict[int, float], m: int) -> float:
    xs = sorted(points)
    if m <= xs[0]:
        return points[xs[0]]
    if m >= xs[-1]:
        return points[xs[-1]]
    for lo, hi in zip(xs, xs[1:]):
        if lo <= m <= hi:
            t = (math.log(m) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return points[lo] ** (1 - t) * points[hi] ** t
    return 1.0  # pragma: no cover


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def sparse24_speedup(tokens: int, directory: Path, sources: list, notes: list) -> float:
    data = _read(str(directory), "linear24.json")
    by = {}
    if data:
        for m, row in (data.get("summary", {}).get("by_tokens") or {}).items():
            if isinstance(row, dict) and row.get("ours_geomean"):
                by[int(m)] = float(row["ours_geomean"])
        if not by:  # summary missing: geometric mean of the cases
            cases: dict[int, list] = {}
            for c in data.get("cases", []):
                if isinstance(c.get("ratio_ours"), (int, float)) and c["ratio_ours"] > 0:
                    cases.setdefault(int(c["m"]), []).append(float(c["ratio_ours"]))
            by = {m: _geomean(v) for m, v in cases.items()}
    if not by:
        notes.append("2:4 weights: linear24.json missing or without measurements; predicted 1.0x")
        return 1.0
    if "linear24.json" not in sources:
        sources.append("linear24.json")
    return _loginterp(by, tokens)


def activation_speedup(sparsity: float, directory: Path, sources: list, notes: list) -> float:
    data = _read(str(directory), "activation_speed.json")
    rows = [r for r in (data or {}).get("rows", []) if isinstance(r.get("ours_speedup"), (int, float)) and math.isfinite(r["ours_speedup"]) and r["ours_speedup"] > 0]
    if not rows:
        notes.append("activation sparsity: activation_speed.json missing or without measurements; predicted 1.0x")
        return 1.0
    levels = sorted({float(r["sparsity"]) for r in rows})
    level = min(levels, key=lambda s: (abs(s - sparsity), s))
    if "activation_speed.json" not in sources:
        sources.append("activation_speed.json")
    if abs(level - sparsity) > 1e-9:
        notes.append(f"activation sparsity {sparsity:g}: sparse GEMV speedup taken at the nearest measured level {level:g}")
    return _geomean([float(r["ours_speedup"]) for r in rows if float(r["sparsity"]) == level])


def attention_prefill_speedup(method: str, density: float | None, length: int, directory: Path, sources: list, notes: list) -> float:
    if density is None:
        notes.append(f"attention {method}: no sparse attention ran in this evaluation (prompts below min_len?); predicted 1.0x")
        return 1.0
    data = _read(str(directory), "attention_speed.json")
    rows = [r for r in (data or {}).get("rows", []) if isinstance(r.get("length"), (int, float))]
    if not rows:
        notes.append(f"attention {method}: attention_speed.json missing or without measurements; predicted 1.0x")
        return 1.0
    row = min(rows, key=lambda r: abs(math.log(r["length"]) - math.log(length)))
    fixed = row.get("fixed_95") or {}
    patterns = row.get("patterns") or {}
    # entries are labelled by pattern, with the setting after a space where one pattern ran at several ("antidiagonal s8")
    entry = patterns.get(method) or next((e for label, e in patterns.items() if label.split(" ")[0] == method), {})
    if not isinstance(fixed.get("best_speedup"), (int, float)) or not isinstance(fixed.get("ideal_speedup"), (int, float)):
        notes.append(f"attention {method}: attention_speed.json has no fixed-mask kernel timing; predicted 1.0x")
        return 1.0
    efficiency = min(1.0, fixed["best_speedup"] / fixed["ideal_speedup"])
    overhead = entry.get("estimate_over_dense")
    if not isinstance(overhead, (int, float)):
        notes.append(f"attention {method}: no stored mask-estimation time for this pattern; counted as 0")
        overhead = 0.0
    if "attention_speed.json" not in sources:
        sources.append("attention_speed.json")
    if row["length"] != length:
        notes.append(f"attention: kernel efficiency and estimation overhead measured at {int(row['length'])} tokens, used at {length}")
    return 1.0 / (density / efficiency + overhead)


# -- the prediction ---------------------------------------------------------------------------

def predict(dense: ModelCost, sparse: ModelCost, *, prefill_tokens: int, decode_context: int,
            activation_sparsity: float | None = None, attention: dict | None = None, directory: Path | None = None) -> Prediction:
    """Predicted prefill and decode speedups of ``sparse`` over ``dense``.

    ``attention``: ``{"method", "phase", "min_len", "density"}`` of the sparse
    attention in use (density measured in this run; None if none ran).
    """
    directory = Path(directory or measurements_dir())
    sources: list[str] = []
    notes: list[str] = []
    parts: dict = {}

    any24 = any(l.is_24 for l in sparse.linears)
    any_act = activation_sparsity is not None and any(l.activation_sparse for l in sparse.linears)
    s24_prefill = sparse24_speedup(prefill_tokens, directory, sources, notes) if any24 else 1.0
    s24_decode = sparse24_speedup(1, directory, sources, notes) if any24 else 1.0
    s_act = activation_speedup(activation_sparsity, directory, sources, notes) if any_act else 1.0
    if any24 and any_act:
        notes.append("2:4 and activation-sparse kernels do not combine; each layer counts the faster one")
    parts.update(sparse24_prefill=s24_prefill, sparse24_decode=s24_decode, activation_decode=s_act)

    s_attn_prefill = s_attn_decode = 1.0
    if attention:
        phase, method = attention.get("phase", "prefill"), attention["method"]
        if phase in ("prefill", "both"):
            if prefill_tokens < attention.get("min_len", 0):
                notes.append(f"attention {method}: prefill of {prefill_tokens} tokens is below min_len {attention['min_len']}, stays dense")
            else:
                s_attn_prefill = attention_prefill_speedup(method, attention.get("density"), prefill_tokens, directory, sources, notes)
        if phase in ("decode", "both"):
            notes.append(f"attention {method}: no stored decode-attention measurement; decode attention predicted 1.0x")
        parts.update(attention_prefill=s_attn_prefill, attention_decode=s_attn_decode, attention_density=attention.get("density"))

    # prefill: FLOPs. decode: elements read. Linear work is proportional to weight elements in both.
    lin_dense = float(sum(l.numel for l in dense.linears))
    lin_pre = sum(l.numel / (s24_prefill if l.is_24 else 1.0) for l in sparse.linears)
    lin_dec = sum(l.numel / max(s24_decode if l.is_24 else 1.0, s_act if (any_act and l.activation_sparse) else 1.0) for l in sparse.linears)
    attn_pre_dense = dense.attention_flops(prefill_tokens) / (2.0 * prefill_tokens)  # in units of "2 L" FLOPs, like the linears
    attn_pre = sparse.attention_flops(prefill_tokens) / (2.0 * prefill_tokens) / s_attn_prefill
    kv_dense = dense.kv_elements(decode_context)
    kv = sparse.kv_elements(decode_context) / s_attn_decode
    prefill = (lin_dense + attn_pre_dense) / (lin_pre + attn_pre)
    decode = (lin_dense + kv_dense) / (lin_dec + kv)
    parts.update(linear_share_prefill=lin_dense / (lin_dense + attn_pre_dense), linear_share_decode=lin_dense / (lin_dense + kv_dense))
    if sparse.linears and sum(l.numel for l in sparse.linears) < lin_dense:
        notes.append("structured pruning: a smaller dense model, counted from its shapes")
    return Prediction(prefill, decode, sources, notes, parts)
