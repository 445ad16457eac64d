"""Weight-informed activation scores (as WINA does): ``|x_j| * ||W[:, j]||_2 ** p``.

A small input that meets a large weight column moves the output more than a
larger input meeting a tiny column; scaling by the column norm ranks the
channels by their effect on the layer's output rather than by size alone.
``p = 1`` is WINA's score, which bounds the output error when W's columns
are orthogonal; they are not in a trained model, and on SmolLM2-135M a
softer weighting ranks better. Unless ``weight_power`` is given,
:func:`sparsa.activations.apply` picks ``p`` among ``WEIGHT_POWERS`` by the
divergence from the dense model on held-out calibration text; ``p = 0``
among them is plain ``|x_j|`` (TEAL's score), chosen where weighting does
not keep the model closer to dense. ``weighted`` limits the weighting to some
layers (the WINA authors' code weights ``k_proj`` and ``gate_proj`` only).
"""

from __future__ import annotations

from .base import ACTIVATION_METHODS, linear_sites, weight_informed


@ACTIVATION_METHODS.register("wina")
@weight_informed
def wina_sites(model, config, batches):
    return weighted_sites(model, config, lambda site: site.module.weight.detach().float())


def weighted_sites(model, config, weight_of) -> list:
    """Input sites whose score is ``|x_j| * ||weight_of(site)[:, j]|| ** p`` (on ``config.weighted`` layers; others ``|x_j|``)."""
    power = 1.0 if config.weight_power is None else config.weight_power
    sites = linear_sites(model, config.targets, lambda module: None)
    if power == 0:  # |x_j| alone: no scale, so a kernel compares one threshold per site
        return sites
    for site in sites:
        if config.weighted is None or site.name.rsplit(".", 1)[-1] in config.weighted:
            site.scale = weight_of(site).norm(dim=0).pow(power).to(site.module.weight.dtype)
    return sites
