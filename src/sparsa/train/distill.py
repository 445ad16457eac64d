"""Masked fine-tuning, alone or distilled from the dense teacher.

``masked``: next-token cross-entropy; the mask holds around every step.

``distill``: the same, plus what the dense model (the teacher, the model as
it was before pruning) knows: for every decoder layer, the mean squared
difference between the student's and the teacher's hidden states after each
is normalised per token (zero mean, unit variance over the hidden size, so
layers whose activations are large do not dominate), averaged over layers;
and the KL divergence from the teacher's next-token distribution to the
student's, at temperature T (scaled by T^2 so its gradient does not shrink
as T grows)::

    loss = ce_weight * CE + hidden_weight * mean_l ||norm(h_s^l) - norm(h_t^l)||^2 + kl_weight * T^2 KL(p_t || p_s)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TRAIN_METHODS, TrainMethod

__all__ = ["Distill", "MaskedFineTune", "distillation_terms"]


@TRAIN_METHODS.register("masked")
class MaskedFineTune(TrainMethod):
    """Cross-entropy fine-tuning that keeps the mask."""

    distributed = True


def _normalised(h: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h.float(), h.shape[-1:])


def distillation_terms(student_out, teacher_out, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-layer hidden-state L2, logit KL) between two outputs run with ``output_hidden_states=True``."""
    pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))
    hidden = torch.stack([F.mse_loss(_normalised(s), _normalised(t)) for s, t in pairs]).mean()
    t = temperature
    log_p_s = F.log_softmax(student_out.logits.float() / t, dim=-1).flatten(0, -2)
    log_p_t = F.log_softmax(teacher_out.logits.float() / t, dim=-1).flatten(0, -2)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)
    return hidden, kl


@TRAIN_METHODS.register("distill")
class Distill(TrainMethod):
    """Masked fine-tuning with per-layer hidden-state and logit distillation from the dense teacher."""

    needs_teacher = True
    distributed = True

    def loss(self, model, batch, teacher):
        c = self.config
        out = model(input_ids=batch, labels=batch, output_hidden_states=True, use_cache=False)
        with torch.no_grad():
            target = teacher(input_ids=batch, output_hidden_states=True, use_cache=False)
        hidden, kl = distillation_terms(out, target, c.temperature)
        loss = c.ce_weight * out.loss + c.hidden_weight * hidden + c.kl_weight * kl
        return loss, {"ce": out.loss.detach(), "hidden": hidden.detach(), "kl": kl.detach()}
