"""sparsa.train on tiny models: masks hold (or move at constant sparsity), N:M stays exact, soups keep the mask, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import tiny_llama_config
from sparsa.errors import InputError
from sparsa.prune.patterns import check_nm, mask_nm, mask_unstructured
from sparsa.train import TRAIN_METHODS, MaskState, TokenBatches, TrainConfig, train_loop
from sparsa.train.dst import move_mask
from sparsa.train.imp import round_sparsity

VOCAB = 96


def tiny_model(pattern: str | None = "50%", seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2))
    if pattern:
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, nn.Linear) and name != "lm_head":
                    scores = m.weight.abs()
                    m.weight.mul_(mask_nm(scores, 2, 4) if pattern == "2:4" else mask_unstructured(scores, 0.5))
    return model


@pytest.fixture(scope="module")
def data() -> TokenBatches:
    ids = torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    return TokenBatches(ids, 16, 4, seed=0)


def config(method: str, steps: int = 6, **kw) -> TrainConfig:
    values = dict(method=method, steps=steps, seq_len=16, batch_size=4, lr=3e-3, weight_decay=0.1, update_every=2, rounds=2, soup_size=2, sparsity=0.5)
    values.update(kw)
    return TrainConfig(**values)


def fit(method: str, model, masks, data, steps: int = 6, teacher=None, **kw) -> dict:
    c = config(method, steps, **kw)
    teacher = teacher if teacher is not None else (tiny_model(None) if TRAIN_METHODS.get(method).needs_teacher or method == "soup" and kw.get("soup_base") == "distill" else None)
    return TRAIN_METHODS.get(method).fit(model, masks, c, data, teacher, progress=False)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- masks as state -------------------------------------------------------------------

def test_mask_state_reads_the_zeros_and_skips_dense_and_lm_head():
    model = tiny_model("50%")
    masks = MaskState.from_model(model)
    assert len(masks) == 14 and "lm_head" not in masks  # 7 linears x 2 layers
    assert masks.sparsity() == pytest.approx(0.5) and masks.check(model)
    assert len(MaskState.from_model(tiny_model(None))) == 0
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    assert not masks.check(model)
    masks.apply(model)
    assert masks.check(model)


def test_attach_keeps_the_mask_in_a_plain_loop(data):
    model = tiny_model("50%")
    masks = MaskState.from_model(model)
    before = masks.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handles = masks.attach(optimizer, model)
    for step in range(5):
        batch = data.batch(step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert masks.check(model) and masks.equal(before)
    assert masks.equal(MaskState.from_model(model, names=masks.names()))  # kept weights moved but stayed non-zero
    for h in handles:
        h.remove()


def test_trainer_callback_keeps_the_mask(tmp_path, data):
    from transformers import Trainer, TrainingArguments

    from sparsa.train import MaskCallback

    model = tiny_model("2:4")
    masks = MaskState.from_model(model)
    before = masks.clone()
    rows = [{"input_ids": data.windows[i], "labels": data.windows[i]} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[MaskCallback(masks)]).train()
    assert masks.equal(before) and masks.check(model)
    assert all(check_nm(model.get_submodule(n).weight != 0, 2, 4) for n in masks.names())


# -- methods that keep the mask -------------------------------------------------------

@pytest.mark.parametrize("method,steps", [("masked", 1), ("masked", 7), ("distill", 5)])
def test_fine_tuning_keeps_mask_and_sparsity(method, steps, data):
    model = tiny_model("50%")
    masks = MaskState.from_model(model)
    before, start = masks.clone(), weights(model)
    record = fit(method, model, masks, data, steps)
    assert masks.equal(before) and masks.check(model)
    assert MaskState.from_model(model).sparsity() == pytest.approx(0.5)
    assert len(record["loss_curve"]) == steps
    assert any(not torch.equal(start[k], v) for k, v in weights(model).items())  # it did train


def test_distillation_terms_vanish_against_itself(data):
    from sparsa.train.distill import distillation_terms

    model = tiny_model(None)
    batch = data.batch(0)
    out = model(input_ids=batch, output_hidden_states=True)
    hidden, kl = distillation_terms(out, out, temperature=2.0)
    assert float(hidden.detach()) == 0.0 and abs(float(kl.detach())) < 1e-6


def test_distill_learns_towards_the_teacher(data):
    teacher = tiny_model(None, seed=1)  # another network, so there is something to learn
    model = tiny_model("50%")
    record = fit("distill", model, MaskState.from_model(model), data, 12, teacher=teacher, ce_weight=0.0, lr=1e-2, weight_decay=0.0)
    assert record["loss_curve"][-1] < 0.5 * record["loss_curve"][0]


# -- N:M with SR-STE ------------------------------------------------------------------

@pytest.mark.parametrize("start", [None, "2:4"])
def test_sr_ste_keeps_nm_exact(start, data):
    model = tiny_model(start)
    masks = MaskState.from_model(model, names=[n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"])
    record = fit("sr_ste", model, masks, data, 6, pattern="2:4", srste_decay=1e-2)
    assert record["pattern"] == "2:4"
    for name in masks.names():
        weight = model.get_submodule(name).weight
        assert check_nm(masks.masks[name], 2, 4, exact=True)
        assert check_nm(weight != 0, 2, 4)
        assert torch.equal(weight != 0, masks.masks[name] & (weight != 0))
    assert masks.sparsity() == pytest.approx(0.5)


def test_sr_ste_forward_is_nm_at_every_step(data):
    from sparsa.train.sr_ste import SRSTE

    model = tiny_model(None)
    method = SRSTE(config("sr_ste", 4))
    masks = method.setup(model, MaskState({}))
    for step in range(4):
        batch = data.batch(step)
        method.loss(model, batch, None)[0].backward()
        method.before_step(model, masks, step)
        for module in method.modules.values():
            assert check_nm(module.weight != 0, 2, 4)  # what the forward used
            assert module.parametrizations.weight.original.grad is not None
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad if p.grad is not None else 0
                p.grad = None
        method.after_step(model, masks, step, None)
    assert method._scale(0) == 1.0 and method._scale(3) == pytest.approx(0.0)


# -- dynamic sparse training ----------------------------------------------------------

def test_move_mask_keeps_the_count():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    mask = mask_unstructured(weight.abs(), 0.75)
    new = move_mask(mask, weight * mask, torch.rand(8, 16), 5)
    assert int(new.count_nonzero()) == int(mask.count_nonzero())
    assert int((new & ~mask).count_nonzero()) == 5


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dst_moves_the_mask_and_keeps_sparsity(method, data):
    model = tiny_model("50%")
    masks = MaskState.from_model(model)
    before = masks.clone()
    record = fit(method, model, masks, data, 8, update_fraction=0.3)
    assert not masks.equal(before)
    assert masks.layer_sparsity() == before.layer_sparsity()
    assert masks.check(model)
    assert record["mask_updates"] > 0 and record["weights_moved"] > 0


def test_dst_on_a_dense_model_prunes_to_the_asked_sparsity(data):
    model = tiny_model(None)
    masks = MaskState({})
    fit("rigl", model, masks, data, 4, sparsity=0.75)
    assert masks.sparsity() == pytest.approx(0.75) and masks.check(model)


# -- iterative magnitude pruning -------------------------------------------------------

def test_imp_reaches_the_target_through_nested_masks_and_rewinds(data):
    model = tiny_model(None)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    masks = MaskState.from_model(model, names=names)
    record = fit("imp", model, masks, data, 9, rounds=3, sparsity=0.75, rewind_step=1)
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    sparsities = [r["sparsity"] for r in record["rounds"]]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.75, abs=1e-3)
    assert masks.check(model) and masks.sparsity() == pytest.approx(0.75, abs=1e-3)
    assert round_sparsity(0.0, 0.75, 3, 3) == pytest.approx(0.75)


# -- soups ---------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["masked", "distill"])
def test_soup_keeps_the_shared_mask(base, data):
    model = tiny_model("2:4")
    masks = MaskState.from_model(model)
    before = masks.clone()
    record = fit("soup", model, masks, data, 3, soup_base=base)
    assert masks.equal(before) and masks.check(model)
    assert len(record["ingredients"]) == 2 and [r["seed"] for r in record["ingredients"]] == [0, 1]
    assert all(check_nm(model.get_submodule(n).weight != 0, 2, 4) for n in masks.names())


def test_soup_is_the_average_of_its_ingredients(data):
    start = tiny_model("50%")
    ingredients = []
    for seed in (0, 1):
        model = tiny_model("50%")
        c = config("masked", 3, seed=seed)
        order = TokenBatches(data.windows.reshape(-1), 16, 4, seed=seed)
        train_loop(model, TRAIN_METHODS.get("masked")(c), MaskState.from_model(model), c, order, progress=False)
        ingredients.append(weights(model))
    fit("soup", start, MaskState.from_model(start), data, 3, soup_base="masked")
    for key, value in weights(start).items():
        torch.testing.assert_close(value, (ingredients[0][key] + ingredients[1][key]) / 2, rtol=1e-6, atol=1e-7)


# -- checkpoints and resume -----------------------------------------------------------

@pytest.mark.parametrize("method", ["distill", "set", "sr_ste", "imp"])
def test_resume_equals_an_uninterrupted_run(method, data, tmp_path):
    steps, stop = 6, 3
    extra = {"rewind_step": 1} if method == "imp" else {}
    teacher = tiny_model(None, seed=1)

    def run(steps_to_run: int, directory, resume: bool) -> nn.Module:
        model = tiny_model(None if method == "sr_ste" else "50%")
        masks = MaskState.from_model(model, names=[n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"])
        c = config(method, steps, checkpoint_every=stop, **extra)
        method_obj = TRAIN_METHODS.get(method)(c)
        if steps_to_run < steps:  # interrupt: stop after ``stop`` steps by running a loop that raises
            original = method_obj.after_step

            def interrupt(model, masks, step, optimizer):
                original(model, masks, step, optimizer)
                if step == stop:  # during the step after the checkpoint: its work is lost
                    raise KeyboardInterrupt

            method_obj.after_step = interrupt
        try:
            train_loop(model, method_obj, masks, c, data, teacher, checkpoint_dir=directory, resume=resume, progress=False)
        except KeyboardInterrupt:
            pass
        return model, masks

    whole, whole_masks = run(steps, None, False)
    run(stop, tmp_path / "ckpt", False)  # interrupted in step 4, after step 3 was checkpointed
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == stop
    resumed, resumed_masks = run(steps, tmp_path / "ckpt", True)
    for key, value in weights(whole).items():
        assert torch.equal(value, weights(resumed)[key]), key
    assert whole_masks.equal(resumed_masks)


def test_checkpoint_refuses_other_settings_and_missing_state(data, tmp_path):
    model = tiny_model("50%")
    c = config("masked", 2)
    train_loop(model, TRAIN_METHODS.get("masked")(c), MaskState.from_model(model), c, data, checkpoint_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000002"]
    other = config("masked", 2, lr=1e-4)
    with pytest.raises(InputError, match="other settings"):
        train_loop(model, TRAIN_METHODS.get("masked")(other), MaskState.from_model(model), other, data, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(InputError, match="no checkpoint"):
        train_loop(model, TRAIN_METHODS.get("masked")(c), MaskState.from_model(model), c, data, checkpoint_dir=tmp_path / "none", resume=True, progress=False)


def test_batches_are_a_function_of_the_step_and_split_over_processes():
    ids = torch.arange(200)
    whole = TokenBatches(ids, 10, 4, seed=3)
    halves = [TokenBatches(ids, 10, 4, seed=3, rank=r, world=2) for r in (0, 1)]
    for step in (0, 4, 11):  # step 11 is in a later pass over the data
        assert torch.equal(whole.batch(step), torch.cat([h.batch(step) for h in halves]))
    assert not torch.equal(whole.batch(5), TokenBatches(ids, 10, 4, seed=4).batch(5))
    with pytest.raises(InputError, match="does not split"):
        TokenBatches(ids, 10, 3, world=2)


# -- configuration and API -------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (dict(steps=0), "steps"), (dict(lr=0), "lr"), (dict(pattern="4:2"), "N < M"), (dict(sparsity=1.0), "sparsity"),
    (dict(method="imp", steps=2, rounds=3), "round"), (dict(soup_base="soup"), "soups"), (dict(update_fraction=1.5), "update_fraction"),
])
def test_config_validation(bad, match):
    with pytest.raises(InputError, match=match):
        TrainConfig(**bad)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(InputError, match="distill, imp, masked, rigl, set, soup, sr_ste"):
        TRAIN_METHODS.get("nope")


def test_api_train_needs_a_teacher_and_a_mask(tiny_lm):
    import sparsa

    with pytest.raises(InputError, match="no zero weights"):
        sparsa.train(tiny_lm, method="masked", steps=1, seq_len=16)
    with pytest.raises(InputError, match="teacher"):
        sparsa.train(tiny_lm, method="distill", steps=1, seq_len=16)


def test_cli_train_prunes_distils_and_saves(tmp_path, tiny_dir, capsys):
    import sparsa
    from sparsa.cli import main

    from sparsa.data import shipped_text

    out, text = tmp_path / "trained", tmp_path / "train.txt"
    text.write_text(shipped_text("calibration")[:20000])
    code = main(["train", str(tiny_dir), "--prune", "magnitude", "--pattern", "2:4", "--steps", "2", "--seq-len", "32", "--data", str(text),
                 "--no-eval", "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    lm = sparsa.load_model(str(out))
    assert lm.record["training"]["method"] == "distill" and lm.record["training"]["steps"] == 2
    assert sparsa.inspect(lm).pattern == "2:4"


@pytest.mark.parametrize("argv,needle", [
    (["train", "--method", "nope"], "invalid choice"),
    (["train", "--resume"], "--resume needs --checkpoint-dir"),
    (["train", "--set", "bogus=1"], "KEY one of"),
])
def test_cli_train_errors_are_one_line(argv, needle, capsys):
    from sparsa.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sparsa:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


# -- several processes (FSDP2 on CPU through gloo) -------------------------------------

WORKER = """
import json, os, sys
import torch
sys.path.insert(0, sys.argv[2])
from test_train import distributed_run

