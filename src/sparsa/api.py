"""The verbs users import: load, prune, evaluate, inspect, train, save.

Each is a thin composition of the modules below it; the CLI calls exactly
these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import load_text
from .eval.perplexity import Perplexity, perplexity
from .inspection import SparsityReport, sparsity_report
from .models import LoadedModel, load_model, save_model
from .prune.config import PruneConfig
from .train import train_model

__all__ = ["evaluate", "inspect", "load_model", "prune", "save", "train", "frontier"]


def evaluate(
    lm: LoadedModel,
    text: str = "evaluation",
    *,
    seq_len: int = 1024,
    max_tokens: int | None = 20480,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of a loaded model on a text source (default: the shipped evaluation corpus)."""
    return perplexity(lm.model, lm.tokenizer, load_text(text), seq_len=seq_len, max_tokens=max_tokens, progress=progress)


def evaluate_tasks(lm: LoadedModel, tasks: list[str], **options) -> dict:
    """lm-evaluation-harness tasks on a loaded model (see sparsa.eval.lm_eval_adapter)."""
    from .eval.lm_eval_adapter import evaluate_tasks as run

    return run(lm.model, lm.tokenizer, tasks, **options)


def inspect(lm: LoadedModel) -> SparsityReport:
    """Global and per-layer sparsity, and the pattern each layer follows."""
    return sparsity_report(lm.model)


def prune(lm: LoadedModel, config: PruneConfig | None = None, *, device: str | None = None, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True, **overrides) -> dict:
    """Prune ``lm`` in place, one decoder layer at a time; returns the run's record.

    ``config`` fields may also be given as keyword arguments:
    ``sparsa.prune(lm, method="sparsegpt", pattern="2:4")``. ``device`` runs each
    layer there while the model stays where it is (e.g. "cuda" for a model in CPU memory).
    """
    from .prune.pipeline import prune_model

    if config is None:
        config = PruneConfig(**overrides)
    elif overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    return prune_model(lm, config, device=device, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)


def frontier(model: str | os.PathLike | None = None, config: str | os.PathLike | None = None, out: str | os.PathLike = "frontier", **options):
    """Sweep sparsity configurations on ``model``; results in ``out/results.jsonl``, report in ``out/`` (see sparsa.frontier).

    ``config``: a sweep TOML (default: the shipped default sweep). Options:
    ``fresh``, ``ray`` (address or "local"), ``device``, ``dtype``,
    ``max_tokens``, ``progress``, ``print_table``.
    """
    from .frontier import frontier as run

    return run(model, config, out, **options)


def save(lm: LoadedModel, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Save as a Hugging Face directory plus sparsa.json (atomic; never overwrites without force)."""
    record = {"source": lm.source, **lm.record}
    return save_model(lm.model, lm.tokenizer, out, record, force=force)


def train(lm: LoadedModel, config=None, *, teacher=None, masks=None, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True, **overrides) -> dict:
    """Train ``lm`` in place while its sparsity holds; returns the run's record.

    ``config`` is a ``sparsa.train.TrainConfig`` (or give its fields as keyword
    arguments: ``sparsa.train(lm, method="distill", teacher=dense, steps=200)``).
    The mask is read off the zero weights unless ``masks`` is given; ``teacher``
    is the dense model that ``distill`` learns from.
    """
    return train_model(lm, config, teacher=teacher, masks=masks, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, **overrides)
