"""Structured pruning: remove whole FFN channels and attention KV groups.

Unlike masks, this physically shrinks the model: linears are replaced by
smaller ones and the config is updated, so the result saves and loads in plain
transformers and runs faster on any hardware, with no sparse kernels.

Which models: the Llama family of decoders (Llama, Qwen2/3, Mistral, Gemma,
SmolLM, ...), whose layers sit at ``model.model.layers`` and hold
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` as plain
``nn.Linear`` modules, with grouped-query attention described by
``config.num_key_value_heads``.

How much: every layer loses the same *number* of FFN channels and of KV groups,
so the config still describes all layers with one ``intermediate_size`` and one
pair of head counts, and the saved model loads in transformers unchanged.
Counts are rounded to nearest, halves up (``0.25`` of 2 groups removes 1;
Python's ``round`` would remove 0).

Which ones: each layer keeps its own most important channels and groups.

* FFN channel ``c`` is the ``c``-th input of ``down_proj``. With calibration
  statistics it scores ``sum_i |W_down[i, c]| * ||x_c||``: Wanda's score summed
  over the column that removing ``c`` deletes, where ``||x_c||`` is the L2 norm
  of down_proj's ``c``-th input over the calibration tokens. Without statistics
  it scores ``||W_gate[c, :]|| * ||W_up[c, :]|| * ||W_down[:, c]||``: the
  channel's output is ``W_down[:, c] * act(W_gate[c] x) * (W_up[c] x)``, whose
  size that product bounds (for ``|act(z)| <= |z|``, true of SiLU and GELU) up
  to the input's norm, which every channel shares.
* A KV group is one key/value head and the query heads that share it; removing
  whole groups keeps grouped-query attention consistent. With statistics it
  scores the sum of the same Wanda column score over the o_proj columns its
  query heads write. Without statistics it scores
  ``||W_o[:, group columns]||_F * ||W_v[group rows, :]||_F``: what the group
  adds to the output passes through both.

Activation statistics are a dict mapping a linear's qualified name (e.g.
``"model.layers.3.mlp.down_proj"``) to the per-input-feature L2 norm over the
calibration tokens, a 1-D tensor of length ``in_features``. When given, it must
cover ``mlp.down_proj`` and ``self_attn.o_proj`` of every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ModelError, require
from ..models import count_parameters

__all__ = ["LayerScores", "StructuredConfig", "channel_scores", "prune_structured"]

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LAYERS_PATH = "model.layers"  # where the Llama family keeps its decoder layers
SUPPORTED = (
    "Llama-family decoders (LlamaForCausalLM, Qwen2/Qwen3, Mistral, Gemma, ...) with plain nn.Linear "
    "model.layers[i].self_attn.q/k/v/o_proj and mlp.gate/up/down_proj"
)


@dataclass(frozen=True)
class StructuredConfig:
    """How much to remove: fractions of FFN channels and of KV head groups, each in [0, 1)."""

    ffn_sparsity: float = 0.5
    head_sparsity: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ffn_sparsity", "head_sparsity"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                f"{name} must be a number in [0, 1), got {value!r}",
            )


@dataclass(frozen=True)
class LayerScores:
    """Importance in one decoder layer: higher means keep."""

    ffn: torch.Tensor  # [intermediate_size], one per FFN channel
    kv_groups: torch.Tensor  # [num_key_value_heads], one per KV group


@dataclass(frozen=True)
class _Shape:
    """The attention and FFN sizes every layer shares, read from the config."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's attention and MLP modules, and its qualified name."""

    name: str
    attn: nn.Module
    mlp: nn.Module


# -- finding the structure -------------------------------------------------------------

def _unsupported(model: nn.Module, what: str) -> ModelError:
    return ModelError(f"structured pruning does not support {type(model).__name__}: {what}; it supports {SUPPORTED}")


