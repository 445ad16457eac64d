"""The CLI: every bad input is one line naming the problem and the fix, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sparsa.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("sparsa:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("sparsa: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_nonexistent_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "does not exist", "pass a model directory")


def test_file_that_is_not_a_model(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "is not a model")


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert_one_line_error(code, err, "no config.json")


def test_unsupported_architecture(capsys, tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'", "llama")


def test_not_a_causal_lm(capsys, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=64, vocab_size=100)).save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert_one_line_error(code, err, "not a causal language model")


def test_corrupt_gguf(capsys, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(2000))
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "cannot read GGUF file")
    path.write_bytes(b"JUNK" + os.urandom(100))
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "not a GGUF file")


def test_corrupt_safetensors(capsys, tmp_path, tiny_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "inspect", str(broken))
    assert_one_line_error(code, err, "corrupt")


def test_empty_and_short_text(capsys, tmp_path, tiny_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("just a few words")
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--text", str(tmp_path / "empty.txt"))
    assert_one_line_error(code, err, "no text")
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--text", str(tmp_path / "short.txt"))
    assert_one_line_error(code, err, "too short")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["prune", "--sparsity", "1.5"], "outside [0, 1)"),
        (["prune", "--sparsity", "-0.1"], "outside [0, 1)"),
        (["prune", "--sparsity", "half"], "not a number"),
        (["prune", "--samples", "0"], "at least 1"),
        (["prune", "--method", "bogus"], "invalid choice"),
        (["eval", "--seq-len", "x"], "not a whole number"),
        (["inspect", "--dtype", "int3"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flag_values(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle, "--help")


def test_inspect_reports_zeros_and_pattern(capsys, tiny_lm, tmp_path):
    import sparsa

    with torch.no_grad():
        w = tiny_lm.model.model.layers[1].mlp.up_proj.weight
        groups = w.view(w.shape[0], -1, 4)
        drop = torch.rand(groups.shape).argsort(dim=-1)[..., :2]  # 2 of every 4, different per group
        groups.scatter_(-1, drop, 0.0)
    sparsa.save(tiny_lm, tmp_path / "m")
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "m"), "--json")
    assert code == 0
    report = json.loads(out)
    layer = next(l for l in report["layers"] if l["name"] == "model.layers.1.mlp.up_proj")
    assert layer["pattern"] == "2:4" and layer["sparsity"] == 0.5
    assert report["zero_parameters"] == w.numel() // 2


def test_console_script_has_teaching_help():
    out = subprocess.run([sys.executable, "-m", "sparsa.cli", "prune", "--help"], capture_output=True, text=True, check=True).stdout
    assert "examples:" in out and "--pattern" in out and "2:4" in out


def test_cli_eval_runs_lm_eval_tasks(capsys, tiny_dir, tmp_path):
    from pathlib import Path

    include = Path(__file__).parent / "data" / "lm_eval_task"
    out = tmp_path / "results.json"
    code, stdout, err = run_cli(capsys, "eval", str(tiny_dir), "--tasks", "sparsa_tiny_mc", "--include-path", str(include), "--json", str(out))
    assert code == 0, err
    assert "sparsa_tiny_mc" in stdout and "acc" in stdout
    results = json.loads(out.read_text())["results"]["sparsa_tiny_mc"]
    assert 0 <= results["acc"] <= 1


def test_cli_eval_perplexity_json(capsys, tiny_dir, tmp_path):
    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli(capsys, "eval", str(tiny_dir), "--seq-len", "64", "--max-tokens", "256", "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())["results"]["perplexity"]
    assert result["tokens"] == 4 * 63 and result["perplexity"] > 1


def test_eval_longctx_with_sparse_attention(capsys):
    code, out, err = run_cli(capsys, "eval", "--longctx", "needle", "--lengths", "1024", "--examples", "1",
                             "--attention", "antidiagonal", "--attention-set", "threshold=0.9", "--attention-min-len", "256")
    assert code == 0, err
    assert "needle" in out and "sparse attention: antidiagonal" in err


def test_attention_flags_fail_in_one_line(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--attention", "streaming", "--attention-set", "window")
    assert_one_line_error(code, err, "KEY=VALUE")
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--attention", "magic")
    assert_one_line_error(code, err, "unknown attention pattern")
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--longctx", "needle", "--lengths", "4096")
    assert_one_line_error(code, err, "exceed")


@pytest.mark.parametrize("argv, needles", [
    (["--longctx", ","], ["names no task", "--longctx needle"]),
    (["--longctx", "needle,bogus"], ["bogus", "choose one of"]),
    (["--tasks", ","], ["names no task"]),
    (["--activations", "bogus"], ["bogus", "choose one of"]),
    (["--attention", "streaming", "--attention-set", "sink_blocks=1.5"], ["sink_blocks", "whole number"]),
    # options that do nothing without the option that enables them
    (["--activation-sparsity", "0.4"], ["--activation-sparsity has no effect without --activations METHOD"]),
    (["--activation-allocation", "greedy"], ["--activation-allocation", "--activations"]),
    (["--lengths", "2048"], ["--lengths has no effect without --longctx"]),
    (["--limit", "5"], ["--limit", "--tasks"]),
    (["--attention-set", "vertical=1"], ["--attention-set", "--attention PATTERN"]),
    (["--attention-min-len", "64"], ["--attention-min-len", "--attention"]),
    (["--longctx", "needle", "--tasks", "hellaswag"], ["--longctx and --tasks", "one at a time"]),
])
def test_eval_options_are_checked_before_the_model_loads(capsys, argv, needles):
    code, _, err = run_cli(capsys, "eval", "/nonexistent/model/dir", *argv)  # the model error would come second
    assert_one_line_error(code, err, *needles)


def test_attention_layers_that_do_not_exist(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--attention", "streaming", "--attention-layers", "2")
    assert_one_line_error(code, err, "[2] do not exist", "2 decoder layers")


def test_an_nm_pattern_implies_its_sparsity_and_an_explicit_one_must_agree(capsys):
    from sparsa.prune.config import PruneConfig

    assert PruneConfig(pattern="1:4").sparsity == 0.75 and PruneConfig().sparsity == 0.5
    code, _, err = run_cli(capsys, "prune", "--pattern", "1:4", "--sparsity", "0.5")  # fails before the model loads
    assert_one_line_error(code, err, "1:4 means sparsity 0.75, not 0.5")


@pytest.mark.parametrize("argv, needles", [
    (["prune", "--dsnot-base", "sparsegpt"], ["--dsnot-base has no effect with --method wanda", "--method dsnot"]),
    (["prune", "--method", "dsnot", "--dsnot-base", "dsnot"], ["cannot be dsnot itself"]),
    (["prune", "--method", "dsnot", "--dsnot-base", "bogus"], ["--dsnot-base", "bogus", "choose one of"]),
    (["prune", "--heads", "0.25"], ["--heads", "--pattern structured"]),
    (["train", "--prune", "wanda", "--teacher", "some/model"], ["--teacher has no effect", "drop one"]),
])
def test_prune_and_train_options_are_checked_before_the_model_loads(capsys, argv, needles):
    code, _, err = run_cli(capsys, argv[0], "/nonexistent/model/dir", *argv[1:])  # the model error would come second
    assert_one_line_error(code, err, *needles)


def test_an_error_under_a_progress_bar_starts_its_own_line(capsys, monkeypatch):
    from tqdm import tqdm

    from sparsa import cli
    from sparsa.errors import InputError

    def interrupted(args):
        bar = tqdm(total=10, desc="layers")  # (a bar looped over directly is closed as the loop unwinds)
        for i in range(10):
            bar.update()
            if i == 3:
                raise InputError("layer 3 is broken; fix it")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "inspect", interrupted)
    code, _, err = run_cli(capsys, "inspect")
    assert code == 2 and err.splitlines()[-1] == "sparsa: error: layer 3 is broken; fix it", err


def test_skip_patterns_must_match_a_layer(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "prune", str(tiny_dir), "--skip", "lm_head", "down_projj", "--no-eval")
    assert_one_line_error(code, err, "--skip 'down_projj' matches no linear layer", "inspect")


def test_train_settings_are_typed(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "train", str(tiny_dir), "--set", "update_every=abc")
    assert_one_line_error(code, err, "update_every must be a whole number", "update_every=10")


def test_eval_with_activation_sparsity(capsys, tiny_dir):
    code, out, err = run_cli(capsys, "eval", str(tiny_dir), "--activations", "teal", "--activation-sparsity", "0.4", "--max-tokens", "512", "--seq-len", "128")
    assert code == 0, err
    assert "activation sparsity measured during the evaluation" in err and "perplexity" in out
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--activations", "teal", "--activation-sparsity", "1.5")
    assert_one_line_error(code, err, "[0, 1)")


def test_eval_with_greedy_activation_allocation(capsys, tiny_dir):
    code, out, err = run_cli(capsys, "eval", str(tiny_dir), "--activations", "wina", "--activation-sparsity", "0.5",
                             "--activation-allocation", "greedy", "--max-tokens", "256", "--seq-len", "128")
    assert code == 0, err
    assert "greedy allocation" in err and "perplexity" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("what", ["linear", "attention", "activations"])
def test_bench_without_a_gpu_is_one_line(capsys, what):
    code, _, err = run_cli(capsys, "bench", what)
    assert_one_line_error(code, err, "needs a CUDA GPU")
