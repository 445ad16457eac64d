"""Sparse model soups: several fine-tuned copies that share one mask, averaged.

Every ingredient starts from the same weights and the same mask and trains
with ``soup_base`` (a method that keeps the mask: masked or distill), each
with its own seed, so each sees the data in its own order. The weights are
then averaged. Since every ingredient has zeros where the mask prunes, the
average does too: the soup keeps the mask and its sparsity exactly (the mask
is applied once more all the same).

With a checkpoint directory, each ingredient trains in ``ingredient-I/``
(resumable like any run) and its final weights are kept there, so an
interrupted soup resumes at the ingredient it stopped in.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import InputError
from ..models import atomic_save_tensors
from .base import TRAIN_METHODS, TrainMethod
from .loop import TokenBatches, train_loop, world

__all__ = ["Soup"]


@TRAIN_METHODS.register("soup")
class Soup(TrainMethod):
    """Train ``soup_size`` copies that share the mask (different seeds, so different data orders), average them."""

    @classmethod
    def fit(cls, model, masks, config, data, teacher=None, *, checkpoint_dir=None, resume=False, progress=True) -> dict:
        if world() > 1:
            raise InputError("soup trains its ingredients one after another in one process; launch it without torchrun")
        base = TRAIN_METHODS.get(config.soup_base)
        if base.moves_mask or not base.holds_mask:
            raise InputError(f"soup ingredients must keep the mask; {config.soup_base} moves it: use soup_base masked or distill")
        if base.needs_teacher and teacher is None:
            raise InputError(f"soup ingredients trained with {config.soup_base} need the dense teacher")
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        shared = masks.clone()
        total: dict[str, torch.Tensor] | None = None
        records = []
        for i in range(config.soup_size):
            seed = config.seed + i
            ingredient = replace(config, method=config.soup_base, seed=seed)
            folder = Path(checkpoint_dir) / f"ingredient-{i}" if checkpoint_dir else None
            finished = folder / "final.safetensors" if folder else None
            if resume and finished is not None and finished.is_file():
                weights = load_file(finished)
                records.append({"seed": seed, "resumed": True})
            else:
                model.load_state_dict(start)
                if config.soup_vary == "seed":
                    torch.manual_seed(seed)
                order = TokenBatches(data.windows.reshape(-1), data.windows.shape[1], data.batch_size, seed, data.rank, data.world)
                mask = shared.clone()
                again = bool(resume and folder is not None and (folder / "latest.json").is_file())
                record = train_loop(model, base(ingredient), mask, ingredient, order, teacher, checkpoint_dir=folder, resume=again, progress=progress)
                records.append({"seed": seed, **{k: record[k] for k in ("loss_curve", "seconds", "tokens")}})
                weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
                if finished is not None:
                    atomic_save_tensors(weights, finished)
            total = _accumulate(total, weights)
        average = {k: (v / config.soup_size).to(start[k].dtype) if v.is_floating_point() and k in start and start[k].is_floating_point() else v for k, v in total.items()}
        model.load_state_dict(average)
        masks.apply(model)
        return {
            "method": "soup",
            "config": config.to_dict(),
            "steps": config.steps * config.soup_size,
            "tokens": config.steps * config.soup_size * data.tokens_per_step(),
            "processes": 1,
            "seconds": round(sum(r.get("seconds", 0.0) for r in records), 2),
            "ingredients": records,
            "mask_sparsity": masks.sparsity(),
            "loss_curve": records[-1].get("loss_curve", []),
        }


def _accumulate(total, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if total is None:
        return {k: v.double() if v.is_floating_point() else v.clone() for k, v in weights.items()}
    for k, v in weights.items():
        if v.is_floating_point():
            total[k] += v.double()
    return total
