"""Architecture adapters: where a model family keeps its decoder layers and linears.

Everything else in sparsa is architecture-free: it asks an adapter for the
list of decoder layers, the modules that run before and after them, and the
linear layers inside each.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn

from ..errors import ModelError

# model_type -> attribute path of the decoder layer list. Families whose layers
# sit at model.model.layers and take (hidden_states, ...) like Llama.
DECODER_LAYERS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "smollm3": "model.layers",
}


@dataclass(frozen=True)
class Adapter:
    model_type: str
    layers_path: str

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"


def supported() -> list[str]:
    return sorted(DECODER_LAYERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or a ModelError listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DECODER_LAYERS:
        raise ModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"sparsa supports: {', '.join(supported())}"
        )
    return Adapter(model_type, DECODER_LAYERS[model_type])


def linear_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every nn.Linear below ``module``, by qualified name."""
    return {
        f"{prefix}.{name}" if prefix else name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` (transformers 5.25 renamed it and drops the
    old name in 5.40) or ``past_key_values`` (earlier versions)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` before transformers 5.25)."""
    cache = getattr(out, "cache", None)
    return getattr(out, "past_key_values", None) if cache is None else cache


def _get(obj: object, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
