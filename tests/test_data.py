"""Shipped corpora, user text sources and reproducible calibration samples."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from sparsa.data import calibration_samples, held_out_samples, load_text, provenance, shipped_text, tokenize
from sparsa.errors import DataError, InputError


def test_shipped_corpora_are_large_disjoint_and_match_provenance():
    record = provenance()
    texts = {name: shipped_text(name) for name in ("calibration", "evaluation")}
    for name, text in texts.items():
        entry = record[f"{name}.txt"]
        assert len(text.encode()) >= 300_000
        assert hashlib.sha256(text.encode()).hexdigest() == entry["sha256"]
        assert entry["licence"] and entry["package"]
    # disjoint: no shared 200-character passage (checked on a sample of evaluation passages)
    calibration = texts["calibration"]
    evaluation = texts["evaluation"]
    for start in range(0, len(evaluation) - 200, 5000):
        assert evaluation[start : start + 200] not in calibration


def test_calibration_samples_are_seeded_and_reproducible(tokenizer):
    text = shipped_text("calibration")
    a = calibration_samples(tokenizer, text, 8, 64, seed=1)
    b = calibration_samples(tokenizer, text, 8, 64, seed=1)
    c = calibration_samples(tokenizer, text, 8, 64, seed=2)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_held_out_samples_share_no_token_position_with_the_calibration_samples(tokenizer):
    text = shipped_text("calibration")
    ids = tokenize(tokenizer, text)
    fit = calibration_samples(tokenizer, text, 16, 128, seed=3)
    held = held_out_samples(tokenizer, text, 16, 128, seed=3)
    assert held.shape == fit.shape and torch.equal(held, held_out_samples(tokenizer, text, 16, 128, seed=3))

    def positions(windows):  # the token offsets each window covers (found by its first 16 tokens)
        found = set()
        for window in windows:
            hits = (ids.unfold(0, 16, 1) == window[:16]).all(1).nonzero().flatten().tolist()
            found |= {range(h, h + len(window)) for h in hits[:1]}
        return set().union(*found)

    assert not positions(fit) & positions(held)
    with pytest.raises(DataError, match="held-out"):
        held_out_samples(tokenizer, text[:3000], 16, 128)


def test_user_text_and_jsonl(tmp_path):
    prose = "A paragraph of plain English text, long enough to count as text. " * 10
    (tmp_path / "a.txt").write_text(prose)
    assert load_text(str(tmp_path / "a.txt")) == prose
    rows = [{"text": prose}, {"text": "second document " * 20}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == prose + "\n\n" + "second document " * 20


def test_bad_text_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="no text"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="too short"):
        load_text(str(tmp_path / "short.txt"))
    with pytest.raises(DataError, match="line 2"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_too_few_calibration_tokens(tokenizer):
    text = "Only a few words here, repeated a little. " * 10
    with pytest.raises(DataError, match="fewer than one sample"):
        calibration_samples(tokenizer, text, 4, 4096)


def test_jsonl_without_a_text_field_names_the_fix(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"body": "no text field here"}\n')
    with pytest.raises(DataError, match=r'line 1 has no string field \'text\'; each line must be an object like \{"text": "..."\}'):
        load_text(str(tmp_path / "rows.jsonl"))
