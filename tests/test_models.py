"""Loading (tiny HF directory, GGUF default), describing, and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

import sparsa
from sparsa.errors import InputError
from sparsa.models import count_parameters


def test_default_model_is_smollm2_from_gguf(default_lm):
    info = default_lm.info
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    assert info.layers == 30
    # SmolLM2-135M: 134.5M parameters with tied embeddings counted once
    assert 134_000_000 < info.parameters < 135_000_000
    assert info.dtype == "float32" and info.device == "cpu"
    ids = default_lm.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = default_lm.model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(default_lm.tokenizer)


def test_tiny_directory_loads_with_dtype(tiny_dir):
    lm = sparsa.load_model(str(tiny_dir), dtype="bfloat16")
    assert lm.info.dtype == "bfloat16"
    assert lm.info.layers == 2
    assert lm.info.parameters == count_parameters(lm.model)


def test_save_load_round_trip(tiny_lm, tmp_path):
    with torch.no_grad():
        tiny_lm.model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0
    tiny_lm.record = {"pruning": {"method": "test", "pattern": "unstructured", "sparsity": 0.5}}
    out = sparsa.save(tiny_lm, tmp_path / "saved")
    record = json.loads((out / "sparsa.json").read_text())
    assert record["pruning"]["method"] == "test"
    assert {"sparsa", "torch", "transformers"} <= set(record["versions"])
    again = sparsa.load_model(str(out))
    for (name, a), (_, b) in zip(tiny_lm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.record["pruning"]["method"] == "test"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, again.model(ids).logits)


def test_save_never_overwrites_without_force(tiny_lm, tmp_path):
    out = tmp_path / "saved"
    sparsa.save(tiny_lm, out)
    marker = out / "keep.txt"
    marker.write_text("x")
    with pytest.raises(InputError, match="--force"):
        sparsa.save(tiny_lm, out)
    assert marker.exists()
    sparsa.save(tiny_lm, out, force=True)
    assert not marker.exists() and (out / "config.json").is_file()
    # nothing half-written is left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
