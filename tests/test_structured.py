"""Structured pruning shrinks the model, keeps it runnable and loadable, and picks by importance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_llama_config
from sparsa.errors import InputError
from sparsa.models import count_parameters
from sparsa.prune.structured import StructuredConfig, prune_structured

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(128)).eval()


def test_shrinks_by_the_exact_parameter_count_and_runs():
    model = tiny_llama()
    before = count_parameters(model)
    report = prune_structured(model, StructuredConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    hidden, inter, head_dim, layers = 64, 128, 16, 2
    removed_ffn = 3 * hidden * (inter // 2)
    removed_attn = hidden * head_dim * (2 + 1 + 1 + 2)  # one KV group: 2 query heads (q, o) + k + v
    assert report["parameters_after"] == count_parameters(model) == before - layers * (removed_ffn + removed_attn)
    assert model.config.intermediate_size == 64 and model.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 16
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.shape == (1, 6, 128) and torch.isfinite(logits).all()


def test_nothing_removed_means_identical_outputs():
    model = tiny_llama()
    with torch.no_grad():
        reference = model(IDS).logits
    prune_structured(model, StructuredConfig(ffn_sparsity=0.0, head_sparsity=0.0))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)


def test_saved_model_loads_in_transformers_with_same_logits(tmp_path):
    model = tiny_llama()
    prune_structured(model, StructuredConfig(ffn_sparsity=0.25, head_sparsity=0.5))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)


def test_qwen2_with_biases():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    prune_structured(model, StructuredConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_activation_norms_choose_the_channels_kept():
    model = tiny_llama()
    big = torch.tensor([3, 17, 40, 99, 127])
    norms = torch.full((128,), 1e-3)
    norms[big] = 1e3
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    prune_structured(model, StructuredConfig(ffn_sparsity=0.95), {"model.layers.0.mlp.down_proj": norms})
    kept = model.model.layers[0].mlp.down_proj.weight
    assert kept.shape[1] == 128 - round(0.95 * 128)
    for c in big:  # every planted channel survived: its column is still there
        assert any(torch.equal(kept[:, j], down[:, c]) for j in range(kept.shape[1]))


def test_bad_input():
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        StructuredConfig(ffn_sparsity=1.0)
    with pytest.raises(InputError, match="remove all"):
        prune_structured(tiny_llama(), StructuredConfig(head_sparsity=0.9))