result = distributed_run(sys.argv[1])
if int(os.environ.get("RANK", 0)) == 0:
    print("RESULT " + json.dumps(result))
"""


def distributed_run(checkpoint_dir) -> dict:
    """Three steps of distill on a 2:4 tiny model, in however many processes launched this."""
    import os

    student, teacher = tiny_model("2:4"), tiny_model(None, seed=1)
    masks = MaskState.from_model(student)
    before = masks.clone()
    ids = torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    data = TokenBatches(ids, 16, 4, 0, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    c = config("distill", 3, weight_decay=0.0)
    record = train_loop(student, TRAIN_METHODS.get("distill")(c), masks, c, data, teacher, checkpoint_dir=checkpoint_dir, progress=False)
    after = MaskState.from_model(student, names=before.names())
    kept = all(bool((~before.masks[n] <= ~m).all()) for n, m in after.masks.items())
    return {"curve": record["loss_curve"], "kept": kept, "processes": record["processes"]}


def test_two_processes_with_fsdp2_give_the_same_loss_curve(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not torch.distributed.is_available():
        pytest.skip("torch built without distributed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    one = distributed_run(None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ckpt"), str(Path(__file__).parent)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    two = json.loads(lines[0][len("RESULT "):])
    assert two["processes"] == 2 and two["kept"] and one["kept"]
    assert two["curve"] == pytest.approx(one["curve"], rel=1e-4)
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 3


def test_training_pattern_error_lists_what_training_takes():
    with pytest.raises(InputError, match=r"pattern 'structured' cannot be used; use 'unstructured' or N:M such as 2:4$"):
        TrainConfig(pattern="structured")
    with pytest.raises(InputError, match="--seq-len / seq_len must be at least 8"):
        TrainConfig(seq_len=4)


def test_api_train_refuses_a_teacher_of_another_shape(tiny_lm):
    import sparsa

    with pytest.raises(InputError, match=r"the teacher has vocab_size 96 but the student .* has \d+; .*--teacher / teacher="):
        sparsa.train(tiny_lm, method="distill", teacher=tiny_model(None), steps=1, seq_len=16)
    with pytest.raises(InputError, match="--teacher / teacher="):
        sparsa.train(tiny_lm, method="distill", steps=1, seq_len=16)


def test_train_checkpoint_dir_errors_are_input_errors(tmp_path, data):
    model, masked = tiny_model("50%"), TRAIN_METHODS.get("masked")
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    with pytest.raises(InputError, match="choose another --checkpoint-dir"):
        masked.fit(model, MaskState.from_model(model), config("masked", 1), data, checkpoint_dir=afile, progress=False)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest.json").write_text("{x")
    with pytest.raises(InputError, match=r"latest\.json is corrupt"):
        masked.fit(model, MaskState.from_model(model), config("masked", 1), data, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
