"""DSnoT: training-free refinement of a sparse mask (Zhang et al., 2023, "Dynamic Sparse No Training").

A base method (Wanda by default) chooses a mask; DSnoT then edits it without
any gradient, one swap at a time per output row, and without changing the
weights' values. For row ``r`` the expected reconstruction error is

    eps_r = sum_j (W_rj - W'_rj) E[x_j]  =  sum over pruned j of a_rj,    a_rj = W_rj E[x_j]

i.e. how far the sparse row's mean output drifts from the dense one. It is
the objective DSnoT lowers. Each cycle, for every row still being refined:

* grow: revive the pruned weight that pulls ``eps_r`` towards zero the most
  per unit of input variance, ``argmax sign(eps_r) a_rj / Var[x_j]``: a
  large, steady reduction rather than one that is noisy across inputs;
* prune: drop the kept weight with the smallest Wanda score
  ``|W_rk| ||X_k||`` (the least output it carries).

Both are chosen only among swaps that

1. leave ``|eps_r|`` strictly smaller than before, so the objective never
   increases (a revival that overshoots past ``-eps_r`` is not considered); and
2. do not raise the row's estimated mean squared output error
   ``eps_r^2 + sum over pruned j of W_rj^2 Var[x_j]`` (its mean part plus its
   variance part, inputs taken as uncorrelated). Without this guard the mean
   error can be bought with a larger fluctuating one: dropping an important
   weight of a 2:4 group to fix ``eps_r`` made outputs worse, not better.

Under N:M the dropped weight comes from the revived weight's group, which
keeps every group at N. A row stops after ``dsnot_cycles`` swaps, once
``|eps_r|`` falls below ``dsnot_threshold`` times its initial value, or when
no revival qualifies; a revival with no qualifying partner is not offered
again for that row.

DSnoT only changes the mask: kept weights have their dense values, even when
the base (SparseGPT) would have updated them.
"""

from __future__ import annotations

import torch

from .base import METHODS, InputStats, LayerPruner
from .patterns import require_nm_fits
from .wanda import wanda_scores

__all__ = ["DSnoT", "expected_row_errors", "refine_mask"]

# Rows refined together: bounds the float64 working set to ~ROW_CHUNK_ELEMENTS entries per tensor.
ROW_CHUNK_ELEMENTS = 1 << 22


