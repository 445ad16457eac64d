"""The registry of training methods and the hooks every method may fill in.

A method is one file and one decorator. The loop (``loop.py``) calls, per step:

    loss, metrics = method.loss(model, batch, teacher)
    loss.backward()
    method.before_step(model, masks, step)      # dense gradients are still there (RigL reads them)
    [gradients of pruned weights zeroed, clipped, optimizer.step(), pruned weights zeroed]
    method.after_step(model, masks, step, optimizer)

Methods whose runs are not one plain loop (model soups) override ``fit``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import Registry
from .config import TrainConfig
from .masks import MaskState

__all__ = ["TRAIN_METHODS", "TrainMethod", "cosine"]

TRAIN_METHODS: Registry[type["TrainMethod"]] = Registry("training method")


def cosine(progress: float) -> float:
    """1 at ``progress`` 0, falling along half a cosine to 0 at 1 (clamped)."""
    progress = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainMethod:
    needs_teacher = False
    holds_mask = True  # the loop zeroes pruned gradients and weights around each step
    distributed = False  # runs under torchrun with FSDP2 (element-wise mask work only)
    moves_mask = False  # the mask may change during the run (DST, SR-STE, IMP)

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def setup(self, model: nn.Module, masks: MaskState) -> MaskState:
        """Called once before the first step (and before a checkpoint is loaded); returns the masks to hold."""
        return masks

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> tuple[torch.Tensor, dict]:
        """Next-token cross-entropy; distillation adds its terms."""
        out = model(input_ids=batch, labels=batch, use_cache=False)
        return out.loss, {}

    def before_step(self, model: nn.Module, masks: MaskState, step: int) -> None:
        pass

    def after_step(self, model: nn.Module, masks: MaskState, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def finish(self, model: nn.Module, masks: MaskState) -> None:
        """Called once after the last step: leave plain weights that follow the masks."""

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
        c = self.config
        if step < c.warmup:
            return (step + 1) / (c.warmup + 1)
        span = max(1, c.steps - c.warmup)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * cosine((step - c.warmup) / span)

    # method state that a checkpoint must carry (tensors only; masks and weights travel separately)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def record(self) -> dict:
        """What this method adds to the run's record."""
        return {}

    @classmethod
    def fit(cls, model, masks, config, data, teacher=None, *, checkpoint_dir=None, resume=False, progress=True) -> dict:
        from .loop import train_loop

        return train_loop(model, cls(config), masks, config, data, teacher, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
