"""lm-eval adapter: a tiny local task scored by lm-eval with an in-memory model, offline."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from sparsa.errors import DataError, InputError, SparsaError  # noqa: E402
from sparsa.eval.lm_eval_adapter import evaluate_tasks  # noqa: E402

TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval_task"
TASK = "sparsa_tiny_mc"


def _docs() -> list[dict]:
    lines = (TASK_DIR / "sparsa_tiny_mc.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _context(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"  # doc_to_text in sparsa_tiny_mc.yaml


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level tokenizer trained offline on the task's own text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [_context(d) + " " + " ".join(d["choices"]) for d in _docs()]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    return _tiny_llama(len(tiny_tokenizer), seed=0)


@torch.no_grad()
def _hand_scores(model, tokenizer) -> tuple[list[bool], list[bool]]:
    """Per document: is the argmax of choice log-likelihoods (raw, and per character) the answer?

    Mirrors lm-eval's request: context = doc_to_text, continuation = " " + choice; the
    pair is encoded whole and split after the context's tokens.
    """
    correct, correct_norm = [], []
    for doc in _docs():
        context = _context(doc)
        ctx_ids = tokenizer.encode(context)
        lls = []
        for choice in doc["choices"]:
            cont_ids = tokenizer.encode(context + " " + choice)[len(ctx_ids):]
            ids = torch.tensor([ctx_ids + cont_ids[:-1]])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            positions = torch.arange(len(ctx_ids) - 1, len(ctx_ids) - 1 + len(cont_ids))
            lls.append(logprobs[positions, torch.tensor(cont_ids)].sum().item())
        lengths = [len(c) for c in doc["choices"]]
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        correct.append(best == doc["answer"])
        correct_norm.append(best_norm == doc["answer"])
    return correct, correct_norm


def test_tiny_task_matches_hand_computed_accuracy(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the task's data path must not depend on the working directory
    correct, correct_norm = _hand_scores(tiny_model, tiny_tokenizer)
    n = len(correct)
    assert n >= 10

    results = evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR)
    assert set(results) == {TASK}
    metrics = results[TASK]
    assert set(metrics) == {"acc", "acc_norm"}  # ",none" stripped, no stderr
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert metrics["acc"] == pytest.approx(sum(correct) / n)
    assert metrics["acc_norm"] == pytest.approx(sum(correct_norm) / n)

    # Per document: the accuracy over the first k documents (limit=k) pins down each prediction.
    for k in (1, 3, 7, n):
        limited = evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=str(TASK_DIR), limit=k)[TASK]
        assert limited["acc"] == pytest.approx(sum(correct[:k]) / k)
        assert limited["acc_norm"] == pytest.approx(sum(correct_norm[:k]) / k)

    # Batching and repeating change nothing.
    batched = evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR, batch_size=5)
    assert batched[TASK] == pytest.approx(results[TASK])
    assert evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR) == results


def test_scores_come_from_the_given_model(tiny_tokenizer):
    """Teach a copy of the model the answers: lm-eval's accuracy follows the weights."""
    model = _tiny_llama(len(tiny_tokenizer), seed=1)
    before, _ = _hand_scores(model, tiny_tokenizer)
    assert not all(before)

    sequences = [tiny_tokenizer.encode(_context(d) + " " + d["choices"][d["answer"]]) for d in _docs()]
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [tiny_tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in sequences])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    after, _ = _hand_scores(model, tiny_tokenizer)
    assert all(after)
    results = evaluate_tasks(model, tiny_tokenizer, [TASK], include_path=TASK_DIR)
    assert results[TASK]["acc"] == 1.0
    assert model.training  # handed back in the mode it came in


def test_tokenizer_without_pad_token_is_handed_back_unchanged(tiny_model, tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    results = evaluate_tasks(tiny_model, tokenizer, [TASK], include_path=TASK_DIR, batch_size=4)
    assert results == evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR)
    assert tokenizer.pad_token is None


def test_unknown_task_is_a_one_line_input_error(tiny_model, tiny_tokenizer):
    with pytest.raises(InputError) as info:
        evaluate_tasks(tiny_model, tiny_tokenizer, ["sparsa_tiny_mcq"], include_path=TASK_DIR)
    message = str(info.value)
    assert "\n" not in message
    assert "sparsa_tiny_mcq" in message and "did you mean sparsa_tiny_mc" in message
    assert "lm-eval ls tasks" in message and "include" in message


def test_bad_arguments_are_input_errors(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=tmp_path / "missing")
    with pytest.raises(InputError, match="no lm-eval tasks"):
        evaluate_tasks(tiny_model, tiny_tokenizer, [], include_path=TASK_DIR)
    with pytest.raises(InputError, match="limit"):
        evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR, limit=0)
    with pytest.raises(InputError, match="batch_size"):
        evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR, batch_size=0)


def test_task_whose_data_cannot_be_read_is_a_one_line_data_error(tiny_model, tiny_tokenizer, tmp_path):
    yaml_text = (TASK_DIR / "sparsa_tiny_mc.yaml").read_text(encoding="utf-8")
    (tmp_path / "broken.yaml").write_text(
        yaml_text.replace("task: sparsa_tiny_mc", "task: sparsa_broken_mc").replace(
            "test: sparsa_tiny_mc.jsonl", "test: no_such_file.jsonl"
        ),
        encoding="utf-8",
    )
    (tmp_path / "sparsa_tiny_mc_data.py").write_text(
        (TASK_DIR / "sparsa_tiny_mc_data.py").read_text(encoding="utf-8"), encoding="utf-8"
    )
    with pytest.raises(DataError) as info:
        evaluate_tasks(tiny_model, tiny_tokenizer, ["sparsa_broken_mc"], include_path=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "sparsa_broken_mc" in message and "no_such_file.jsonl" in message


def test_missing_lm_eval_says_how_to_install(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(SparsaError, match=r"lm-eval is not installed; pip install 'sparsa\[eval\]'"):
        evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR)


def test_run_is_quiet(tiny_model, tiny_tokenizer, capfd, caplog):
    level_before = logging.getLogger("lm_eval").level
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR, limit=2)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # no progress bars
    assert not [r for r in caplog.records if r.name.startswith("lm_eval") and r.levelno < logging.ERROR]
    assert logging.getLogger("lm_eval").level == level_before  # levels are put back


def test_few_shot_prompts_are_seeded_and_global_rng_is_left_alone(tiny_model, tiny_tokenizer, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    contexts: list[str] = []
    original = HFLM.loglikelihood

    def spy(self, requests, *args, **kwargs):
        contexts.extend(r.args[0] for r in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)

    def prompts(**kwargs) -> list[str]:
        contexts.clear()
        evaluate_tasks(tiny_model, tiny_tokenizer, [TASK], include_path=TASK_DIR, limit=3, **kwargs)
        return list(contexts)

    zero_shot = prompts()
    assert zero_shot[0] == _context(_docs()[0])
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    two_shot = prompts(num_fewshot=2, seed=0)
    assert random.random() == expected_next  # the caller's random state is restored
    assert all(p.count("Question:") == 3 for p in two_shot)
    assert prompts(num_fewshot=2, seed=0) == two_shot
    assert prompts(num_fewshot=2, seed=1) != two_shot
