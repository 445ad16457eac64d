"""SparseGPT: one-shot pruning with optimal weight updates (Frantar & Alistarh, 2023).

Pruning one row ``w`` of a linear layer changes its outputs on the calibration
inputs ``X`` by ``(w - w') X``. With ``H = 2 X^T X / n`` (the Hessian of that
squared error) the Optimal Brain Surgeon answer to "remove weight ``q``" is:

* its cost is ``w_q^2 / [H^-1]_qq``;
* the other weights absorb it through ``delta = -(w_q / [H^-1]_qq) * H^-1[:, q]``.

SparseGPT makes this affordable for LLMs by pruning columns left to right:
after column ``q`` is handled, the remaining problem only involves the
columns to its right, whose inverse Hessians are all read off one upper
Cholesky factor ``U`` of ``H^-1`` (row ``q`` of ``U`` divided by ``U_qq`` is
the update, ``U_qq^2`` plays ``[H^-1]_qq``). Updates inside a block of
``blocksize`` columns are applied immediately; the block's accumulated
effect on the later columns is applied once, as a matrix product ("lazy
batch" updates).

Which weights go is decided per block (adaptive mask selection): when the
sweep reaches a block, the weights with the lowest ``w^2 / U_qq^2`` in it are
pruned, the block's share of the layer budget exactly. Under N:M, each group
of M columns is chosen when the sweep reaches it, from the already-updated
weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ModelError
from .base import METHODS, LayerPruner
from .patterns import mask_nm, mask_prune_count, pruned_count

__all__ = ["SparseGPT", "inverse_hessian_cholesky", "obs_sweep"]


@METHODS.register("sparsegpt")
class SparseGPT(LayerPruner):
    """OBS pruning with weight reconstruction, driven by ``H = 2 X^T X / n``."""

    def __init__(self, layer, config, name) -> None:
        super().__init__(layer, config, name)
        self.hessian = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)

    def accumulate(self, x: torch.Tensor) -> None:
        """Running average ``H <- (n H + 2 x^T x) / (n + t)``, so its scale does not grow with the data."""
        before = self.tokens - x.shape[0]
        with _exact_tf32(self.input_dtype):
            self.hessian.addmm_(x.T, x, beta=before / self.tokens, alpha=2.0 / self.tokens)

    def statistics(self) -> list[torch.Tensor]:
        return [self.hessian]

    def free(self) -> None:
        super().free()
        self.hessian = torch.zeros(0, 0, device=self.device)

    def select(self, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose and update the kept weights. Consumes the Hessian: it is
        factorised in place, so a large layer never holds several copies."""
        weight = self.layer.weight.detach().float().clone()
        upper = inverse_hessian_cholesky(self._take_hessian(weight), self.config.damp, self.name)
        return obs_sweep(weight, upper, sparsity, self.config.blocksize, self.config.nm)

    def _take_hessian(self, weight: torch.Tensor) -> torch.Tensor:
        """Hand over the Hessian (no reference stays here) with dead inputs fixed.

        An input that is zero on every calibration token has no curvature. Its
        weights cannot change the calibration outputs, so they are set to zero
        (and thereby pruned first); a unit diagonal keeps H invertible.
        """
        hessian, self.hessian = self.hessian, torch.zeros(0, 0, device=self.device)
        dead = hessian.diagonal() == 0
        hessian.diagonal()[dead] = 1.0
        weight[:, dead] = 0.0
        return hessian


@contextmanager
def _exact_tf32(source: torch.dtype):
    """Let float32 products use TF32 tensor cores when the inputs came from bf16 or fp16.

    TF32 keeps 11 significant bits, enough to hold any bf16 or fp16 value
    exactly, and products accumulate in float32: X^T X is then as exact as in
    plain float32, about ten times faster on the GPU.
    """
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous or source in (torch.bfloat16, torch.float16)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1``, ``lambda = damp * mean(diag H)``.

    Dampening makes ``H`` safely positive definite when the calibration data
    span few directions. If float32 still fails, the dampening is raised
    tenfold, up to three times, before giving up. ``hessian`` is overwritten
    (dampened in place) and at most two matrices of its size are alive at once.
    """
    lam = damp * hessian.diagonal().mean().item()
    added = 0.0
    for _ in range(4):
        hessian.diagonal().add_(lam - added)
        added = lam
        lower, info = torch.linalg.cholesky_ex(hessian)
        if info.item() == 0:
            del hessian
            inverse = _inverse_from_cholesky(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper
            hessian = torch.linalg.inv(inverse)  # rare: back to H + lambda I for a stronger retry
            del inverse
        lam *= 10
    raise ModelError(
        f"the calibration inputs of {name} are too degenerate to invert their Hessian; "
        "use more (or more varied) calibration samples, or --skip it"
    )


def _inverse_from_cholesky(lower: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 = L^-T L^-1``, with ``L^-1`` solved in place over ``L`` itself.

    ``torch.cholesky_inverse`` would hold three matrices of this size at once
    (L, an identity and the result); this holds two.
    """
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    inverse_lower = torch.linalg.solve_triangular(lower, eye, upper=False, out=eye)
    lower.copy_(inverse_lower.T)
    del eye, inverse_lower  # the L^-1 buffer goes; L^-T stays in L's
    return torch.mm(lower, lower.T)


def obs_sweep(
    weight: torch.Tensor,
    upper: torch.Tensor,
    sparsity: float,
    blocksize: int,
    nm: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (float32 ``[rows, columns]``, updated in place) column by column.

    ``upper`` is the upper Cholesky factor of the inverse Hessian. Returns the
    keep-mask and the reconstructed weights (pruned entries exactly zero).
    """
    rows, columns = weight.shape
    keep = torch.ones(rows, columns, dtype=torch.bool, device=weight.device)
    if nm is not None:  # a block must hold whole N:M groups
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = weight[:, start:end]
        block_upper = upper[start:end, start:end]
        if nm is None:
            budget = pruned_count(rows * end, sparsity) - pruned_count(rows * start, sparsity)
            keep[:, start:end] = mask_prune_count(_obs_scores(block, block_upper.diagonal()), budget)
        errors = _prune_block(block, block_upper, keep[:, start:end], nm)
        weight[:, end:] -= errors @ upper[start:end, end:]
    return keep, weight


def _obs_scores(weights: torch.Tensor, upper_diagonal: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``w^2 / [H^-1]_qq`` (with ``U_qq^2`` standing for ``[H^-1]_qq``)."""
    return weights.pow(2) / upper_diagonal.pow(2).unsqueeze(0)


def _prune_block(
    block: torch.Tensor, upper: torch.Tensor, keep: torch.Tensor, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Prune one block in place, column by column; return the scaled errors for the lazy update.

    ``keep`` (a view into the layer's mask) is filled group by group under N:M.
    """
    errors = torch.zeros_like(block)
    diagonal = upper.diagonal()
    for q in range(block.shape[1]):
        if nm is not None and q % nm[1] == 0:
            group = slice(q, q + nm[1])
            keep[:, group] = mask_nm(_obs_scores(block[:, group], diagonal[group]), *nm)
        pruned = block[:, q] * keep[:, q]
        error = (block[:, q] - pruned) / diagonal[q]
        block[:, q:] -= error.unsqueeze(1) * upper[q, q:].unsqueeze(0)
        block[:, q] = pruned  # exactly zero where pruned, exactly unchanged where kept
        errors[:, q] = error
    return errors
