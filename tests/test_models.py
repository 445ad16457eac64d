"""Loading (tiny HF directory, GGUF default), describing, and the save/load round trip."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import sparsa
from sparsa.errors import InputError, ModelError
from sparsa.models import check_output, count_parameters


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


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_check_output_fails_early_when_out_cannot_be_created(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="file.txt is not a directory; choose another --out"):
        check_output(tmp_path / "file.txt" / "x" / "y", force=False)
    with pytest.raises(InputError, match="cannot write /proc/x: /proc is not writable"):
        check_output("/proc/x", force=False)
    assert check_output(tmp_path / "new" / "out", force=False) == tmp_path / "new" / "out"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # the write probe leaves nothing behind


def test_corrupt_record_is_a_model_error(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    (model / "sparsa.json").write_text("{bad")
    with pytest.raises(ModelError, match=r"sparsa.json is not valid JSON \(.*\); delete it or restore it"):
        sparsa.load_model(str(model))


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_unreadable_model_file_is_an_input_error():
    with pytest.raises(InputError, match=r"cannot read /proc/self/mem \(.*\); pass a readable model"):
        sparsa.load_model("/proc/self/mem")


def test_directory_without_tokenizer_says_so(tiny_dir, tmp_path):
    for file in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / file, tmp_path)
    with pytest.raises(ModelError, match="has no tokenizer files .*; save the tokenizer into it with tokenizer.save_pretrained"):
        sparsa.load_model(str(tmp_path))


def test_directory_with_gguf_suffix_is_a_directory(tiny_dir, tmp_path):
    (tmp_path / "empty.gguf").mkdir()
    with pytest.raises(ModelError, match="empty.gguf is not a model directory"):
        sparsa.load_model(str(tmp_path / "empty.gguf"))
    model = shutil.copytree(tiny_dir, tmp_path / "tiny.gguf")
    assert sparsa.load_model(str(model)).info.layers == 2


def test_inspect_reports_nonfinite_weights(tiny_lm):
    assert sparsa.inspect(tiny_lm).warning is None
    with torch.no_grad():
        tiny_lm.model.model.layers[0].mlp.up_proj.weight[0, :2] = torch.tensor([float("nan"), float("inf")])
    report = sparsa.inspect(tiny_lm)
    assert report.nonfinite_parameters == 2
    assert [l.nonfinite for l in report.layers if l.nonfinite] == [2]
    assert report.warning == "WARNING: 1 layer has NaN or Inf weights: model.layers.0.mlp.up_proj"
    assert report.to_dict()["nonfinite_parameters"] == 2
