"""Weight-informed activation scores (as WINA does): ``|x_j| * ||W[:, j]||_2``.

A small input that meets a large weight column moves the output more than a
larger input meeting a tiny column; scaling by the column norm ranks the
channels by their effect on the layer's output rather than by size alone.
"""

from __future__ import annotations

import torch

from .base import ACTIVATION_METHODS, linear_sites


def _column_norms(module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.float().norm(dim=0).to(weight.dtype)


@ACTIVATION_METHODS.register("wina")
def wina_sites(model, config):
    return linear_sites(model, config.targets, _column_norms)
