"""Magnitude thresholds per tensor (as TEAL does): a channel is kept when ``|x_j|`` reaches the site's threshold."""

from __future__ import annotations

from .base import ACTIVATION_METHODS, linear_sites


@ACTIVATION_METHODS.register("teal")
def teal_sites(model, config, batches):
    return linear_sites(model, config.targets, lambda module: None)
