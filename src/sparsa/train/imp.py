"""Iterative magnitude pruning with weight rewinding (Frankle et al., 2019/2020).

The run is split into ``rounds`` rounds of training. Each round starts by
pruning the smallest-magnitude surviving weights of every masked linear
(unstructured, per layer) to that round's sparsity, on a geometric schedule
that ends at ``sparsity``: from starting sparsity ``s0``, round ``j`` of
``R`` keeps ``(1 - s0) * ((1 - s) / (1 - s0)) ** (j / R)`` of the weights.
From round 2 on, the surviving weights are then rewound to their values after
``rewind_step`` steps of round 1 (the whole model is rewound; pruned weights
stay zero), the optimizer's state is cleared and the learning-rate schedule
starts again. Masks only ever shrink: each round's mask lies inside the last.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..prune.patterns import mask_unstructured
from .base import TRAIN_METHODS, TrainMethod, cosine
from .masks import MaskState, _skipped

__all__ = ["IMP", "round_sparsity"]

REWIND = "rewind."


def round_sparsity(start: float, target: float, round_index: int, rounds: int) -> float:
    """Sparsity after pruning at the start of round ``round_index`` (1-based) of ``rounds``."""
    kept = (1 - start) * ((1 - target) / (1 - start)) ** (round_index / rounds)
    return 1 - kept


@TRAIN_METHODS.register("imp")
class IMP(TrainMethod):
    """Iterative magnitude pruning, rewinding weights to an early step after each pruning."""

    moves_mask = True

    def setup(self, model, masks: MaskState) -> MaskState:
        c = self.config
        if len(masks) == 0:
            names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _skipped(n, ("lm_head",))]
            masks = MaskState.from_model(model, names=names)
        self.start_sparsity = masks.sparsity()
        self.length = c.steps // c.rounds
        self.starts = [j * self.length for j in range(c.rounds)]
        self.rewind: dict[str, torch.Tensor] = {}
        self.history = []
        self._prune(model, masks, 1)
        if c.rewind_step == 0:
            self._snapshot(model)
        return masks

    def _round_of(self, step: int) -> int:
        return min(step // self.length, self.config.rounds - 1)  # 0-based; the last round takes the remainder

    @torch.no_grad()
    def _prune(self, model, masks: MaskState, round_index: int) -> None:
        target = round_sparsity(self.start_sparsity, self.config.sparsity, round_index, self.config.rounds)
        for name, module in masks.modules(model).items():
            keep = masks.masks[name].to(module.weight.device)
            scores = torch.where(keep, module.weight.detach().float().abs(), torch.tensor(-float("inf"), device=keep.device))
            masks.update(name, mask_unstructured(scores, max(target, 1 - int(keep.count_nonzero()) / keep.numel())) & keep)
        masks.apply(model)
        self.history.append({"round": round_index, "sparsity": masks.sparsity()})

    @torch.no_grad()
    def _snapshot(self, model) -> None:
        self.rewind = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def after_step(self, model, masks, step, optimizer) -> None:
        done = step + 1
        if done == self.config.rewind_step and not self.rewind:
            self._snapshot(model)
        if done in self.starts[1:]:
            self._prune(model, masks, self.starts.index(done) + 1)
            model.load_state_dict(self.rewind)
            masks.apply(model)
            optimizer.state = defaultdict(dict)

    def lr_factor(self, step: int) -> float:
        c = self.config
        round_index = self._round_of(step)
        first = self.starts[round_index]
        length = c.steps - first if round_index == c.rounds - 1 else self.length
        local = step - first
        if local < c.warmup:
            return (local + 1) / (c.warmup + 1)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * cosine((local - c.warmup) / max(1, length - c.warmup))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {REWIND + k: v for k, v in self.rewind.items()}

    def load_state_dict(self, state) -> None:
        self.rewind = {k[len(REWIND):]: v for k, v in state.items() if k.startswith(REWIND)}

    def record(self) -> dict:
        return {"rounds": self.history, "rewind_step": self.config.rewind_step}
