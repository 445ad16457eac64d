"""Structured pruning shrinks the model exactly, keeps it runnable and loadable, and picks by importance."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import tiny_llama_config
from sparsa.errors import InputError, ModelError
from sparsa.models import count_parameters
from sparsa.prune.structured import StructuredConfig, channel_scores, prune_structured, removed_count

IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 0, 6, 1]])
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 128, 4, 2, 16, 2, 128


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(VOCAB, **overrides)).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def expected_removed(channels: int, groups: int, attn_bias: bool) -> int:
    """Parameters one layer loses: 3 linears per channel; per group its query heads in q and o, its k and v."""
    ffn = 3 * HIDDEN * channels
    per_group = HEADS // KV_HEADS
    q_and_o = 2 * per_group * HEAD_DIM * HIDDEN + (per_group * HEAD_DIM if attn_bias else 0)
    k_and_v = 2 * HEAD_DIM * HIDDEN + (2 * HEAD_DIM if attn_bias else 0)
    return ffn + groups * (q_and_o + k_and_v)


# -- shrinking --------------------------------------------------------------------------

@pytest.mark.parametrize("make,attn_bias", [(tiny_llama, False), (tiny_qwen2, True)], ids=["llama", "qwen2"])
def test_shrinks_by_the_exact_parameter_count_and_runs(make, attn_bias):
    model = make()
    before = count_parameters(model)
    report = prune_structured(model, StructuredConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    removed = LAYERS * expected_removed(INTER // 2, 1, attn_bias)
    assert report["parameters_before"] == before
    assert report["parameters_after"] == count_parameters(model) == before - removed
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 1, 16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, HIDDEN) and attn.k_proj.weight.shape == (16, HIDDEN)
    assert attn.o_proj.weight.shape == (HIDDEN, 32) and attn.num_key_value_groups == 2
    if attn_bias:
        assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == (16,)
    out = logits(model)
    assert out.shape == (2, 6, VOCAB) and torch.isfinite(out).all()
    assert [len(layer["kv_groups_kept"]) for layer in report["layers"]] == [1, 1]
    assert [layer["ffn_channels_kept"] for layer in report["layers"]] == [64, 64]
    json.dumps(report)  # the pipeline writes it to sparsa.json


def test_nothing_removed_means_identical_outputs():
    model = tiny_llama()
    reference = logits(model)
    report = prune_structured(model, StructuredConfig(ffn_sparsity=0.0, head_sparsity=0.0))
    assert torch.equal(logits(model), reference)
    assert report["parameters_after"] == report["parameters_before"]


def test_removing_dead_channels_and_groups_changes_nothing():
    """Zero what half the channels and one KV group write: pruning exactly those leaves the function intact.

    This checks that q, k, v and o are sliced consistently (query heads with
    their KV head, o_proj columns with their query heads) and gate/up rows
    with down columns; weight-norm scores find the dead ones.
    """
    model = tiny_llama()
    dead_channels = torch.arange(1, INTER, 2)
    dead_group = [1, 0]  # a different group dies in each layer
    with torch.no_grad():
        for layer, group in zip(model.model.layers, dead_group):
            layer.mlp.down_proj.weight[:, dead_channels] = 0
            width = (HEADS // KV_HEADS) * HEAD_DIM
            layer.self_attn.o_proj.weight[:, group * width:(group + 1) * width] = 0
    reference = logits(model)
    report = prune_structured(model, StructuredConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    assert [layer["kv_groups_kept"] for layer in report["layers"]] == [[0], [1]]
    torch.testing.assert_close(logits(model), reference, rtol=1e-5, atol=1e-5)


def test_generation_with_a_kv_cache_runs_after_head_pruning():
    model = tiny_llama()
    prune_structured(model, StructuredConfig(ffn_sparsity=0.25, head_sparsity=0.5))
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)


def test_keeps_dtype_and_pruning_twice_works():
    model = tiny_llama().to(torch.bfloat16)
    prune_structured(model, StructuredConfig(ffn_sparsity=0.5))
    prune_structured(model, StructuredConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.config.intermediate_size == 32 and model.config.num_key_value_heads == 1
    assert torch.isfinite(logits(model).float()).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_saved_model_loads_in_transformers_with_same_logits(make, tmp_path):
    model = make()
    prune_structured(model, StructuredConfig(ffn_sparsity=0.25, head_sparsity=0.5))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    assert again.config.head_dim == HEAD_DIM and again.config.num_attention_heads == 2
    assert torch.equal(logits(model), logits(again))


# -- importance ------------------------------------------------------------------------

def uniform_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Equal norms for every layer's down_proj and o_proj inputs: scores then depend on the weights alone."""
    norms = {}
    for i, layer in enumerate(model.model.layers):
        norms[f"model.layers.{i}.mlp.down_proj"] = torch.ones(layer.mlp.down_proj.in_features)
        norms[f"model.layers.{i}.self_attn.o_proj"] = torch.ones(layer.self_attn.o_proj.in_features)
    return norms


