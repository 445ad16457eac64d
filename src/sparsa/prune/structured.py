"""Structured pruning: remove whole FFN channels and attention head groups.

Unlike masks, this physically shrinks the model: the linears are replaced by
smaller ones and the config is updated, so the result saves and loads in
plain transformers and runs faster on any hardware.

Every layer loses the same number of channels and head groups (one
``intermediate_size`` and one head count in the config), but each layer
chooses which ones by importance:

* an FFN channel ``c`` is scored ``sum_i |W_down[i, c]| * ||x_c||`` (Wanda's
  score summed over the column it would delete), with ``||x_c||`` the norm of
  down_proj's input over the calibration tokens; without calibration, the
  product of the channel's weight norms in gate, up and down;
* a KV group (one key/value head and the query heads sharing it, so
  grouped-query attention stays consistent) is scored the same way over the
  o_proj columns its query heads write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ModelError, require
from ..models import adapter_for, count_parameters


@dataclass(frozen=True)
class StructuredConfig:
    ffn_sparsity: float = 0.5  # fraction of FFN channels removed
    head_sparsity: float = 0.0  # fraction of KV head groups removed

    def __post_init__(self) -> None:
        require(0 <= self.ffn_sparsity < 1, f"ffn sparsity must be in [0, 1), got {self.ffn_sparsity}")
        require(0 <= self.head_sparsity < 1, f"head sparsity must be in [0, 1), got {self.head_sparsity}")


def _parts(layer: nn.Module, model: nn.Module):
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names_ok = attn is not None and mlp is not None and all(
        isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ) and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
    if not names_ok:
        raise ModelError(
            f"structured pruning needs Llama-style layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); "
            f"{type(model).__name__} has none; use an unstructured or N:M pattern instead"
        )
    return attn, mlp


def _column_score(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Importance of each input column: sum_i |W[i, c]| * ||x_c|| (or the column norm without data)."""
    w = weight.detach().float()
    if norms is None:
        return w.norm(dim=0)
    return w.abs().sum(dim=0) * norms.to(w.device).float()


def ffn_scores(mlp: nn.Module, norms: torch.Tensor | None) -> torch.Tensor:
    if norms is not None:
        return _column_score(mlp.down_proj.weight, norms)
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    return gate * up * _column_score(mlp.down_proj.weight, None)


def group_scores(attn: nn.Module, norms: torch.Tensor | None, groups: int, head_dim: int) -> torch.Tensor:
    per_channel = _column_score(attn.o_proj.weight, norms)
    return per_channel.view(groups, -1).sum(dim=1)  # o_proj columns are grouped head by head


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` best, in their original order (ties: lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def _shrunk(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if columns is not None:
        weight = weight[:, columns.to(weight.device)]
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias.detach()[rows.to(bias.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def prune_structured(model: nn.Module, config: StructuredConfig, activation_norms: dict[str, torch.Tensor] | None = None) -> dict:
    """Remove FFN channels and KV head groups from every decoder layer; returns a report."""
    adapter = adapter_for(model)
    cfg = model.config
    layers = adapter.layers(model)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_group = heads // kv_heads
    drop_groups = round(config.head_sparsity * kv_heads)
    require(
        drop_groups < kv_heads,
        f"head sparsity {config.head_sparsity} would remove all {kv_heads} KV head groups; use a smaller --heads",
    )
    keep_channels = cfg.intermediate_size - round(config.ffn_sparsity * cfg.intermediate_size)
    keep_groups = kv_heads - drop_groups
    norms = activation_norms or {}
    before = count_parameters(model)
    for i, layer in enumerate(layers):
        attn, mlp = _parts(layer, model)
        prefix = adapter.layer_prefix(i)
        channels = _top(ffn_scores(mlp, norms.get(f"{prefix}.mlp.down_proj")), keep_channels)
        mlp.gate_proj = _shrunk(mlp.gate_proj, rows=channels)
        mlp.up_proj = _shrunk(mlp.up_proj, rows=channels)
        mlp.down_proj = _shrunk(mlp.down_proj, columns=channels)
        if drop_groups:
            groups = _top(group_scores(attn, norms.get(f"{prefix}.self_attn.o_proj"), kv_heads, head_dim), keep_groups)
            query_heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
            q_rows, kv_rows = _head_rows(query_heads, head_dim), _head_rows(groups, head_dim)
            attn.q_proj = _shrunk(attn.q_proj, rows=q_rows)
            attn.k_proj = _shrunk(attn.k_proj, rows=kv_rows)
            attn.v_proj = _shrunk(attn.v_proj, rows=kv_rows)
            attn.o_proj = _shrunk(attn.o_proj, columns=q_rows)
    cfg.intermediate_size = keep_channels
    cfg.head_dim = head_dim  # explicit now: hidden_size / heads no longer gives it
    cfg.num_attention_heads = keep_groups * per_group
    cfg.num_key_value_heads = keep_groups
    return {
        "parameters_before": before,
        "parameters_after": count_parameters(model),
        "intermediate_size": keep_channels,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": keep_groups,
        "head_dim": head_dim,
    }