def _decoder_layers(model: nn.Module) -> list[_Layer]:
    """The decoder layers, checked to have the Llama-style linears this module slices.

    Exactly ``nn.Linear`` is required: a quantized or otherwise wrapped linear
    would silently lose its behaviour when replaced by a plain one.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise _unsupported(model, "no decoder layers at model.model.layers")
    found = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for part, owner, names in (("self_attn", attn, ATTENTION_LINEARS), ("mlp", mlp, MLP_LINEARS)):
            for name in names:
                linear = getattr(owner, name, None)
                if type(linear) is not nn.Linear:
                    got = "missing" if linear is None else type(linear).__name__
                    raise _unsupported(model, f"layer {i} {part}.{name} is {got}, not nn.Linear")
                if linear.weight.device.type == "meta":
                    raise _unsupported(model, f"layer {i} {part}.{name} has no weights in memory (offloaded?); load it whole")
        found.append(_Layer(f"{LAYERS_PATH}.{i}", attn, mlp))
    return found


def _shape(model: nn.Module, layers: list[_Layer]) -> _Shape:
    """Head counts and sizes from the config, checked against every layer's weights."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    intermediate = getattr(cfg, "intermediate_size", None)
    if not isinstance(heads, int) or not isinstance(intermediate, int):
        raise _unsupported(model, "its config has no integer num_attention_heads and intermediate_size")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    shape = _Shape(heads, kv_heads, head_dim, intermediate)
    for layer in layers:
        expected = {
            "self_attn.q_proj": (layer.attn.q_proj, heads * head_dim),
            "self_attn.k_proj": (layer.attn.k_proj, kv_heads * head_dim),
            "self_attn.v_proj": (layer.attn.v_proj, kv_heads * head_dim),
            "mlp.gate_proj": (layer.mlp.gate_proj, intermediate),
            "mlp.up_proj": (layer.mlp.up_proj, intermediate),
        }
        for path, (linear, rows) in expected.items():
            if linear.out_features != rows:
                raise ModelError(
                    f"{layer.name}.{path} has {linear.out_features} outputs but the config implies {rows}; "
                    f"the {type(model).__name__} config does not match its weights"
                )
    if heads % kv_heads:
        raise ModelError(f"{type(model).__name__} has {heads} query heads, not a multiple of {kv_heads} KV heads")
    return shape


def _check_heads_removable(model: nn.Module, layers: list[_Layer], shape: _Shape) -> None:
    """Refuse head pruning where attention holds other weights that span all heads.

    OLMo-2, for one, normalises the concatenated queries of all heads
    (``q_norm`` over ``heads * head_dim``); dropping heads would change that
    norm for the heads kept, so slicing alone cannot be exact.
    """
    spanning = {shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim} - {shape.head_dim}
    for layer in layers:
        for child_name, child in layer.attn.named_children():
            if child_name in ATTENTION_LINEARS:
                continue
            if any(p.numel() in spanning for p in child.parameters()):
                raise _unsupported(
                    model, f"self_attn.{child_name} has weights across all heads, so heads cannot be removed (use head_sparsity=0)"
                )


# -- importance ------------------------------------------------------------------------

def _norms_for(activation_norms: dict[str, torch.Tensor] | None, name: str, linear: nn.Linear) -> torch.Tensor | None:
    """The calibration norms of ``linear``'s inputs, checked, as float32 on its device."""
    if activation_norms is None:
        return None
    norms = activation_norms.get(name)
    require(
        norms is not None,
        f"activation norms have no entry for {name!r}; give norms for every layer's mlp.down_proj and "
        f"self_attn.o_proj, or none to score by weights",
    )
    require(
        isinstance(norms, torch.Tensor) and norms.shape == (linear.in_features,),
        f"activation norms for {name!r} must be a 1-D tensor of {linear.in_features} values, "
        f"got {tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__}",
    )
    norms = norms.detach().to(device=linear.weight.device, dtype=torch.float32)
    require(
        bool(torch.isfinite(norms).all()) and bool((norms >= 0).all()),
        f"activation norms for {name!r} must be finite and non-negative; recompute them",
    )
    return norms


