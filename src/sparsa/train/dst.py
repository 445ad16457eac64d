"""Dynamic sparse training: the mask moves, the sparsity does not.

Every ``update_every`` steps, until ``update_until`` of the run, each masked
linear drops its ``k`` smallest-magnitude active weights and grows ``k``
inactive ones, so every layer keeps exactly its number of weights:

* RigL (Evci et al., 2020) grows where the dense gradient is largest;
* SET (Mocanu et al., 2018) grows at random.

``k = f(t) * active`` with ``f(t) = update_fraction * (1 + cos(pi t / T_end)) / 2``,
the cosine update schedule of RigL. Grown weights start at zero, and the
optimizer's moments of every weight that changed side are reset. A dense
model is first pruned by magnitude, per layer, to ``sparsity``.
"""

from __future__ import annotations

import torch

from ..prune.patterns import mask_prune_count, mask_unstructured
from .base import TRAIN_METHODS, TrainMethod, cosine
from .masks import MaskState, _skipped

__all__ = ["RigL", "SET", "move_mask"]


def move_mask(mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor, count: int) -> torch.Tensor:
    """Drop the ``count`` smallest ``|weight|`` among kept entries, then grow the ``count`` best-scored others.

    Ties break towards the lower index (the stable selection of ``patterns``).
    The result keeps exactly as many entries as ``mask``.
    """
    count = min(count, int(mask.count_nonzero()), mask.numel() - int(mask.count_nonzero()))
    if count <= 0:
        return mask.clone()
    inf = torch.tensor(float("inf"), device=weight.device)
    magnitude = torch.where(mask, weight.detach().float().abs(), inf)
    kept = mask & mask_prune_count(magnitude, count)
    candidates = torch.where(kept, -inf, grow_scores.float())
    grown = mask_prune_count(candidates, mask.numel() - count)
    return kept | grown


class _DynamicSparse(TrainMethod):
    moves_mask = True
    grow_by = "gradient"

    def setup(self, model, masks: MaskState) -> MaskState:
        if len(masks) == 0:  # dense: start from magnitude pruning to the asked sparsity
            found = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _skipped(n, ("lm_head",))}
            masks = MaskState({n: mask_unstructured(m.weight.detach().float().abs(), self.config.sparsity) for n, m in found.items()})
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.updates, self.moved = 0, 0
        self._changed: dict[str, torch.Tensor] = {}
        return masks

    def _fraction(self, step: int) -> float:
        end = self.config.update_until * self.config.steps
        if step + 1 >= end or (step + 1) % self.config.update_every:
            return 0.0
        return self.config.update_fraction * cosine((step + 1) / end)

    def _grow_scores(self, weight: torch.Tensor) -> torch.Tensor:
        if self.grow_by == "gradient":
            return weight.grad.detach().abs() if weight.grad is not None else torch.zeros_like(weight)
        return torch.rand(weight.shape, generator=self.generator).to(weight.device)

    @torch.no_grad()
    def before_step(self, model, masks, step) -> None:
        fraction = self._fraction(step)
        if fraction == 0.0:
            return
        for name, module in masks.modules(model).items():
            old = masks.masks[name].to(module.weight.device)
            count = int(fraction * int(old.count_nonzero()))
            new = move_mask(old, module.weight, self._grow_scores(module.weight), count)
            grown = new & ~old
            module.weight[grown] = 0  # new connections start at zero
            changed = new ^ old
            self._changed[name] = changed
            self.moved += int(grown.count_nonzero())
            masks.update(name, new)
        self.updates += 1

    @torch.no_grad()
    def after_step(self, model, masks, step, optimizer) -> None:
        if not self._changed:
            return
        modules = masks.modules(model)
        for name, changed in self._changed.items():
            state = optimizer.state.get(modules[name].weight, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][changed] = 0
        self._changed = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "counts": torch.tensor([self.updates, self.moved])}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])
        self.updates, self.moved = (int(v) for v in state["counts"])

    def record(self) -> dict:
        return {"mask_updates": self.updates, "weights_moved": self.moved, "grow_by": self.grow_by}


@TRAIN_METHODS.register("rigl")
class RigL(_DynamicSparse):
    """Drop by magnitude, grow by gradient magnitude."""

    grow_by = "gradient"


@TRAIN_METHODS.register("set")
class SET(_DynamicSparse):
    """Drop by magnitude, grow at random."""

    grow_by = "random"
