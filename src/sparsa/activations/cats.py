"""Gate-activation thresholding for SwiGLU MLPs (as CATS does).

In ``down(act(gate(x)) * up(x))`` the activated gate decides how much of each
intermediate channel survives. Channels with ``|act(gate(x))|`` under the
threshold are zeroed, which zeroes the product, so ``up`` need not compute
them and ``down`` need not read their weight columns. Only MLPs are cut;
``targets`` is ignored.
"""

from __future__ import annotations

from ..errors import InputError
from .base import ACTIVATION_METHODS, Site, in_decoder_layer


@ACTIVATION_METHODS.register("cats")
def cats_sites(model, config, batches):
    sites = []
    for name, module in model.named_modules():
        act = getattr(module, "act_fn", None)
        if in_decoder_layer(name) and name.endswith("mlp") and act is not None and hasattr(module, "gate_proj"):
            sites.append(Site(f"{name}.act_fn", act, "output"))
    if not sites:
        raise InputError(f"{type(model).__name__} has no gated MLP (mlp.gate_proj with mlp.act_fn); cats needs a SwiGLU-style MLP")
    return sites
