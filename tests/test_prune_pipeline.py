"""The layer-by-layer pipeline on tiny models: patterns hold, resume is bit-identical, errors come first."""

from __future__ import annotations

import json

import pytest
import torch

import sparsa
from sparsa.cli import main
from sparsa.errors import DataError, InputError, ModelError
from sparsa.inspection import sparsity_report
from sparsa.prune.config import PruneConfig

FAST = dict(n_samples=4, seq_len=32)


def decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_wanda_unstructured_exact_per_row(tiny_lm):
    head = tiny_lm.model.lm_head.weight.clone()
    record = sparsa.prune(tiny_lm, method="wanda", sparsity=0.5, **FAST, progress=False)
    for name, m in decoder_linears(tiny_lm.model).items():
        zeros_per_row = (m.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == m.in_features // 2), name
    assert torch.equal(tiny_lm.model.lm_head.weight, head)
    assert record["pruned_linears"] == 14
    assert tiny_lm.record["pruning"]["calibration"]["tokens"] == 4 * 32


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_every_method_meets_2_4(tiny_lm, method):
    sparsa.prune(tiny_lm, method=method, pattern="2:4", **FAST, progress=False)
    report = sparsity_report(tiny_lm.model)
    for layer in report.layers:
        if ".layers." in layer.name:
            assert layer.pattern == "2:4" and layer.sparsity == 0.5, layer


def test_skip_leaves_layers_dense(tiny_lm):
    sparsa.prune(tiny_lm, method="magnitude", sparsity=0.5, skip=("down_proj", "model.layers.0.*"), **FAST, progress=False)
    for name, m in decoder_linears(tiny_lm.model).items():
        dense = name.endswith("down_proj") or name.startswith("model.layers.0.")
        assert bool((m.weight == 0).any()) != dense, name


def test_owl_budgets_vary_and_average_to_target(tiny_lm):
    record = sparsa.prune(tiny_lm, method="wanda", sparsity=0.6, owl=True, owl_lambda=0.1, **FAST, progress=False)
    budgets = record["layer_budgets"]
    assert len(budgets) == 2 and budgets[0] != budgets[1]
    linears = decoder_linears(tiny_lm.model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert abs(zeros - 0.6) < 0.01  # per-row rounding at 64 features


def test_resume_is_bit_identical(tiny_dir, tmp_path, monkeypatch):
    config = PruneConfig(method="sparsegpt", sparsity=0.5, **FAST)
    whole = sparsa.load_model(str(tiny_dir))
    sparsa.prune(whole, config, checkpoint_dir=tmp_path / "a", progress=False)

    from sparsa.prune import pipeline

    interrupted = sparsa.load_model(str(tiny_dir))
    real_run = pipeline.run_layer
    calls = {"n": 0}

    def dying_run(layer, hidden, kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # layer 0 finished; layer 1 dies computing its outputs
            raise KeyboardInterrupt
        return real_run(layer, hidden, kwargs)

    monkeypatch.setattr(pipeline, "run_layer", dying_run)
    with pytest.raises(KeyboardInterrupt):
        sparsa.prune(interrupted, config, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(pipeline, "run_layer", real_run)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["next_layer"] == 1

    resumed = sparsa.load_model(str(tiny_dir))
    record = sparsa.prune(resumed, config, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert record["resumed_from_layer"] == 1
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings(tiny_lm, tmp_path):
    sparsa.prune(tiny_lm, method="magnitude", sparsity=0.5, **FAST, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="other settings"):
        sparsa.prune(tiny_lm, method="magnitude", sparsity=0.6, **FAST, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_structured_shrinks_and_runs(tiny_lm):
    before = tiny_lm.info.parameters
    record = sparsa.prune(tiny_lm, method="wanda", pattern="structured", sparsity=0.5, head_sparsity=0.5, **FAST, progress=False)
    assert record["parameters_after"] < before
    assert tiny_lm.model.config.intermediate_size == 64
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_errors_come_before_work(tiny_lm):
    with pytest.raises(InputError, match="not divisible by M=7"):
        sparsa.prune(tiny_lm, pattern="3:7", **FAST, progress=False)
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(DataError, match="need"):
        sparsa.prune(tiny_lm, n_samples=100000, seq_len=2048, progress=False)
    with torch.no_grad():
        tiny_lm.model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="model.layers.1.self_attn.q_proj has NaN"):
        sparsa.prune(tiny_lm, **FAST, progress=False)


def test_cli_prune_saves_and_reloads(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main([
        "prune", str(tiny_dir), "--method", "sparsegpt", "--pattern", "2:4", "--samples", "4", "--seq-len", "32",
        "--eval-seq-len", "32", "--eval-max-tokens", "128", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "perplexity" in captured.out and "2:4" in captured.out
    record = json.loads((out / "sparsa.json").read_text())
    assert record["pruning"]["method"] == "sparsegpt" and record["pruning"]["pattern"] == "2:4"
    assert record["pruning"]["evaluation"]["after"]["tokens"] == 4 * 31
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sparsity_report(reloaded).pattern == "2:4"
    code = main(["prune", str(tiny_dir), "--out", str(out), "--no-eval"])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_checkpoint_dir_that_cannot_be_made_is_an_input_error(tmp_path):
    from sparsa.prune.pipeline import checkpoint_directory

    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    for bad in (afile, afile / "ck"):
        with pytest.raises(InputError, match=rf"{bad}.*choose another --checkpoint-dir / checkpoint_dir="):
            checkpoint_directory(bad)
    assert checkpoint_directory(tmp_path / "a" / "b").is_dir()


def test_resume_from_a_corrupt_checkpoint_names_the_file(tiny_lm, tmp_path):
    sparsa.prune(tiny_lm, method="magnitude", **FAST, checkpoint_dir=tmp_path, progress=False)
    state = tmp_path / "state.json"
    good = state.read_text()
    state.write_text("{x")
    with pytest.raises(InputError, match=r"state\.json is corrupt .*delete the checkpoint directory"):
        sparsa.prune(tiny_lm, method="magnitude", **FAST, checkpoint_dir=tmp_path, resume=True, progress=False)
    state.write_text(good)
    layer = tmp_path / "layer_0000.safetensors"
    layer.write_bytes(layer.read_bytes()[:10])
    with pytest.raises(InputError, match=r"layer_0000\.safetensors is corrupt"):
        sparsa.prune(tiny_lm, method="magnitude", **FAST, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_sample_and_length_errors_name_the_option():
    with pytest.raises(InputError, match="--seq-len / seq_len must be at least 8 tokens, got 4; pass 8 or more"):
        PruneConfig(seq_len=4)
    with pytest.raises(InputError, match="--samples / n_samples must be at least 1"):
        PruneConfig(n_samples=0)


def test_prune_checks_its_compute_device(tiny_lm):
    import sparsa
    from sparsa.errors import InputError

    with pytest.raises(InputError, match="unknown device"):
        sparsa.prune(tiny_lm, device="tpu", n_samples=2, seq_len=32)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            sparsa.prune(tiny_lm, device="cuda", n_samples=2, seq_len=32)
