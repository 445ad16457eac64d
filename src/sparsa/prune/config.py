"""What a pruning run is asked to do: one frozen, validated record.

The same record is written to ``sparsa.json`` beside a pruned model.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import InputError, require


@dataclass(frozen=True)
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = None  # None: 0.5, or what an N:M pattern implies (1 - N/M)
    pattern: str = "unstructured"  # "unstructured", "N:M" such as "2:4", or "structured"
    # calibration
    calibration: str = "shipped"  # "shipped", a text/JSONL path, or "hf:NAME[:CONFIG]:SPLIT"
    n_samples: int = 64
    seq_len: int = 512
    seed: int = 0
    skip: tuple[str, ...] = ("lm_head",)
    # structured pruning: fraction of attention KV-head groups removed (FFN channels use ``sparsity``)
    head_sparsity: float = 0.0
    # outlier-weighted layerwise budgets (OWL), usable with any method
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    # SparseGPT
    blocksize: int = 128
    damp: float = 0.01
    # DSnoT: a base method's mask refined by grow/prune swaps
    dsnot_base: str = "wanda"
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1

    def __post_init__(self) -> None:
        nm = self.nm
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5 if nm is None else 1 - nm[0] / nm[1])
        require(
            isinstance(self.sparsity, (int, float)) and not math.isnan(self.sparsity) and 0 <= self.sparsity < 1,
            f"sparsity must be in [0, 1), got {self.sparsity}; pass e.g. --sparsity 0.5 for half the weights",
        )
        require(self.n_samples >= 1, f"--samples / n_samples must be at least 1, got {self.n_samples}; pass 1 or more")
        require(self.seq_len >= 8, f"--seq-len / seq_len must be at least 8 tokens, got {self.seq_len}; pass 8 or more")
        require(self.blocksize >= 1, f"blocksize must be positive, got {self.blocksize}")
        require(self.damp > 0, f"damp must be positive, got {self.damp}")
        require(0 <= self.head_sparsity < 1, f"head_sparsity must be in [0, 1), got {self.head_sparsity}")
        require(self.head_sparsity == 0 or self.pattern == "structured",
                f"head_sparsity (--heads) removes attention heads, which only --pattern structured does; "
                f"drop it or prune with pattern structured (this pattern is {self.pattern})")
        from . import METHODS  # (the package registers every method; imported here, after it is initialised)

        METHODS.get(self.method)
        if self.method == "dsnot":
            require(self.dsnot_base != "dsnot", "--dsnot-base cannot be dsnot itself; choose a base such as wanda, sparsegpt or magnitude")
            try:
                METHODS.get(self.dsnot_base)
            except InputError as e:
                raise InputError(f"--dsnot-base: {e}") from None
        require(0 < self.owl_lambda < 1, f"owl_lambda must be in (0, 1), got {self.owl_lambda}")
        if isinstance(self.skip, list):  # accept lists from callers, store a tuple
            object.__setattr__(self, "skip", tuple(self.skip))
        if nm is not None:
            n, m = nm
            require(
                abs(self.sparsity - (1 - n / m)) < 1e-9,
                f"pattern {self.pattern} means sparsity {1 - n / m:g}, not {self.sparsity:g}; "
                "drop --sparsity or make them agree",
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, else None."""
        return None if self.pattern in ("unstructured", "structured") else parse_nm(self.pattern)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_nm(text: str, others: tuple[str, ...] = ("unstructured", "structured")) -> tuple[int, int]:
    """Parse 'N:M' (keep N of every M consecutive weights along the input dimension).

    ``others`` are the caller's named patterns, listed in the error.
    """
    match = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", text) if isinstance(text, str) else None
    choices = ", ".join(repr(o) for o in others)
    require(match is not None, f"pattern {text!r} cannot be used; use {choices} or N:M such as 2:4")
    n, m = int(match[1]), int(match[2])
    require(0 < n < m, f"pattern {text!r} needs 0 < N < M, e.g. 2:4 keeps 2 of every 4 weights")
    return n, m
