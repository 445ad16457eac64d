"""Seeded long-context tasks: deterministic, the answers are in the prompt, lengths as asked, scoring exact."""

from __future__ import annotations

import pytest

from sparsa.errors import InputError
from sparsa.eval.longctx import TASKS, Example, make_examples, score


def test_tasks_registered():
    assert set(TASKS.names()) == {"needle", "multikey", "multivalue", "variable_tracking", "common_words"}


@pytest.mark.parametrize("task", ["needle", "multikey", "multivalue", "variable_tracking", "common_words"])
def test_examples_are_seeded_sized_and_answerable(task, tokenizer):
    a = make_examples(task, tokenizer, 2048, 2, seed=3)
    assert a == make_examples(task, tokenizer, 2048, 2, seed=3)
    assert a != make_examples(task, tokenizer, 2048, 2, seed=4)
    assert a[0] != a[1]
    for ex in a:
        tokens = len(tokenizer(ex.prompt)["input_ids"])
        assert 0.8 * 2048 <= tokens <= 1.1 * 2048, tokens
        assert ex.answers and all(ans in ex.prompt for ans in ex.answers)
        assert ex.prompt.rstrip().endswith(":") or ex.prompt.rstrip().endswith("is") or ex.prompt.rstrip().endswith("are")


def test_variable_tracking_chain_is_consistent(tokenizer):
    ex = make_examples("variable_tracking", tokenizer, 1024, 1, seed=0)[0]
    chain = ex.answers
    first = ex.prompt.index(f"VAR {chain[0]} = ")
    for a, b in zip(chain, chain[1:]):
        link = ex.prompt.index(f"VAR {b} = VAR {a}.")
        assert link > first, "a chain link comes before the value it copies"


def test_score_is_fraction_of_expected_strings():
    ex = Example("multivalue", "p", ("111", "222", "333", "444"), 8)
    assert score(ex, "111, 222 and 444") == 0.75
    assert score(Example("needle", "p", ("Abc",), 4), " the number is abc.") == 1.0


def test_bad_requests(tokenizer):
    with pytest.raises(InputError, match="unknown long-context task"):
        make_examples("haystack", tokenizer, 2048, 1)
    with pytest.raises(InputError, match="length"):
        make_examples("needle", tokenizer, 100, 1)
