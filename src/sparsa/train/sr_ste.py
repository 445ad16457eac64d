"""N:M training with SR-STE (sparse-refined straight-through estimator; Zhou et al., 2021).

Each pruned linear keeps its dense weight ``W``; every forward pass uses
``W * M`` with ``M`` the N:M mask of the largest ``|W|`` in each group of M
input columns (chosen by ``sparsa.prune.patterns.mask_nm``, recomputed each
forward, so the pattern is exact at every step). Gradients reach ``W``
through a straight-through estimator, and SR-STE adds a decay on the pruned
weights that pulls them towards zero, so the mask settles instead of
flipping back and forth::

    grad_W = M * g + s(t) * (1 - M) * g + lambda_W * (1 - M) * W

The progressive schedule is ``s(t)``: the share of the gradient that still
reaches pruned weights falls from 1 to 0 along a cosine over the run, so
pruned weights can come back early on and only fade towards the end. At the
end the dense weights are replaced by ``W * M`` and the model is a plain
N:M-sparse model again.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import InputError
from ..prune.patterns import mask_nm, require_nm_fits
from .base import TRAIN_METHODS, TrainMethod, cosine
from .masks import MaskState, _skipped

__all__ = ["NMSparse", "SRSTE"]


class _MaskedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        keep = mask.to(grad.dtype)
        return grad * (keep + ctx.scale * (1 - keep)), None, None


class NMSparse(nn.Module):
    """Parametrization of a linear's weight: the N:M-masked weight, with a straight-through gradient."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.n, self.m = n, m
        self.scale = 1.0  # share of the gradient that reaches pruned weights
        self.mask: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.mask = mask_nm(weight.detach().abs(), self.n, self.m)
        return _MaskedSTE.apply(weight, self.mask, self.scale)


@TRAIN_METHODS.register("sr_ste")
class SRSTE(TrainMethod):
    """N:M-sparse training: SR-STE with a progressively decaying gradient to pruned weights."""

    moves_mask = True

    holds_mask = False  # the mask is recomputed each forward; pruned weights stay dense underneath

    def setup(self, model: nn.Module, masks: MaskState) -> MaskState:
        n, m = self._nm()
        names = masks.names() or [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and not _skipped(name, ("lm_head",))]
        self.modules = {}
        found = dict(model.named_modules())
        for name in names:
            module = found[name]
            require_nm_fits(module.in_features, n, m, name)
            if not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(module, "weight", NMSparse(n, m))
            self.modules[name] = module
        self._step = 0
        return MaskState(self.current_masks())

    def _nm(self) -> tuple[int, int]:
        if self.config.nm is None:
            raise InputError("sr_ste trains an N:M pattern; pass --pattern N:M such as 2:4")
        return self.config.nm

    @staticmethod
    def _parametrization(module: nn.Module) -> NMSparse:
        return module.parametrizations.weight[0]

    def _scale(self, step: int) -> float:
        return cosine(step / max(1, self.config.steps - 1))

    def loss(self, model, batch, teacher):
        for module in self.modules.values():
            self._parametrization(module).scale = self._scale(self._step)
        return super().loss(model, batch, teacher)

    @torch.no_grad()
    def before_step(self, model, masks, step) -> None:
        decay = self.config.srste_decay
        for module in self.modules.values():
            weight = module.parametrizations.weight.original
            mask = self._parametrization(module).mask
            if weight.grad is not None and mask is not None and decay:
                weight.grad.add_(weight * (~mask).to(weight.dtype), alpha=decay)

    def after_step(self, model, masks, step, optimizer) -> None:
        self._step = step + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor([self._step])}

    def load_state_dict(self, state) -> None:
        self._step = int(state["step"][0])

    @torch.no_grad()
    def current_masks(self) -> dict[str, torch.Tensor]:
        return {name: mask_nm(mod.parametrizations.weight.original.abs(), *self._nm()) for name, mod in self.modules.items()}

    def finish(self, model, masks) -> None:
        for name, mask in self.current_masks().items():
            module = self.modules[name]
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                module.weight.mul_(mask.to(module.weight.dtype))
            masks.update(name, mask)

    def record(self) -> dict:
        n, m = self._nm()
        return {"pattern": f"{n}:{m}", "srste_decay": self.config.srste_decay}