def _wanda_column_scores(linear: nn.Linear, norms: torch.Tensor) -> torch.Tensor:
    """``sum_i |W[i, c]| * ||x_c||`` for each input column ``c``: what deleting the column costs."""
    return linear.weight.detach().float().abs().sum(dim=0) * norms


def ffn_channel_scores(mlp: nn.Module, down_norms: torch.Tensor | None) -> torch.Tensor:
    """Importance of each intermediate channel (see the module docstring)."""
    if down_norms is not None:
        return _wanda_column_scores(mlp.down_proj, down_norms)
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    return gate * up * down


def kv_group_scores(attn: nn.Module, o_norms: torch.Tensor | None, shape: _Shape) -> torch.Tensor:
    """Importance of each KV group (see the module docstring).

    o_proj's input is the query heads' outputs concatenated head by head, and
    query heads ``g * per_group ... (g + 1) * per_group - 1`` share KV head
    ``g`` (transformers' ``repeat_kv`` order), so a group owns one contiguous
    block of ``per_group * head_dim`` o_proj columns.
    """
    if o_norms is not None:
        return _wanda_column_scores(attn.o_proj, o_norms).view(shape.kv_heads, -1).sum(dim=1)
    o = attn.o_proj.weight.detach().float()
    o_per_group = o.view(o.shape[0], shape.kv_heads, -1).square().sum(dim=(0, 2)).sqrt()
    v = attn.v_proj.weight.detach().float()
    v_per_group = v.view(shape.kv_heads, -1).square().sum(dim=1).sqrt()
    return o_per_group * v_per_group


def channel_scores(model: nn.Module, activation_norms: dict[str, torch.Tensor] | None = None) -> list[LayerScores]:
    """Per decoder layer, the importance of each FFN channel and each KV group.

    With ``activation_norms`` the scores are Wanda-like (weights times input
    norms); without, they come from weight norms alone.
    """
    layers = _decoder_layers(model)
    shape = _shape(model, layers)
    return [_layer_scores(layer, shape, activation_norms) for layer in layers]


def _layer_scores(layer: _Layer, shape: _Shape, activation_norms: dict[str, torch.Tensor] | None) -> LayerScores:
    down = _norms_for(activation_norms, f"{layer.name}.mlp.down_proj", layer.mlp.down_proj)
    o = _norms_for(activation_norms, f"{layer.name}.self_attn.o_proj", layer.attn.o_proj)
    return LayerScores(ffn=ffn_channel_scores(layer.mlp, down), kv_groups=kv_group_scores(layer.attn, o, shape))


# -- selecting and slicing -------------------------------------------------------------

def removed_count(fraction: float, total: int) -> int:
    """How many of ``total`` a fraction removes: rounded to nearest, halves up."""
    return math.floor(fraction * total + 0.5)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, ascending, so kept rows stay in order (ties: lower index)."""
    best = torch.sort(scores.cpu(), descending=True, stable=True).indices[:keep]
    return torch.sort(best).values


def _head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows (of q/k/v) or columns (of o) that heads occupy: ``head_dim`` consecutive ones each."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the chosen output rows and input columns of ``linear``.

    It is built on the meta device and given the copied tensors, so no time
    goes into initialising weights that are overwritten at once; dtype, device
    and ``requires_grad`` follow the original.
    """
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        rows = rows.to(weight.device)
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _shrink_mlp(mlp: nn.Module, channels: torch.Tensor) -> None:
    """Keep only ``channels``: rows of gate and up, the matching columns of down."""
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=channels)
    mlp.up_proj = _sliced(mlp.up_proj, rows=channels)
    mlp.down_proj = _sliced(mlp.down_proj, columns=channels)