def test_activation_norms_choose_the_ffn_channels_kept():
    model = tiny_llama()
    big = torch.tensor([3, 17, 40, 99, 127])
    norms = uniform_norms(model)
    norms["model.layers.0.mlp.down_proj"] = torch.full((INTER,), 1e-3).index_fill(0, big, 1e3)
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    report = prune_structured(model, StructuredConfig(ffn_sparsity=0.95), norms)
    assert report["importance"] == "activation norms"
    kept = model.model.layers[0].mlp.down_proj.weight
    assert kept.shape[1] == INTER - round(0.95 * INTER) == 6
    kept_columns = [c for c in range(INTER) if any(torch.equal(kept[:, j], down[:, c]) for j in range(kept.shape[1]))]
    assert set(big.tolist()) <= set(kept_columns)


def test_activation_norms_choose_the_kv_groups_kept():
    model = tiny_llama()
    norms = uniform_norms(model)
    o_norms = torch.full((HEADS * HEAD_DIM,), 1e-3)
    o_norms[2 * HEAD_DIM:] = 1e3  # query heads 2 and 3, so KV group 1, carry the signal
    norms["model.layers.1.self_attn.o_proj"] = o_norms
    k_rows = model.model.layers[1].self_attn.k_proj.weight.detach()[HEAD_DIM:].clone()
    report = prune_structured(model, StructuredConfig(ffn_sparsity=0.0, head_sparsity=0.5), norms)
    assert report["layers"][1]["kv_groups_kept"] == [1]
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, k_rows)


def test_channel_scores_shapes_and_weight_fallback():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[7] = 0
    scores = channel_scores(model)
    assert len(scores) == LAYERS
    assert scores[0].ffn.shape == (INTER,) and scores[0].kv_groups.shape == (KV_HEADS,)
    assert scores[0].ffn[7] == 0
    assert (torch.cat([scores[0].ffn[:7], scores[0].ffn[8:]]) > 0).all()
    with_data = channel_scores(model, uniform_norms(model))
    down = model.model.layers[1].mlp.down_proj.weight.abs().sum(dim=0)
    torch.testing.assert_close(with_data[1].ffn, down)


def test_rounding_is_half_up():
    assert removed_count(0.25, 2) == 1 and removed_count(0.5, 1) == 1 and removed_count(0.3, 10) == 3


# -- errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"ffn_sparsity": 1.0}, {"ffn_sparsity": -0.1}, {"head_sparsity": 1.5},
                                    {"ffn_sparsity": "0.5"}])
def test_fractions_outside_unit_interval(kwargs):
    with pytest.raises(InputError, match=r"must be a number in \[0, 1\)"):
        StructuredConfig(**kwargs)


def test_removing_everything_is_refused_and_leaves_the_model_alone():
    model = tiny_llama()
    reference = logits(model)
    with pytest.raises(InputError, match="would remove all 2 KV head groups of LlamaForCausalLM"):
        prune_structured(model, StructuredConfig(head_sparsity=0.9))
    with pytest.raises(InputError, match="would remove all 128 FFN channels"):
        prune_structured(model, StructuredConfig(ffn_sparsity=0.999))
    assert torch.equal(logits(model), reference) and model.config.intermediate_size == INTER


def test_bad_activation_norms():
    model = tiny_llama()
    norms = uniform_norms(model)
    del norms["model.layers.1.self_attn.o_proj"]
    with pytest.raises(InputError, match="no entry for 'model.layers.1.self_attn.o_proj'"):
        prune_structured(model, StructuredConfig(), norms)
    norms = uniform_norms(model)
    norms["model.layers.0.mlp.down_proj"] = torch.ones(5)
    with pytest.raises(InputError, match="1-D tensor of 128 values, got \\(5,\\)"):
        prune_structured(model, StructuredConfig(), norms)
    norms["model.layers.0.mlp.down_proj"] = torch.full((INTER,), float("nan"))
    with pytest.raises(InputError, match="finite and non-negative"):
        prune_structured(model, StructuredConfig(), norms)
    assert model.config.intermediate_size == INTER


def test_unsupported_architectures():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ModelError, match="does not support GPT2LMHeadModel: no decoder layers.*supports Llama-family"):
        prune_structured(gpt2, StructuredConfig())
    fused = tiny_llama()
    fused.model.layers[1].mlp.gate_proj = None
    with pytest.raises(ModelError, match="LlamaForCausalLM: layer 1 mlp.gate_proj is missing"):
        channel_scores(fused)


def test_head_pruning_refused_where_a_norm_spans_all_heads():
    model = tiny_llama()
    for layer in model.model.layers:  # as OLMo-2 does: one RMSNorm over all query heads
        layer.self_attn.q_norm = nn.RMSNorm(HEADS * HEAD_DIM)
    with pytest.raises(ModelError, match="self_attn.q_norm has weights across all heads"):
        prune_structured(model, StructuredConfig(head_sparsity=0.5))
    prune_structured(model, StructuredConfig(ffn_sparsity=0.5))  # FFN pruning is still fine
    assert model.config.intermediate_size == 64
