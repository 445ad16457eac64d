"""Weight-informed activation scores (as WINA does): ``|x_j| * ||W[:, j]||_2 ** p``.

A small input that meets a large weight column moves the output more than a
larger input meeting a tiny column; scaling by the column norm ranks the
channels by their effect on the layer's output rather than by size alone.
``p = 1`` is WINA's score, which bounds the output error when W's columns
are orthogonal; they are not in a trained model, and on SmolLM2-135M a
softer weighting ranks better. Unless ``weight_power`` is given,
:func:`sparsa.activations.apply` picks ``p`` among ``WEIGHT_POWERS`` by the
loss on held-out calibration text. ``weighted`` limits the weighting to some
layers (the WINA authors' code weights ``k_proj`` and ``gate_proj`` only).
"""

from __future__ import annotations

import torch

from .base import ACTIVATION_METHODS, linear_sites


def _column_norms(module, power: float = 1.0) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.float().norm(dim=0).pow(power).to(weight.dtype)


@ACTIVATION_METHODS.register("wina")
def wina_sites(model, config):
    power = 1.0 if config.weight_power is None else config.weight_power
    sites = linear_sites(model, config.targets, lambda module: None)
    for site in sites:
        if config.weighted is None or site.name.rsplit(".", 1)[-1] in config.weighted:
            site.scale = _column_norms(site.module, power)
    return sites
