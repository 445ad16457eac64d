"""Calibration samples: N sequences of L tokens drawn from a text, reproducibly."""

from __future__ import annotations

import torch

from ..errors import DataError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets: a [N, L] tensor.

    The same text, tokenizer, sizes and seed always give the same tensor.
    """
    ids = tokenize(tokenizer, text)
    if len(ids) < seq_len + 1:
        raise DataError(
            f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}; "
            "pass a longer text or a smaller --seq-len"
        )
    needed = n_samples * seq_len
    if needed > len(ids) * 4:
        raise DataError(
            f"{n_samples} samples of {seq_len} tokens need {needed} tokens but the text has {len(ids)}; "
            "pass a longer text or fewer --samples"
        )
    return torch.stack([ids[s : s + seq_len] for s in _starts(len(ids), n_samples, seq_len, seed)])


def _starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n_samples,), generator=generator).tolist()


def held_out_samples(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens that overlap none of ``calibration_samples``' windows (same arguments).

    For choosing a setting on the calibration text without scoring it on the
    very tokens it was fitted to. Seeded as well.
    """
    ids = tokenize(tokenizer, text)
    starts: list[int] = []
    if len(ids) > seq_len:
        taken = _starts(len(ids), n_samples, seq_len, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        for _ in range(100 * n_samples):
            if len(starts) == n_samples:
                break
            start = int(torch.randint(0, len(ids) - seq_len, (1,), generator=generator))
            if all(abs(start - other) >= seq_len for other in taken + starts):
                starts.append(start)
    if len(starts) < n_samples:
        raise DataError(f"the calibration text is too short for {n_samples} held-out samples of {seq_len} tokens beside "
                        f"the calibration samples; pass a longer text or fewer --samples")
    return torch.stack([ids[s : s + seq_len] for s in starts])
