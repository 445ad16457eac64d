"""What a frontier sweep runs: typed, frozen configurations and the settings they are measured under.

A :class:`Config` is one point of the sweep: a weight pruning (method,
sparsity, pattern), an attention pattern (method and its settings) and an
activation sparsity (method, sparsity), each optional. Its :attr:`Config.id`
is a stable string (the key of a result in the JSONL file, so an
interrupted sweep knows what it has done).

A sweep file (TOML) lists *axes* and explicit *combinations*::

    [eval]
    perplexity_tokens = 8192

    [axes]
    weights = [{method = ["wanda", "sparsegpt"], pattern = "2:4"}]   # a list value expands
    attention = [{method = "vertical_slash", vertical = 256, slash = 256}]
    activations = [{method = "cats", sparsity = [0.4, 0.5]}]

    [[combine]]
    weights = {method = "wanda", pattern = "2:4"}
    activations = {method = "cats", sparsity = 0.5}

Each axis entry becomes a configuration on its own (with dense for the
other two) unless ``cross = true`` in ``[sweep]``, which takes the product of
the axes. Every key is checked before any work starts; a bad one is one
line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["ActivationSpec", "AttentionSpec", "Config", "Settings", "Sweep", "WeightSpec", "default_sweep_path", "load_sweep", "parse_sweep"]

DEFAULT_SWEEP = Path(__file__).with_name("default_sweep.toml")


def default_sweep_path() -> Path:
    return DEFAULT_SWEEP


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    method: str
    sparsity: float | None = None  # None: 0.5, or what an N:M pattern implies
    pattern: str = "unstructured"  # unstructured, N:M (2:4 ...) or structured

    def __post_init__(self) -> None:
        from ..prune.base import METHODS
        from ..prune.config import PruneConfig

        METHODS.get(self.method)
        sparsity = PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern).sparsity  # validated
        if self.pattern in ("unstructured", "structured"):
            sparsity = round(float(sparsity), 6)  # N:M keeps the exact 1 - N/M, which pruning checks to 1e-9
        object.__setattr__(self, "sparsity", sparsity)

    @property
    def key(self) -> str:
        shape = self.pattern if self.pattern not in ("unstructured",) else f"{self.sparsity:g}"
        if self.pattern == "structured":
            shape = f"structured@{self.sparsity:g}"
        return f"weights={self.method}@{shape}"

    @property
    def label(self) -> str:
        if self.pattern == "unstructured":
            return f"{self.method} {_pct(self.sparsity)}"
        if self.pattern == "structured":
            return f"{self.method} structured {_pct(self.sparsity)}"
        return f"{self.method} {self.pattern}"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    method: str
    settings: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs of the pattern's settings
    min_len: int = 1024  # keys below which attention stays dense

    def __post_init__(self) -> None:
        from ..attention import make_pattern

        object.__setattr__(self, "settings", tuple(sorted(dict(self.settings).items())))
        make_pattern(self.method, **dict(self.settings))  # unknown pattern or setting: one-line error
        if not isinstance(self.min_len, int) or self.min_len < 1:
            raise InputError(f"attention min_len must be a positive whole number of keys, got {self.min_len!r}")

    @property
    def key(self) -> str:
        inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.settings)
        return f"attention={self.method}({inner})@{self.min_len}"

    @property
    def label(self) -> str:
        short = lambda k: "".join(w[0] for w in k.split("_"))  # noqa: E731 - local_blocks -> lb
        values = " ".join(f"{short(k)}={v:g}" if isinstance(v, float) else f"{short(k)}={v}" for k, v in self.settings)
        return f"{self.method} {values}".strip()


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    method: str
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        from ..activations import ACTIVATION_METHODS

        ACTIVATION_METHODS.get(self.method)
        if not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity) or not 0 < self.sparsity < 1:
            raise InputError(f"activation sparsity must be in (0, 1), got {self.sparsity!r}; give a fraction such as 0.5")
        object.__setattr__(self, "sparsity", round(float(self.sparsity), 6))

    @property
    def key(self) -> str:
        return f"activations={self.method}@{self.sparsity:g}"

    @property
    def label(self) -> str:
        return f"{self.method} act {_pct(self.sparsity)}"


@dataclasses.dataclass(frozen=True)
class Config:
    """One point of the sweep; all three parts None is the dense model."""

    weights: WeightSpec | None = None
    attention: AttentionSpec | None = None
    activations: ActivationSpec | None = None

    @property
    def id(self) -> str:
        parts = [p.key for p in (self.weights, self.attention, self.activations) if p is not None]
        return " + ".join(parts) or "dense"

    @property
    def label(self) -> str:
        parts = [p.label for p in (self.weights, self.activations, self.attention) if p is not None]
        return " + ".join(parts) or "dense"

    @property
    def is_dense(self) -> bool:
        return self.weights is None and self.attention is None and self.activations is None

    def to_dict(self) -> dict:
        return {
            "weights": dataclasses.asdict(self.weights) if self.weights else None,
            "attention": {"method": self.attention.method, "settings": dict(self.attention.settings), "min_len": self.attention.min_len} if self.attention else None,
            "activations": dataclasses.asdict(self.activations) if self.activations else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        w, a, x = data.get("weights"), data.get("attention"), data.get("activations")
        return cls(
            WeightSpec(**w) if w else None,
            AttentionSpec(a["method"], tuple(a.get("settings", {}).items()), a.get("min_len", 1024)) if a else None,
            ActivationSpec(**x) if x else None,
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """How every configuration is measured. Part of the JSONL header: a resume must use the same."""

    # accuracy
    text: str = "evaluation"
    seq_len: int = 1024
    perplexity_tokens: int = 8192  # 0: the whole text
    longctx_tasks: tuple[str, ...] = ()
    longctx_length: int = 2048
    longctx_examples: int = 1
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include_path: str | None = None
    lm_eval_limit: int | None = None
    # calibration (pruning and activation thresholds)
    calibration_samples: int = 16
    calibration_seq_len: int = 512
    seed: int = 0
    # speed
    speed: str = "auto"  # auto (measured on a CUDA model, else predicted), predicted, measured
    prefill_tokens: int = 2048
    decode_context: int = 2048
    decode_tokens: int = 32  # steps timed when measuring decode
    decode_graph: bool = True  # measured decode also replayed from a CUDA graph (the headline figure where it captures)

    def __post_init__(self) -> None:
        for name in ("seq_len", "longctx_length", "longctx_examples", "calibration_samples", "calibration_seq_len", "prefill_tokens", "decode_context", "decode_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.perplexity_tokens, int) or self.perplexity_tokens < 0:
            raise InputError(f"perplexity_tokens must be a whole number >= 0 (0: the whole text), got {self.perplexity_tokens!r}")
        if 0 < self.perplexity_tokens < self.seq_len:
            raise InputError(f"perplexity_tokens ({self.perplexity_tokens}) is less than one perplexity window (seq_len "
                             f"{self.seq_len}); raise perplexity_tokens (--max-tokens) or lower [eval] seq_len")
        if not isinstance(self.decode_graph, bool):
            raise InputError(f"[speed] cuda_graph must be true or false, got {self.decode_graph!r}")
        if self.speed not in ("auto", "predicted", "measured"):
            raise InputError(f"speed mode {self.speed!r} is not one of: auto, predicted, measured")
        for name in ("longctx_tasks", "lm_eval_tasks"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        from ..data import SHIPPED, load_text

        if self.text not in SHIPPED and not self.text.startswith("hf:"):
            load_text(self.text)  # a local file: missing or unreadable is said now, not by every configuration
        if self.longctx_tasks:
            from ..eval.longctx import TASKS

            for task in self.longctx_tasks:
                TASKS.get(task)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self, model: str) -> str:
        blob = json.dumps({"model": model, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Sweep:
    settings: Settings
    configs: tuple[Config, ...]
    source: str = "<python>"

    def __post_init__(self) -> None:
        if not self.configs:
            raise InputError(f"{self.source}: the sweep has no configurations; list some under [axes] or [[combine]]")


# -- TOML ------------------------------------------------------------------------------

# section -> {toml key: Settings field}
_SETTINGS_KEYS = {
    "eval": {"text": "text", "seq_len": "seq_len", "perplexity_tokens": "perplexity_tokens", "longctx_tasks": "longctx_tasks",
             "longctx_length": "longctx_length", "longctx_examples": "longctx_examples", "lm_eval_tasks": "lm_eval_tasks",
             "lm_eval_include_path": "lm_eval_include_path", "lm_eval_limit": "lm_eval_limit"},
    "calibration": {"samples": "calibration_samples", "seq_len": "calibration_seq_len", "seed": "seed"},
    "speed": {"mode": "speed", "prefill_tokens": "prefill_tokens", "decode_context": "decode_context", "decode_tokens": "decode_tokens",
              "cuda_graph": "decode_graph"},
}
_SECTIONS = set(_SETTINGS_KEYS) | {"sweep", "axes", "combine"}
_AXES = ("weights", "attention", "activations")


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise InputError("reading a sweep file on Python 3.10 needs tomli: pip install tomli") from None
    return tomli


def load_sweep(path: str | Path | None = None, **setting_overrides) -> Sweep:
    """Read a sweep TOML (default: the shipped default sweep); ``setting_overrides`` replace [eval]/[speed] settings."""
    path = Path(path) if path is not None else DEFAULT_SWEEP
    if not path.is_file():
        raise InputError(f"sweep file {path} does not exist; pass a TOML file (sparsa frontier --help shows the format)")
    try:
        data = _toml().loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # tomllib.TOMLDecodeError
        raise InputError(f"{path}: not valid TOML: {e}") from None
    return parse_sweep(data, source=str(path), **setting_overrides)


def _expand(entry: dict) -> list[dict]:
    """{a: [1, 2], b: 3} -> [{a: 1, b: 3}, {a: 2, b: 3}]."""
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _spec(axis: str, entry: Any, where: str):
    if entry in (None, "none", "dense"):
        return None
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a table such as {{method = \"wanda\", sparsity = 0.5}} or \"none\", got {entry!r}")
    entry = dict(entry)
    method = entry.pop("method", None)
    if not isinstance(method, str):
        raise InputError(f"{where}: missing method; add method = \"...\" to each {axis} entry")
    try:
        if axis == "weights":
            unknown = sorted(set(entry) - {"sparsity", "pattern"})
            if unknown:
                raise InputError(f"unknown key {unknown[0]!r}; weights entries take method, sparsity, pattern")
            return WeightSpec(method, entry.get("sparsity"), entry.get("pattern", "unstructured"))
        if axis == "activations":
            unknown = sorted(set(entry) - {"sparsity"})
            if unknown:
                raise InputError(f"unknown key {unknown[0]!r}; activations entries take method, sparsity")
            return ActivationSpec(method, entry.get("sparsity", 0.5))
        min_len = entry.pop("min_len", 1024)
        return AttentionSpec(method, tuple(entry.items()), min_len)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {e}") from None
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def parse_sweep(data: dict, source: str = "<dict>", **setting_overrides) -> Sweep:
    """Validate a parsed sweep document and build its configurations (dense first, no duplicates)."""
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise InputError(f"{source}: unknown section [{unknown[0]}]; sections are: {', '.join(sorted(_SECTIONS))}")
    values: dict[str, Any] = {}
    for section, keys in _SETTINGS_KEYS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise InputError(f"{source}: [{section}] must be a table")
        for key, value in table.items():
            if key not in keys:
                raise InputError(f"{source}: unknown key {key!r} in [{section}]; it takes: {', '.join(keys)}")
            values[keys[key]] = value
    values.update({k: v for k, v in setting_overrides.items() if v is not None})
    try:
        settings = Settings(**values)
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
    except TypeError as e:
        raise InputError(f"{source}: {e}") from None

    sweep = data.get("sweep", {})
    extra = sorted(set(sweep) - {"dense", "cross"})
    if extra:
        raise InputError(f"{source}: unknown key {extra[0]!r} in [sweep]; it takes: dense (true/false), cross (true/false)")
    for key, value in sweep.items():
        if not isinstance(value, bool):
            raise InputError(f"{source}: [sweep] {key} must be true or false, got {value!r}")
    axes_table = data.get("axes", {})
    extra = sorted(set(axes_table) - set(_AXES))
    if extra:
        raise InputError(f"{source}: unknown axis {extra[0]!r} in [axes]; axes are: {', '.join(_AXES)}")
    axes: dict[str, list] = {}
    for axis in _AXES:
        entries = axes_table.get(axis, [])
        if not isinstance(entries, list):
            raise InputError(f"{source}: [axes] {axis} must be a list of tables, e.g. {axis} = [{{method = \"...\"}}]")
        specs = []
        for i, entry in enumerate(entries):
            for one in _expand(entry) if isinstance(entry, dict) else [entry]:
                specs.append(_spec(axis, one, f"{source}: [axes] {axis}[{i}]"))
        axes[axis] = specs

    configs: list[Config] = []
    if sweep.get("dense", True):
        configs.append(Config())
    if sweep.get("cross", False):
        lists = [[None] + [s for s in axes[a] if s is not None] for a in _AXES]
        configs += [Config(*combo) for combo in itertools.product(*lists)]
    else:
        for axis in _AXES:
            configs += [Config(**{axis: s}) for s in axes[axis]]
    combos = data.get("combine", [])
    if not isinstance(combos, list):
        raise InputError(f"{source}: combinations are [[combine]] tables (an array of tables)")
    for i, combo in enumerate(combos):
        extra = sorted(set(combo) - set(_AXES))
        if extra:
            raise InputError(f"{source}: unknown key {extra[0]!r} in [[combine]] #{i + 1}; it takes: {', '.join(_AXES)}")
        expanded = [_expand(combo.get(a)) if isinstance(combo.get(a), dict) else [combo.get(a)] for a in _AXES]
        for parts in itertools.product(*expanded):
            configs.append(Config(*(_spec(a, p, f"{source}: [[combine]] #{i + 1} {a}") for a, p in zip(_AXES, parts))))
    seen, unique = set(), []
    for c in configs:
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    if unique and all(c.is_dense for c in unique):
        raise InputError(f"{source}: the sweep has only the dense model; list sparse configurations under [axes] or [[combine]]")
    return Sweep(settings, tuple(unique), source)
