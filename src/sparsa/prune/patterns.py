"""Turning importance scores into keep-masks: the one place where weights are chosen.

Every pruning method reduces to "score each weight, then keep the best ones
under a sparsity pattern". The scoring differs between methods; the selection
does not, so it lives here and nowhere else. Masks are boolean tensors shaped
like the weight, ``True`` where a weight is kept.

Conventions, shared by all functions:

* weights are ``[out_features, in_features]``; N:M groups run along the input
  dimension (M consecutive input columns of one output row), which is the
  layout sparse tensor cores accelerate;
* the number of pruned weights is exact: ``round(sparsity * count)``;
* ties are broken deterministically: among equal scores the weight with the
  lower index is kept (stable sorts, never ``topk``, whose tie order is
  unspecified);
* scores must be finite; the pruners check their weights and inputs first.
"""

from __future__ import annotations

import torch

from ..errors import InputError, require

__all__ = [
    "check_nm",
    "mask_from_scores",
    "mask_nm",
    "mask_prune_count",
    "mask_unstructured",
    "pruned_count",
    "require_nm_fits",
    "sparsity_of",
]


ROWS_PER_SORT = 1024


def pruned_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a ``sparsity`` budget removes: ``round(sparsity * total)``.

    Python's ``round`` (halves to even), so every caller agrees on the count.
    """
    require(0 <= sparsity < 1, f"sparsity must be in [0, 1), got {sparsity}")
    return int(round(sparsity * total))


def mask_prune_count(scores: torch.Tensor, count: int, per_row: bool = False) -> torch.Tensor:
    """Keep-mask that prunes exactly ``count`` lowest-scored weights.

    With ``per_row`` each row of a 2-D ``scores`` loses ``count`` weights;
    otherwise the whole tensor loses ``count`` in total. A stable descending
    sort ranks the weights best-first, so ties keep the lower index.
    """
    if per_row:
        require(scores.dim() == 2, f"per-row selection needs 2-D scores, got shape {tuple(scores.shape)}")
        return _keep_best(scores, scores.shape[1] - count, dim=1)
    return _keep_best(scores.reshape(-1), scores.numel() - count, dim=0).reshape(scores.shape)


def _keep_best(scores: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
    """Mask keeping the ``keep`` highest scores along ``dim`` (ties: lower index first)."""
    size = scores.shape[dim]
    require(0 <= keep <= size, f"cannot keep {keep} of {size} weights")
    mask = torch.ones_like(scores, dtype=torch.bool)
    # Rows are independent when selecting along a later dim: sort a slab of
    # rows at a time, so the int64 sort indices never cost 2x the weight.
    step = ROWS_PER_SORT if dim > 0 else scores.shape[0]
    for start in range(0, scores.shape[0], step):
        slab = scores.narrow(0, start, min(step, scores.shape[0] - start))
        order = torch.sort(slab, dim=dim, descending=True, stable=True).indices
        mask.narrow(0, start, slab.shape[0]).scatter_(dim, order.narrow(dim, keep, size - keep), False)
    return mask


def mask_unstructured(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the lowest ``round(sparsity * n)`` scores, layer-wide or within each output row.

    Magnitude pruning compares all weights of a layer (``per_row=False``);
    Wanda compares weights feeding the same output (``per_row=True``), since
    each output row then keeps exactly the same share of its inputs.
    """
    total = scores.shape[1] if per_row else scores.numel()
    return mask_prune_count(scores, pruned_count(total, sparsity), per_row=per_row)


def require_nm_fits(in_features: int, n: int, m: int, name: str = "") -> None:
    """Raise ``InputError`` unless an N:M pattern can tile ``in_features`` input columns."""
    require(0 < n < m, f"an N:M pattern needs 0 < N < M, got {n}:{m}")
    layer = f"layer {name}" if name else "a layer"
    require(
        in_features % m == 0,
        f"{layer} has {in_features} input features, not divisible by M={m}; "
        f"choose an M that divides {in_features}, or leave the layer dense (when pruning: --skip / skip=)",
    )


def mask_nm(scores: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns.

    ``scores`` is ``[rows, in_features]``; ``in_features`` must be a multiple
    of ``m`` (``name`` names the layer in the error otherwise).
    """
    require(scores.dim() == 2, f"N:M selection needs 2-D scores, got shape {tuple(scores.shape)}")
    rows, columns = scores.shape
    require_nm_fits(columns, n, m, name)
    groups = scores.reshape(rows, columns // m, m)
    return _keep_best(groups, n, dim=2).reshape(rows, columns)


def mask_from_scores(
    scores: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    per_row: bool = False,
    name: str = "",
) -> torch.Tensor:
    """The selection a pruning config asks for: N:M when ``nm`` is set, else unstructured.

    Under N:M the sparsity is implied by the pattern, so ``sparsity`` and
    ``per_row`` are ignored.
    """
    if nm is not None:
        return mask_nm(scores, nm[0], nm[1], name)
    return mask_unstructured(scores, sparsity, per_row=per_row)


def check_nm(mask: torch.Tensor, n: int, m: int, exact: bool = False) -> bool:
    """Whether every group of ``m`` consecutive input columns has at most ``n`` kept entries.

    "At most" is what N:M hardware needs, so ``check_nm(weight != 0, 2, 4)``
    also accepts a kept weight that happens to be zero. ``exact=True`` asks
    for exactly ``n`` per group, as the pruners produce.
    """
    if mask.dim() != 2 or mask.shape[1] % m:
        return False
    kept = mask.reshape(mask.shape[0], -1, m).sum(dim=2)
    return bool((kept == n).all() if exact else (kept <= n).all())


def sparsity_of(mask: torch.Tensor) -> float:
    """Fraction of entries pruned (``False``) in a keep-mask."""
    if mask.numel() == 0:
        return 0.0
    return 1.0 - mask.count_nonzero().item() / mask.numel()
