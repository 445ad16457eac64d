"""Loading, describing and saving causal LMs, and where each family keeps its layers."""

from .adapters import Adapter, adapter_for, linear_layers, supported
from .loading import LoadedModel, ModelInfo, count_parameters, default_model_path, describe, load_model
from .saving import atomic_save_tensors, atomic_write_text, check_file_output, check_output, save_model

__all__ = [
    "Adapter",
    "LoadedModel",
    "ModelInfo",
    "adapter_for",
    "atomic_save_tensors",
    "atomic_write_text",
    "check_file_output",
    "check_output",
    "count_parameters",
    "default_model_path",
    "describe",
    "linear_layers",
    "load_model",
    "save_model",
    "supported",
]
