"""Training a loaded model: data, masks and teacher put together, then the method's run."""

from __future__ import annotations

import os
from dataclasses import replace

import torch.nn as nn

from ..data import load_text
from ..errors import InputError
from ..models import LoadedModel
from .base import TRAIN_METHODS
from .config import TrainConfig
from .loop import TokenBatches, rank, world
from .masks import MaskState

__all__ = ["train_model"]


def train_model(
    lm: LoadedModel,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | LoadedModel | None = None,
    masks: MaskState | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train ``lm.model`` in place; returns the run's record (also stored as ``lm.record["training"]``).

    ``masks`` defaults to the zeros of the model's linears (``weight != 0``),
    so a model pruned by ``sparsa.prune`` keeps exactly its pattern.
    ``teacher`` is the dense model for ``distill`` (a module or a LoadedModel).
    """
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = replace(config, **overrides)
    method = TRAIN_METHODS.get(config.method)
    if isinstance(teacher, LoadedModel):
        teacher = teacher.model
    needs = method.needs_teacher or (config.method == "soup" and TRAIN_METHODS.get(config.soup_base).needs_teacher)
    if needs and teacher is None:
        raise InputError(f"{config.method} distils from the dense model; pass it as --teacher / teacher= (the model before pruning), or prune in the same run (sparsa train --prune)")
    if needs:
        _check_teacher(lm, teacher)
    if masks is None:
        masks = MaskState.from_model(lm.model)
    if not method.moves_mask and len(masks) == 0:
        raise InputError(f"the model has no zero weights, so {config.method} has no mask to keep; prune it first (sparsa prune, or sparsa train --prune wanda)")
    data = TokenBatches.from_text(lm.tokenizer, load_text(config.data), config.seq_len, config.batch_size, config.seed, rank(), world())
    record = method.fit(lm.model, masks, config, data, teacher, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    record = {**record, "data": config.data, "windows": len(data), "data_sha256": data.sha256}
    lm.record = {**lm.record, "training": record}
    return record


# Distillation compares the logits and every decoder layer's hidden states of the two models.
TEACHER_MUST_MATCH = ("vocab_size", "hidden_size", "num_hidden_layers")


def _check_teacher(lm: LoadedModel, teacher: nn.Module) -> None:
    """A one-line InputError unless ``teacher`` has the student's vocabulary, width and depth."""
    for key in TEACHER_MUST_MATCH:
        ours, theirs = getattr(lm.model.config, key, None), getattr(teacher.config, key, None)
        if ours != theirs:
            name = getattr(teacher.config, "name_or_path", "")
            who = f"the teacher {name}" if name else "the teacher"
            raise InputError(
                f"{who} has {key} {theirs} but the student {lm.source} has {ours}; "
                "pass the dense model the student was pruned from as --teacher / teacher="
            )
