"""Masks as state: which weights of each pruned linear may be non-zero.

A ``MaskState`` holds one boolean keep-mask per pruned linear (``True`` where
a weight is kept), by qualified module name. It is read off a pruned model
(``weight != 0``), saved and loaded with a checkpoint, and enforced around
every optimizer step:

* before the step, the gradients of pruned weights are zeroed, so optimizer
  moments never build up for them;
* after the step, pruned weights are zeroed again, so nothing (weight decay,
  a momentum left from before, a numerical accident) can revive them.

Three ways to plug it into training, all doing the same two things:

* ``masks.attach(optimizer, model)``: hooks on the optimizer itself, so any
  loop that calls ``optimizer.step()`` keeps the mask (our loop uses this);
* ``MaskCallback(masks)`` (``callback.py``): a Hugging Face ``Trainer`` callback;
* ``masks.mask_gradients(model)`` / ``masks.apply(model)`` by hand.

Methods that move the mask (RigL, SET) or recompute it (SR-STE, IMP) call
``masks.update(name, new_mask)``; everything else leaves it alone.
Under FSDP2 the weights are sharded DTensors; the masks are sharded the same
way on first use (``bind``), so every operation stays element-wise and local.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import InputError, require

__all__ = ["MaskState"]


class MaskState:
    """Keep-masks by qualified linear name; the training loop's view of the sparsity pattern."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = {name: m.detach().to(torch.bool) for name, m in masks.items()}
        self._bound: dict[str, torch.Tensor] = {}  # masks placed like their weights (device, DTensor sharding)

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None, skip: Iterable[str] = ("lm_head",)) -> "MaskState":
        """Masks read off the weights (``weight != 0``) of every linear with at least one zero.

        ``names`` restricts the linears considered; ``skip`` (exact names,
        suffixes or globs, as in pruning) leaves some out. A dense model gives
        an empty state; give ``names`` to track dense linears too.
        """
        chosen = set(names) if names is not None else None
        masks = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or _skipped(name, tuple(skip)):
                continue
            if chosen is not None and name not in chosen:
                continue
            mask = _full(module.weight) != 0
            if chosen is not None or not bool(mask.all()):
                masks[name] = mask
        return cls(masks)

    # -- what it says ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def names(self) -> list[str]:
        return list(self.masks)

    def sparsity(self) -> float:
        """Fraction of masked-out weights over all tracked linears."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.count_nonzero()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - int(m.count_nonzero()) / m.numel() for n, m in self.masks.items()}

    def equal(self, other: "MaskState") -> bool:
        return self.masks.keys() == other.masks.keys() and all(torch.equal(self.masks[n], other.masks[n].to(self.masks[n].device)) for n in self.masks)

    def clone(self) -> "MaskState":
        return MaskState({n: m.clone() for n, m in self.masks.items()})

    def assign(self, other: "MaskState") -> None:
        """Take over ``other``'s masks (a method may set up a new state; the caller's object follows it)."""
        if other is not self:
            self.masks = dict(other.masks)
            self._bound = {}

    def update(self, name: str, mask: torch.Tensor) -> None:
        """Replace one layer's mask (DST, SR-STE and IMP move or recompute masks)."""
        require(name in self.masks, f"no mask for {name}; known layers: {', '.join(list(self.masks)[:3])} ...")
        require(tuple(mask.shape) == tuple(self.masks[name].shape), f"mask for {name} has shape {tuple(mask.shape)}, expected {tuple(self.masks[name].shape)}")
        self.masks[name] = mask.detach().to(torch.bool)
        self._bound.pop(name, None)

    # -- enforcing it ---------------------------------------------------------------

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        found = dict(model.named_modules())
        missing = [n for n in self.masks if n not in found]
        if missing:
            raise InputError(f"the model has no layer {missing[0]} that the masks name; were the masks made for another model?")
        return {n: found[n] for n in self.masks}

    def bound(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The mask of ``name`` placed like ``weight``: same device, and sharded the same way under FSDP2."""
        mask = self._bound.get(name)
        if mask is None:
            mask = self.masks[name].to(_local_device(weight))
            if _is_dtensor(weight):
                from torch.distributed.tensor import distribute_tensor

                mask = distribute_tensor(mask, weight.device_mesh, weight.placements)
            self._bound[name] = mask
        return mask

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight."""
        for name, module in self.modules(model).items():
            w = module.weight
            w.mul_(self.bound(name, w).to(w.dtype))

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights (so optimizer moments stay zero for them)."""
        for name, module in self.modules(model).items():
            g = module.weight.grad
            if g is not None:
                g.mul_(self.bound(name, g).to(g.dtype))

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """Enforce the mask around every ``optimizer.step()``; returns handles whose ``remove()`` detaches it."""
        pre = optimizer.register_step_pre_hook(lambda *_: self.mask_gradients(model))
        post = optimizer.register_step_post_hook(lambda *_: self.apply(model))
        return (pre, post)

    def check(self, model: nn.Module) -> bool:
        """Whether every pruned weight of ``model`` is zero."""
        for name, module in self.modules(model).items():
            w = _full(module.weight)
            if bool((w[~self.masks[name].to(w.device)] != 0).any()):
                return False
        return True

    # -- saving ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu().contiguous() for n, m in self.masks.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "MaskState":
        return cls({n: t.to(torch.bool) for n, t in state.items()})


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _local_device(t: torch.Tensor) -> torch.device:
    return t.to_local().device if _is_dtensor(t) else t.device


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole weight (gathers a sharded DTensor)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach()