def _shrink_attention(attn: nn.Module, groups: torch.Tensor, shape: _Shape) -> None:
    """Keep only the KV ``groups``: their k/v heads, their query heads, and o_proj's columns for those."""
    per_group = shape.heads_per_group
    query_heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
    q_channels = _head_channels(query_heads, shape.head_dim)
    kv_channels = _head_channels(groups, shape.head_dim)
    attn.q_proj = _sliced(attn.q_proj, rows=q_channels)
    attn.k_proj = _sliced(attn.k_proj, rows=kv_channels)
    attn.v_proj = _sliced(attn.v_proj, rows=kv_channels)
    attn.o_proj = _sliced(attn.o_proj, columns=q_channels)
    _update_attention_attributes(attn, len(query_heads), len(groups), shape.head_dim)


def _update_attention_attributes(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Set the head counts an attention module caches at construction.

    transformers 5.x's LlamaAttention (and Qwen2, Mistral, ...) keeps
    ``head_dim`` and ``num_key_value_groups`` (query heads per KV head), both
    unchanged by removing whole groups, but set anyway so the module states
    what it is; older releases and some families also keep ``num_heads`` and
    ``num_key_value_heads``, set where present. Everything else they read from
    the shared config object, updated by :func:`_update_config`.
    """
    attn.head_dim = head_dim
    attn.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _update_config(config, shape: _Shape) -> None:
    """Describe the shrunk layers; ``head_dim`` is explicit as ``hidden_size / heads`` no longer gives it."""
    config.intermediate_size = shape.intermediate
    config.num_attention_heads = shape.heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = shape.head_dim


# -- the whole model ---------------------------------------------------------------------

@torch.no_grad()
def prune_structured(
    model: nn.Module, config: StructuredConfig, activation_norms: dict[str, torch.Tensor] | None = None
) -> dict:
    """Remove FFN channels and KV head groups from every decoder layer, in place.

    Returns a JSON-ready report: parameter counts before and after, how each
    importance was measured, the new config values, and per layer how many
    channels were kept and which KV groups (their original indices).
    Everything is checked before any layer changes, so an error leaves the
    model as it was.
    """
    require(isinstance(config, StructuredConfig), f"config must be a StructuredConfig, got {type(config).__name__}")
    layers = _decoder_layers(model)
    before = _shape(model, layers)
    drop_channels = removed_count(config.ffn_sparsity, before.intermediate)
    drop_groups = removed_count(config.head_sparsity, before.kv_heads)
    require(
        drop_channels < before.intermediate,
        f"ffn_sparsity {config.ffn_sparsity} would remove all {before.intermediate} FFN channels of "
        f"{type(model).__name__}; use a smaller fraction",
    )
    require(
        drop_groups < before.kv_heads,
        f"head_sparsity {config.head_sparsity} would remove all {before.kv_heads} KV head groups of "
        f"{type(model).__name__}; use less than {(before.kv_heads - 0.5) / before.kv_heads:.4g}",
    )
    if drop_groups:
        _check_heads_removable(model, layers, before)
    scores = [_layer_scores(layer, before, activation_norms) for layer in layers]

    keep_groups = before.kv_heads - drop_groups
    after = _Shape(keep_groups * before.heads_per_group, keep_groups, before.head_dim, before.intermediate - drop_channels)
    parameters_before = count_parameters(model)
    per_layer = []
    for layer, score in zip(layers, scores):
        groups = torch.arange(before.kv_heads)
        if drop_channels:
            _shrink_mlp(layer.mlp, _top(score.ffn, after.intermediate))
        if drop_groups:
            groups = _top(score.kv_groups, keep_groups)
            _shrink_attention(layer.attn, groups, before)
        per_layer.append({"layer": layer.name, "ffn_channels_kept": after.intermediate, "kv_groups_kept": groups.tolist()})
    _update_config(model.config, after)
    return {
        "importance": "weight norms" if activation_norms is None else "activation norms",
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(model),
        "ffn_channels_removed_per_layer": drop_channels,
        "kv_groups_removed_per_layer": drop_groups,
        "intermediate_size": after.intermediate,
        "num_attention_heads": after.heads,
        "num_key_value_heads": after.kv_heads,
        "head_dim": after.head_dim,
        "layers": per_layer,
    }
