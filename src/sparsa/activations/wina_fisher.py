"""Weight-informed scores weighted by the loss's sensitivity: ``|x_j| * ||f * W[:, j]||_2 ** p``.

WINA's column norm ``||W[:, j]||`` counts every output of a layer alike, but
the loss does not: some output channels feed heads or MLP units the model
leans on, others barely matter. Zeroing input ``j`` moves output ``i`` by
``x_j * W[i, j]``; to second order that raises the loss by about
``F_i * (x_j * W[i, j]) ** 2``, where ``F_i = E[(dL/dy_i) ** 2]`` is the
diagonal of the output's Fisher information, measured once by backpropagating
the language-model loss over the calibration text. Summed over outputs, the
cost of cutting ``j`` is ``x_j ** 2 * sum_i F_i * W[i, j] ** 2``: the column
norm of ``W`` with its rows scaled by ``f = sqrt(F)``. As for wina, ``p`` is
picked among ``WEIGHT_POWERS`` on held-out calibration text unless given.
A fused kernel sees the same per-channel thresholds as for wina (the Fisher
is folded into the weight column's scale), so it costs nothing at decode.
"""

from __future__ import annotations

import hashlib
import weakref

import torch
import torch.nn as nn

from ..errors import InputError
from .base import ACTIVATION_METHODS, linear_sites, weight_informed
from .wina import weighted_sites

_FISHER: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@ACTIVATION_METHODS.register("wina_fisher")
@weight_informed
def wina_fisher_sites(model, config, batches):
    fisher = output_fisher(model, config.targets, batches)
    return weighted_sites(model, config, lambda site: _scaled_rows(site.module.weight, fisher[site.name]))


def _scaled_rows(weight: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    return weight.detach().float() * fisher.to(weight.device).sqrt()[:, None]


def output_fisher(model: nn.Module, targets: tuple[str, ...], batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per target linear, ``E[(dL/dy_i) ** 2]`` over the tokens of ``batches`` (float32 ``[out_features]``, CPU).

    ``L`` is the next-token loss of each batch row. Cached per model for the
    same batches and targets (the power search asks several times).
    """
    key = (targets, hashlib.sha1(batches.cpu().numpy().tobytes()).hexdigest())
    cached = _FISHER.get(model, {})
    if key in cached:
        return cached[key]
    sites = linear_sites(model, targets, lambda module: None)
    sums = {s.name: torch.zeros(s.module.out_features) for s in sites}
    tokens = 0

    def watch(name):
        def accumulate(grad: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            sums[name] += grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(0).cpu()

        def hook(module, args, output) -> None:
            output.register_hook(accumulate)

        return hook

    handles = [s.module.register_forward_hook(watch(s.name)) for s in sites]
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    device = params[0].device
    try:
        for p in params:  # gradients must flow; they are thrown away
            p.requires_grad_(True)
        with torch.enable_grad():
            for row in batches:
                row = row[None].to(device)
                model(row, labels=row).loss.backward()
                model.zero_grad(set_to_none=True)
                tokens += row.numel()
    except RuntimeError as exc:
        raise InputError(f"wina_fisher backpropagates the loss through the model and could not ({exc}); "
                         "apply it before sparsa.accelerate, or use wina") from exc
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
        model.zero_grad(set_to_none=True)
    fisher = {name: total / tokens for name, total in sums.items()}
    _FISHER.setdefault(model, {})[key] = fisher
    return fisher
