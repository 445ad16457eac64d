"""The Hugging Face ``Trainer`` side of masks as state (imported on first use: transformers' trainer is slow to import)."""

from __future__ import annotations

from transformers import TrainerCallback

from .masks import MaskState

__all__ = ["MaskCallback"]


class MaskCallback(TrainerCallback):
    """Hugging Face ``Trainer`` callback: the mask holds after every optimizer step.

    ``Trainer(model, args, ..., callbacks=[MaskCallback(masks)])``. Gradients of
    pruned weights are zeroed before each step and the weights after it, the
    same as ``MaskState.attach`` does for a plain loop.
    """

    def __init__(self, masks: MaskState) -> None:
        self.masks = masks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.masks.apply(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.masks.mask_gradients(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.masks.apply(model)
