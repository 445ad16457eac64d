"""Sparse attention inside any Hugging Face model that uses transformers' attention interface.

``apply(model, "vertical_slash", vertical=1024, slash=2048)`` registers one
attention function, ``"sparsa"``, with transformers (``AttentionInterface``
plus the matching mask function) and switches the model to it. Each
attention module gets an :class:`AttentionPolicy`; layers left out keep
none and run dense. The function runs transformers' own SDPA attention
whenever sparsity does not apply:

* fewer keys than ``min_len`` (short prompts gain nothing);
* the wrong phase: prefill patterns skip decode steps (one query) and
  ``quest`` skips prefills;
* a padding or sliding-window mask (sliding-window layers are already
  local), logit soft-capping, or attention dropout in training; a decode
  step under a boolean mask of a pattern that chooses on the device
  (streaming, quest) is the exception (below).

Otherwise it builds the block mask from the layer's actual queries and keys
and runs it on the chosen backend. A decode step of a static pattern
(streaming), whose one query keeps whole ranges of the cache, attends those
ranges with SDPA instead: slices of the cache when it holds exactly the
sequence (a dynamic cache), or, under a mask (a static cache, whose length
only the device knows, or left padding), the slots at positions found on
the device from the mask, counted from each row's first valid slot, so that
a CUDA graph can capture the step: read in place by a Triton kernel on a GPU
(:mod:`sparsa.kernels.slot_attention`), gathered for SDPA elsewhere. Quest
decodes the same way under a mask, choosing pages per query head from page
bounds it keeps per layer (made when a prefill writes the cache, widened by
each step's key).
``remove(model)`` restores the previous attention implementation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import InputError, require
from ..kernels._triton import HAVE_TRITON, half_on_gpu
from ..kernels.devices import on_input_device
from ..kernels.slot_attention import slot_attention
from .backends import BACKENDS, attend
from .base import PatternBase, make_pattern
from .masks import causal_block_count, causal_blocks

__all__ = ["AttentionPolicy", "apply", "remove"]

NAME = "sparsa"


@dataclasses.dataclass(frozen=True)
class AttentionPolicy:
    method: str
    pattern: PatternBase
    backend: str = "auto"
    min_len: int = 4096
    heads: tuple[int, ...] | None = None  # sparse heads (None: all); the others stay dense

    def applies(self, q_len: int, k_len: int) -> bool:
        if k_len < self.min_len:
            return False
        return self.pattern.phase in ("both", "decode" if q_len == 1 else "prefill")

    def run_backend(self, device: torch.device, head_dim: int) -> str:
        """``auto``: on CUDA our Triton kernel for head dims up to 128, else FlexAttention; on a CPU the masked
        dense path (chunked, any length).

        The Triton kernel measured 1.5-2.2x faster than FlexAttention on the same masks at 32k-128k tokens
        (head dim 128, H100: ``benchmarks/results/attention_speed.json``); larger heads were not measured.
        """
        if self.backend != "auto":
            return self.backend
        if device.type == "cuda":
            return "triton" if HAVE_TRITON and head_dim <= 128 else "flex"
        return "masked"


@on_input_device()
def _forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    policy: AttentionPolicy | None = getattr(module, "sparsa_attention", None)
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    # transformers leaves a causal mask out with fewer queries than keys only where SDPA's top-left alignment is
    # right: a first prefill into a longer static cache, whose slots past the prompt are empty. The patterns
    # align bottom-right, so they see the prompt's keys only.
    prompt_only = attention_mask is None and 1 < q_len < k_len and causal
    slots = (  # a decode step under a mask (a static cache, left padding) of a pattern that keeps whole ranges
        policy is not None and q_len == 1 and policy.heads is None and policy.pattern.decodes_in_graph
        and attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[-2] == 1
    )
    dense = (
        policy is None
        or not causal  # the patterns are causal: a bidirectional or cross attention stays dense
        or kwargs.get("position_bias") is not None  # a bias over the keys (T5-style) is not ours to drop
        or not policy.applies(q_len, q_len if prompt_only else k_len)
        or (attention_mask is not None and not slots)
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
        or (dropout > 0 and module.training)
    )
    if policy is not None and 1 < q_len < k_len and policy.pattern.decodes_in_graph:  # a prefill into a longer cache
        _prefill_written(module, policy.pattern, key, q_len, attention_mask, prompt_only)
    if dense:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if prompt_only:
        key, value, k_len = key[:, :, :q_len], value[:, :, :q_len], q_len
    if slots:
        return _decode_slots(module, policy.pattern, query, key, value, attention_mask, dropout, scaling, kwargs)
    ranges = policy.pattern.decode_key_ranges(k_len) if q_len == 1 and policy.heads is None else None
    if ranges is not None:  # one query of a static pattern: attend the slices of the cache it keeps
        bs = policy.pattern.block_size
        kept_blocks = sum(-(-stop // bs) - start // bs for start, stop in ranges)
        module.sparsa_last_density = kept_blocks / causal_block_count(1, k_len, bs)
        if len(ranges) > 1:
            key = torch.cat([key[:, :, a:b] for a, b in ranges], dim=2)
            value = torch.cat([value[:, :, a:b] for a, b in ranges], dim=2)
        else:
            (a, b), = ranges
            key, value = key[:, :, a:b], value[:, :, a:b]
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    expand = heads != kv_heads and policy.pattern.reads_keys
    expanded = key.repeat_interleave(heads // kv_heads, dim=1) if expand else key
    mask = policy.pattern.mask(query, expanded)
    del expanded
    if policy.heads is not None:
        dense_heads = [h for h in range(heads) if h not in policy.heads]
        mask = dataclasses.replace(mask, blocks=mask.blocks.clone())  # a pattern may hand out a shared mask
        mask.blocks[:, dense_heads] = causal_blocks(q_len, k_len, mask.block_size, query.device)
    module.sparsa_last_density = mask.density_tensor()  # a GPU scalar: reading it here would stop the GPU every layer
    out = attend(query, key, value, mask, scale=scaling, backend=policy.run_backend(query.device, query.shape[-1]))
    return out.transpose(1, 2).contiguous(), None


def _decode_slots(module, pattern: PatternBase, query, key, value, attention_mask, dropout, scaling, kwargs):
    """One query under a boolean mask: the cache slots the pattern keeps, found on the device (no host sync, so
    a CUDA graph can capture the step), read in place by the slot kernel on a GPU, gathered for SDPA elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, k_len = key.shape[0], key.shape[-2]
    valid, first, last = _once(("rows", batch, k_len), attention_mask,
                               lambda: _rows(_visible(attention_mask, batch, k_len)))
    found = pattern.decode_query_slots(query, key, first, last, valid, _state(module))
    if found is None:  # the same slots for every layer and head: found once per pass
        found = _once(("slots", pattern, batch, k_len), attention_mask, lambda: _static_slots(pattern, valid, first, last))
    index, keep, module.sparsa_last_density = found
    if half_on_gpu(query, key, value) and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1 \
            and key.shape[-1] == value.shape[-1]:
        return slot_attention(query, key, value, index, keep, scaling), None  # reads the slots in place
    if index.dim() == 3:  # a list per query head: gather each key-value head's group of lists at once
        b, h, n = index.shape
        grouped = index.reshape(b, key.shape[1], -1)
        key, value = (_gather_slots(t, grouped).reshape(b, h, n, -1) for t in (key, value))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, keep[:, :, None, :], scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    shared = index[:, None, :].expand(-1, key.shape[1], -1)
    key, value = _gather_slots(key, shared), _gather_slots(value, shared)
    return sdpa_attention_forward(module, query, key, value, keep[:, None, None, :], dropout=dropout, scaling=scaling, **kwargs)


