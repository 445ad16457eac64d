"""Selection of kept weights: exact counts, exact N:M groups, deterministic ties."""

from __future__ import annotations

import pytest
import torch

from sparsa.errors import InputError
from sparsa.prune.patterns import (
    check_nm,
    mask_from_scores,
    mask_nm,
    mask_prune_count,
    mask_unstructured,
    pruned_count,
    sparsity_of,
)


def random_scores(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("shape", [(128, 256), (37, 91)])
def test_unstructured_per_layer_prunes_exact_count_of_lowest(sparsity, shape):
    scores = random_scores(*shape, seed=1)
    keep = mask_unstructured(scores, sparsity, per_row=False)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert (~keep).sum().item() == round(sparsity * scores.numel())
    if 0 < sparsity:
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("shape", [(128, 256), (37, 91)])
def test_unstructured_per_row_prunes_exact_count_in_every_row(sparsity, shape):
    scores = random_scores(*shape, seed=2)
    keep = mask_unstructured(scores, sparsity, per_row=True)
    per_row = (~keep).sum(dim=1)
    assert (per_row == round(sparsity * shape[1])).all()
    for r in range(shape[0]):  # within a row, every pruned score is below every kept one
        assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    # rows compete separately: the layer-wide choice differs on random scores
    assert not torch.equal(keep, mask_unstructured(scores, sparsity, per_row=False))


def test_ties_keep_the_lower_index_and_are_deterministic():
    flat = torch.ones(4, 8)
    keep = mask_unstructured(flat, 0.5, per_row=True)
    assert keep[:, :4].all() and not keep[:, 4:].any()
    assert torch.equal(mask_unstructured(flat, 0.5), mask_unstructured(flat.clone(), 0.5))
    assert torch.equal(mask_nm(flat, 2, 4), torch.tensor([True, True, False, False]).repeat(4, 2))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_exactly_n_best_of_every_m(n, m):
    scores = random_scores(64, 256, seed=3)
    keep = mask_nm(scores, n, m)
    assert check_nm(keep, n, m, exact=True)
    assert sparsity_of(keep) == pytest.approx(1 - n / m, abs=0)
    groups, kept = scores.reshape(64, -1, m), keep.reshape(64, -1, m)
    best_pruned = groups.masked_fill(kept, -1).amax(dim=2)
    worst_kept = groups.masked_fill(~kept, 2).amin(dim=2)
    assert (best_pruned <= worst_kept).all()


def test_nm_that_does_not_divide_raises_one_line_input_error():
    scores = random_scores(8, 1536, seed=4)
    with pytest.raises(InputError) as info:
        mask_nm(scores, 2, 7, name="model.layers.0.mlp.down_proj")
    message = str(info.value)
    assert "\n" not in message
    assert "model.layers.0.mlp.down_proj" in message and "1536" in message and "M=7" in message


def test_nm_needs_n_below_m():
    with pytest.raises(InputError):
        mask_nm(random_scores(4, 8, seed=5), 4, 4)


def test_mask_from_scores_dispatches_on_pattern():
    scores = random_scores(32, 64, seed=6)
    assert torch.equal(mask_from_scores(scores, 0.5, (2, 4)), mask_nm(scores, 2, 4))
    assert torch.equal(mask_from_scores(scores, 0.3, None, per_row=True), mask_unstructured(scores, 0.3, per_row=True))
    assert torch.equal(mask_from_scores(scores, 0.3), mask_unstructured(scores, 0.3, per_row=False))


def test_prune_count_and_rounding():
    assert pruned_count(256, 0.7) == 179  # 179.2
    assert pruned_count(10, 0.75) == 8  # round(7.5) -> 8 (half to even)
    scores = random_scores(3, 10, seed=7)
    assert (~mask_prune_count(scores, 4)).sum() == 4
    assert ((~mask_prune_count(scores, 4, per_row=True)).sum(dim=1) == 4).all()
    with pytest.raises(InputError):
        pruned_count(10, 1.0)


def test_check_nm_detects_violations():
    keep = mask_nm(random_scores(16, 64, seed=8), 2, 4)
    assert check_nm(keep, 2, 4) and check_nm(keep, 2, 4, exact=True)
    sparser = keep.clone()
    sparser[0, :4] = False  # fewer than N kept is still N:M-compatible, but not exact
    assert check_nm(sparser, 2, 4) and not check_nm(sparser, 2, 4, exact=True)
    denser = keep.clone()
    denser[3, 4:8] = True
    assert not check_nm(denser, 2, 4)
    assert not check_nm(torch.ones(4, 10, dtype=torch.bool), 2, 4)  # width not a multiple of M


def test_sparsity_of():
    keep = torch.tensor([[True, False, False, True], [False, False, False, True]])
    assert sparsity_of(keep) == 5 / 8
    assert sparsity_of(torch.ones(3, 3, dtype=torch.bool)) == 0.0


def test_parse_nm_takes_ascii_digits_only():
    from sparsa.prune.config import parse_nm

    assert parse_nm(" 2 : 4 ") == (2, 4)
    for bad in ("²:4", "٢:4", "2:4:8", "a:b", "2:"):
        with pytest.raises(InputError, match="use 'unstructured', 'structured' or N:M"):
            parse_nm(bad)


def test_nm_width_error_names_a_fix_for_every_caller():
    from sparsa.prune.patterns import require_nm_fits

    with pytest.raises(InputError, match=r"choose an M that divides 70, or leave the layer dense \(when pruning: --skip / skip=\)"):
        require_nm_fits(70, 2, 8, name="model.layers.0.mlp.down_proj")