@METHODS.register("dsnot")
class DSnoT(LayerPruner):
    """Refines the mask of ``config.dsnot_base`` by error-reducing grow/prune swaps."""

    def __init__(self, layer, config, name) -> None:
        super().__init__(layer, config, name)
        self.base = METHODS.get(config.dsnot_base)(layer, config, name)
        self.stats = InputStats(self.columns, self.device)

    def accumulate(self, x: torch.Tensor) -> None:
        self.stats.add(x)
        if self.base.needs_inputs:
            self.base.add_batch(x)

    def statistics(self) -> list[torch.Tensor]:
        return self.stats.tensors()

    def free(self) -> None:
        super().free()
        self.base.free()
        self.stats = InputStats(0, self.device)

    def select(self, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.layer.weight.detach().clone()
        base_keep = self.base.prune(sparsity)  # may rewrite the weights (SparseGPT); only its mask is used
        keep = refine_mask(
            dense.float(),
            base_keep,
            self.stats,
            cycles=self.config.dsnot_cycles,
            threshold=self.config.dsnot_threshold,
            nm=self.config.nm,
        )
        return keep, dense.float()


def expected_row_errors(weight: torch.Tensor, keep: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
    """DSnoT's objective per row, ``sum_j (W_rj - W'_rj) E[x_j]``, in float64 (signed)."""
    contributions = weight.detach().double() * input_mean.detach().double().unsqueeze(0)
    return contributions.masked_fill(keep, 0).sum(dim=1)


def refine_mask(
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: InputStats,
    *,
    cycles: int,
    threshold: float,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """DSnoT-refined copy of ``keep`` for ``weight`` (``[rows, columns]``) given input statistics.

    Rows are independent, so they are refined in chunks that bound memory.
    """
    if cycles < 1:
        return keep.clone()
    rows, columns = weight.shape
    group = None
    if nm is not None:
        require_nm_fits(columns, *nm)
        group = torch.arange(columns, device=weight.device) // nm[1]
    chunk = max(1, ROW_CHUNK_ELEMENTS // max(columns, 1))
    mean = stats.mean.double()
    variance = stats.variance.double()
    # A feature with zero variance shifts the output by a constant: the ideal
    # weight to revive. A floor (not zero) keeps the growth score finite.
    floor = max(variance.mean().item() * 1e-12, torch.finfo(torch.float64).tiny)
    variance = variance.clamp_min(floor)
    norm = stats.norm.double()
    refined = keep.clone()
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        refined[part] = _refine_rows(weight[part].double(), keep[part], mean, variance, norm, cycles, threshold, group)
    return refined


def _refine_rows(
    weight: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    norm: torch.Tensor,
    cycles: int,
    threshold: float,
    group: torch.Tensor | None,
) -> torch.Tensor:
    """The swap loop for a chunk of rows, all rows in lockstep (at most one swap per row per cycle).

    ``group`` holds each column's N:M group index (``None`` when unstructured).
    """
    keep = keep.clone()
    rows = torch.arange(weight.shape[0], device=weight.device)
    shift = weight * mean.unsqueeze(0)  # a_rj: what pruning W_rj adds to eps_r
    spread = weight.pow(2) * variance.unsqueeze(0)  # what pruning W_rj adds to the output variance
    growth = shift / variance.unsqueeze(0)
    importance = wanda_scores(weight, norm).double()
    error = shift.masked_fill(keep, 0).sum(dim=1)
    fluctuation = spread.masked_fill(keep, 0).sum(dim=1)
    stop_below = error.abs() * threshold
    exhausted = torch.zeros_like(keep)  # revivals already found to have no qualifying partner
    active = error.abs() > stop_below
    for _ in range(cycles):
        if not active.any():
            break
        grow, has_grow = _choose_growth(keep, exhausted, error, shift, growth)
        has_grow &= active
        # the row's state after each candidate swap (grow the chosen one, prune column k)
        error_after = (error - shift[rows, grow]).unsqueeze(1) + shift
        fluctuation_after = (fluctuation - spread[rows, grow]).unsqueeze(1) + spread
        can_prune = (
            keep
            & (error_after.abs() < error.abs().unsqueeze(1))
            & (error_after.pow(2) + fluctuation_after <= (error.pow(2) + fluctuation).unsqueeze(1))
        )
        can_prune[rows, grow] = False
        if group is not None:
            can_prune &= group.unsqueeze(0) == group[grow].unsqueeze(1)
        prune = torch.where(can_prune, importance, torch.inf).argmin(dim=1)
        swap = has_grow & can_prune[rows, prune]
        swapped = rows[swap]
        keep[swapped, grow[swap]] = True
        keep[swapped, prune[swap]] = False
        error = torch.where(swap, error_after[rows, prune], error)
        fluctuation = torch.where(swap, fluctuation_after[rows, prune], fluctuation)
        stuck = has_grow & ~swap
        exhausted[rows[stuck], grow[stuck]] = True
        active = has_grow & (error.abs() > stop_below)
    return keep


def _choose_growth(
    keep: torch.Tensor, exhausted: torch.Tensor, error: torch.Tensor, shift: torch.Tensor, growth: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the pruned column to revive and whether there is one.

    Candidates are pruned weights whose revival alone lowers ``|eps|``:
    ``0 < sign(eps) a_j < 2 |eps|``. Among them the largest
    ``sign(eps) a_j / Var[x_j]`` wins.
    """
    direction = error.sign().unsqueeze(1)
    pull = direction * shift
    allowed = ~keep & ~exhausted & (pull > 0) & (pull < 2 * error.abs().unsqueeze(1))
    choice = torch.where(allowed, direction * growth, -torch.inf).argmax(dim=1)
    return choice, allowed.gather(1, choice.unsqueeze(1)).squeeze(1)