def _gather_slots(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, h, index[b, h, j], :]`` for a cache ``t`` ``[B, Hkv, L, D]`` and slots ``index`` ``[B, Hkv, m]``."""
    return t.gather(2, index[..., None].expand(-1, -1, -1, t.shape[-1]))


def _prefill_written(module, pattern: PatternBase, key, q_len: int, attention_mask, prompt_only: bool) -> None:
    """A prefill into a cache that later decode steps read through a mask: let the pattern note what it wrote."""
    batch, k_len = key.shape[0], key.shape[-2]
    if prompt_only:  # a first prefill into a longer static cache: its first q_len slots
        valid = (torch.arange(k_len, device=key.device) < q_len).expand(batch, -1)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        valid = _visible(attention_mask, batch, k_len)  # the last query sees every filled slot
    else:
        return  # a dynamic cache: its decode steps see no mask and read the keys themselves
    valid, first, _ = _rows(valid)
    pattern.prefill_written(key, first, valid, _state(module))


def _state(module) -> dict:
    """What the module's pattern keeps from call to call (quest's page bounds); let go by apply and remove."""
    return module.__dict__.setdefault("sparsa_state", {})


_PASS: dict = {}  # what the forward pass under way found once for all its layers: {what: (mask, found)}


def _forget_slots(*_) -> None:
    """A forward pass reaches its first attention layer or leaves its last: the slots found in it are not to be
    reused (a caller may update one mask tensor in place from step to step)."""
    _PASS.clear()


def _once(what: tuple, attention_mask: torch.Tensor, make):
    """``make()``, once per forward pass: every layer gets the same mask object, and each layer paying a dozen
    small kernels for what the mask implies would cost more than attention saves. Hooks on the first and last
    attention modules empty the cache at both ends of a pass; replaying a CUDA graph reruns the kernels of the
    first layer's call into the same tensors."""
    hit = _PASS.get(what)
    if hit is not None and hit[0] is attention_mask:
        return hit[1]
    found = make()
    _PASS[what] = (attention_mask, found)
    return found


def _visible(attention_mask: torch.Tensor, batch: int, k_len: int) -> torch.Tensor:
    """``[B, Lk]``: the slots the mask's last query may see."""
    return attention_mask[:, 0, -1, :k_len].expand(batch, -1)


