"""Perplexity over non-overlapping windows of a text.

Each window of ``seq_len`` tokens is scored on its own (no context carried
across windows), so every token after a window's first is predicted exactly
once: perplexity = exp(total negative log-likelihood / tokens predicted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import tokenize
from ..errors import DataError, require


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # tokens predicted (scored)
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, "seq_len": self.seq_len}


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Split a 1-D id tensor into [W, seq_len] non-overlapping windows (tail dropped)."""
    if max_tokens:
        ids = ids[:max_tokens]
    count = len(ids) // seq_len
    if count == 0:
        raise DataError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}; pass a longer text or a smaller --seq-len")
    return ids[: count * seq_len].view(count, seq_len)


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, seq_len: int = 1024, max_tokens: int | None = 20480, batch_size: int = 1, progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on ``text`` (see module docstring)."""
    require(seq_len >= 2, f"seq_len must be at least 2, got {seq_len}")
    require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    chunks = windows(tokenize(tokenizer, text), seq_len, max_tokens)
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(range(0, len(chunks), batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False)
    for start in bar:
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    if not math.isfinite(total_nll):
        raise DataError("the model produced non-finite log-likelihoods (NaN or Inf weights?); check the model with sparsa inspect")
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, len(chunks), seq_len)
