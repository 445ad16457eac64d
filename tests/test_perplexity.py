"""Perplexity against a hand computation, and on the real default model."""

from __future__ import annotations

import math

import torch

from sparsa.data import shipped_text, tokenize
from sparsa.eval import perplexity


def test_perplexity_equals_hand_computed_value(tiny_lm):
    text = shipped_text("evaluation")[:4000]
    seq_len, max_tokens = 16, 80
    result = perplexity(tiny_lm.model, tiny_lm.tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, progress=False)
    ids = tokenize(tiny_lm.tokenizer, text)[:max_tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(len(ids) // seq_len):
            window = ids[w * seq_len : (w + 1) * seq_len]
            logp = torch.log_softmax(tiny_lm.model(window[None]).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                nll -= logp[t, window[t + 1]].item()
                count += 1
    assert result.tokens == count == 5 * 15 and result.windows == 5
    assert math.isclose(result.perplexity, math.exp(nll / count), rel_tol=1e-5)


def test_default_model_perplexity_on_shipped_text(default_lm):
    result = perplexity(default_lm.model, default_lm.tokenizer, shipped_text("evaluation"), seq_len=512, max_tokens=2048, progress=False)
    assert result.tokens == 4 * 511
    # a real 135M model on real English: far better than uniform (49152) and than a unigram model
    assert 5 < result.perplexity < 60