def _rows(valid: torch.Tensor):
    """``(valid, first, last)`` for the visible slots ``valid`` ``[B, Lk]``: each row's first of them and its
    last (a decode step's own slot)."""
    k_len = valid.shape[-1]
    position = torch.arange(k_len, device=valid.device)
    first = torch.where(valid, position, k_len).amin(-1)
    last = torch.where(valid, position, -1).amax(-1)
    return valid, first, last


def _static_slots(pattern: PatternBase, valid, first, last):
    """``(index, keep, density)`` of a static pattern's decode step: ``[B, n]`` slots shared by every head."""
    k_len = valid.shape[-1]
    index, keep = pattern.decode_key_slots(first, last, k_len)
    keep = keep & valid.gather(1, index)
    bs = pattern.block_size
    kept_blocks = keep.view(len(first), -1, bs).any(-1).sum(-1)
    density = (kept_blocks / ((last - first) // bs + 1)).float().mean()
    return index, keep, density


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if name.endswith("self_attn") and isinstance(getattr(module, "layer_idx", None), int):
            found.append((module.layer_idx, module))
    return sorted(found, key=lambda item: item[0])


def apply(
    model: nn.Module,
    method: str,
    *,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    min_len: int = 4096,
    backend: str = "auto",
    **settings,
) -> nn.Module:
    """Make ``model``'s attention sparse with pattern ``method`` (settings as keywords); returns the model.

    ``layers``: decoder layer indices to make sparse (default all; negative
    counts from the end). ``heads``: query-head indices made sparse in those
    layers (default all). ``min_len``: below this many keys attention stays
    dense (a decode step under a static cache counts the cache's capacity,
    the only length the host knows there). ``backend``: ``auto`` (on CUDA our
    Triton kernel for head dims up to 128, FlexAttention otherwise; on a CPU
    the masked dense path, in chunks of query rows), ``flex``, ``triton``,
    ``masked`` or ``reference``. A CUDA graph captured before ``apply`` or
    ``remove`` must be captured again: what a layer kept between decode
    steps (quest's page bounds) is let go.
    """
    name = type(model).__name__
    require(hasattr(model, "set_attn_implementation") and hasattr(model, "config"),
            f"{name} is not a Hugging Face PreTrainedModel; sparse attention plugs into transformers models")
    if not getattr(model, "_supports_attention_backend", False):
        raise InputError(f"{name} does not route attention through transformers' attention interface, so sparse "
                         "attention cannot plug in; supported: models whose attention uses ALL_ATTENTION_FUNCTIONS "
                         "(Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, SmolLM ...)")
    if backend != "auto":
        BACKENDS.get(backend)  # one-line error for an unknown backend
    pattern = make_pattern(method, **settings)
    require(min_len >= 1, f"min_len must be >= 1, got {min_len}")
    modules = _attention_modules(model)
    require(bool(modules), f"{name} has no attention modules with a layer index (self_attn); cannot apply sparse attention")
    require(not any(hasattr(module, "sinks") for _, module in modules),
            f"{name} has learned attention sinks (gpt-oss style), which sparsa's attention function would drop; "
            "sparse attention does not support them")
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    q_heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    require(q_heads is not None and q_heads % kv_heads == 0,
            f"{name}: {q_heads} query heads are not a multiple of {kv_heads} key-value heads; supported: MHA and grouped-query attention")
    count = len(modules)
    if layers is not None:
        bad = [i for i in layers if not -count <= i < count]
        require(not bad, f"layers {bad} do not exist: {name} has {count} decoder layers (0..{count - 1}, or -1..-{count} from the end)")
    chosen = None if layers is None else {i % count for i in layers}
    if heads is not None:
        bad = [h for h in heads if not 0 <= h < q_heads]
        require(not bad, f"heads {bad} do not exist: {name} has {q_heads} query heads (0..{q_heads - 1})")
    policy = AttentionPolicy(method, pattern, backend, min_len, None if heads is None else tuple(sorted(set(heads))))
    _register()
    for index, module in modules:
        module.sparsa_attention = policy if chosen is None or index in chosen else None
        module.__dict__.pop("sparsa_state", None)  # what an earlier pattern kept between decode steps
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.sparsa_previous_attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if not getattr(model, "sparsa_slot_hooks", None):  # on the first and last attention: any wrapper's pass has both
        model.sparsa_slot_hooks = (modules[0][1].register_forward_pre_hook(_forget_slots),
                                   modules[-1][1].register_forward_hook(_forget_slots))
    model.set_attn_implementation(NAME)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: dense attention with the previous implementation."""
    for _, module in _attention_modules(model):
        module.sparsa_attention = None
        module.__dict__.pop("sparsa_state", None)
    for hook in getattr(model, "sparsa_slot_hooks", None) or ():
        hook.remove()
    model.sparsa_slot_hooks = None
    _forget_slots()
    previous = getattr(model, "sparsa_previous_attention", None)
    if previous is not None:
        model.set_attn_implementation(previous)
    return model
