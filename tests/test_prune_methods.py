"""Pruning methods on one linear layer with LLM-like inputs, checked against float64 references.

The inputs are correlated (a random mixing matrix) and a few channels have
~20x larger activations and nonzero means, as the outlier features of real
LLMs do. On such data the methods are expected to rank
SparseGPT < Wanda < magnitude in reconstruction error ``||W X - W' X||_F``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from sparsa.errors import InputError, ModelError
from sparsa.prune import dsnot, magnitude, sparsegpt, wanda  # noqa: F401  (registers the methods)
from sparsa.prune.base import METHODS
from sparsa.prune.config import PruneConfig
from sparsa.prune.dsnot import expected_row_errors
from sparsa.prune.owl import outlier_ratio, owl_budgets
from sparsa.prune.patterns import check_nm, pruned_count, sparsity_of

IN, OUT = 256, 128
OUTLIERS = 8


class Inputs:
    """A fixed input distribution: correlated channels, a few large ones with large means."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mixing = torch.randn(IN, IN, generator=g) / IN**0.5 + torch.eye(IN)
        self.scale = torch.ones(IN)
        self.outliers = torch.randperm(IN, generator=g)[:OUTLIERS]
        self.scale[self.outliers] = 20.0
        self.mean = 0.3 * torch.randn(IN, generator=g)
        self.mean[self.outliers] *= 10

    def draw(self, tokens: int, seed: int) -> torch.Tensor:
        z = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(seed))
        return (z @ self.mixing) * self.scale + self.mean


@pytest.fixture(scope="module")
def data() -> Inputs:
    return Inputs(seed=0)


@pytest.fixture(scope="module")
def calibration(data) -> torch.Tensor:
    return data.draw(4096, seed=1)


@pytest.fixture(scope="module")
def held_out(data) -> torch.Tensor:
    return data.draw(4096, seed=2)


@pytest.fixture
def layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=False)


def prune(layer: nn.Linear, x: torch.Tensor, method: str, pattern: str = "unstructured", sparsity: float = 0.5, **options):
    """Run the pipeline's contract on a copy of ``layer``; return (keep-mask, pruned copy, pruner)."""
    config = PruneConfig(method=method, pattern=pattern, sparsity=sparsity, **options)
    pruned = copy.deepcopy(layer)
    pruner = METHODS.get(method)(pruned, config, "test.linear")
    if pruner.needs_inputs:
        for batch in x.split(500):  # uneven batches, 3-D like a decoder's activations
            pruner.add_batch(batch.unsqueeze(0))
    keep = pruner.prune(config.sparsity)
    return keep, pruned, pruner


def reconstruction_error(dense: nn.Linear, pruned: nn.Linear, x: torch.Tensor) -> float:
    """``||W X - W' X||_F`` in float64."""
    delta = dense.weight.detach().double() - pruned.weight.detach().double()
    return (delta @ x.double().T).norm().item()


# -- registry and contract ---------------------------------------------------------------

def test_methods_are_registered():
    assert {"magnitude", "wanda", "sparsegpt", "dsnot"} <= set(METHODS.names())
    assert METHODS.get("magnitude").needs_inputs is False
    assert all(METHODS.get(m).needs_inputs for m in ("wanda", "sparsegpt", "dsnot"))
    with pytest.raises(InputError):
        METHODS.get("no-such-method")


CASES = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
@pytest.mark.parametrize("pattern,sparsity", CASES)
def test_masks_meet_pattern_and_exact_sparsity(layer, calibration, method, pattern, sparsity):
    keep, pruned, _ = prune(layer, calibration, method, pattern, sparsity)
    weight = pruned.weight.detach()
    assert keep.shape == weight.shape and keep.dtype == torch.bool
    assert (weight[~keep] == 0).all()
    if pattern == "unstructured":
        per_row = method in ("wanda", "dsnot")  # Wanda (and DSnoT on it) compare within a row
        if per_row:
            assert ((~keep).sum(dim=1) == pruned_count(IN, sparsity)).all()
        else:
            assert (~keep).sum().item() == pruned_count(weight.numel(), sparsity)
    else:
        n, m = map(int, pattern.split(":"))
        assert check_nm(keep, n, m, exact=True)
        assert check_nm(weight != 0, n, m)
        assert sparsity_of(keep) == 1 - n / m
    if method != "sparsegpt":  # only SparseGPT changes the kept weights
        assert torch.equal(weight[keep], layer.weight.detach()[keep])


def test_pruning_keeps_the_weight_dtype(layer, calibration):
    half = copy.deepcopy(layer).to(torch.bfloat16)
    for method in ("magnitude", "wanda", "sparsegpt", "dsnot"):
        keep, pruned, _ = prune(half, calibration.to(torch.bfloat16), method, "2:4")
        assert pruned.weight.dtype == torch.bfloat16
        assert check_nm(pruned.weight != 0, 2, 4)


# -- reconstruction quality ----------------------------------------------------------------

@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", 0.5), ("unstructured", 0.7)])
def test_reconstruction_error_ranks_sparsegpt_wanda_magnitude(layer, calibration, held_out, pattern, sparsity):
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt", "dsnot"):
        _, pruned, _ = prune(layer, calibration, method, pattern, sparsity)
        errors[method] = reconstruction_error(layer, pruned, held_out)
    print(f"\n{pattern} {sparsity}: " + ", ".join(f"{k} {v:.1f}" for k, v in errors.items()))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
    assert errors["dsnot"] < errors["magnitude"]


def test_sparsegpt_update_beats_its_own_mask_alone(layer, calibration, held_out):
    keep, pruned, _ = prune(layer, calibration, "sparsegpt")
    masked_only = copy.deepcopy(layer)
    with torch.no_grad():
        masked_only.weight.mul_(keep)
    assert reconstruction_error(layer, pruned, held_out) < 0.9 * reconstruction_error(layer, masked_only, held_out)


def test_sparsegpt_lazy_blocks_match_one_block_under_nm(layer, calibration):
    """Under N:M the mask does not depend on blocks, so lazy batching must give the same weights."""
    _, small, _ = prune(layer, calibration, "sparsegpt", "2:4", blocksize=6)  # rounded to 4
    _, whole, _ = prune(layer, calibration, "sparsegpt", "2:4", blocksize=IN)
    torch.testing.assert_close(small.weight, whole.weight, rtol=1e-4, atol=1e-5)


def test_sparsegpt_at_zero_sparsity_changes_nothing(layer, calibration):
    keep, pruned, _ = prune(layer, calibration, "sparsegpt", sparsity=0.0)
    assert keep.all()
    torch.testing.assert_close(pruned.weight, layer.weight)


def test_sparsegpt_handles_dead_inputs(layer, calibration):
    x = calibration.clone()
    x[:, :5] = 0  # features that never fire
    keep, pruned, _ = prune(layer, x, "sparsegpt")
    assert torch.isfinite(pruned.weight).all()
    assert not keep[:, :5].any()  # free to drop: they change nothing on the calibration data
    assert (~keep).sum().item() == OUT * IN // 2


# -- DSnoT ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)])
def test_dsnot_never_increases_its_objective(layer, calibration, base, pattern, sparsity):
    base_keep, _, _ = prune(layer, calibration, base, pattern, sparsity)
    keep, pruned, pruner = prune(layer, calibration, "dsnot", pattern, sparsity, dsnot_base=base)
    # with the statistics DSnoT optimised (float32 running mean), exactly
    before = expected_row_errors(layer.weight, base_keep, pruner.stats.mean).abs()
    after = expected_row_errors(layer.weight, keep, pruner.stats.mean).abs()
    assert (after <= before).all()
    assert (after < before).float().mean() > 0.5  # and it does improve most rows
    assert after.sum() < 0.5 * before.sum()
    # with a float64 mean of the same inputs, up to float32 accumulation error
    exact_mean = calibration.double().mean(dim=0)
    scale = (layer.weight.detach().double().abs() * exact_mean.abs()).sum(dim=1)
    before64 = expected_row_errors(layer.weight, base_keep, exact_mean).abs()
    after64 = expected_row_errors(layer.weight, keep, exact_mean).abs()
    assert (after64 <= before64 + 1e-5 * scale).all()
    # the base's sparsity and pattern survive the swaps; kept weights keep their dense values
    assert torch.equal((~keep).sum(dim=1), (~base_keep).sum(dim=1))
    if pattern != "unstructured":
        assert check_nm(keep, *map(int, pattern.split(":")), exact=True)
    assert torch.equal(pruned.weight.detach()[keep], layer.weight.detach()[keep])


def test_dsnot_without_cycles_is_its_base(layer, calibration):
    base_keep, base_layer, _ = prune(layer, calibration, "wanda", "2:4")
    keep, pruned, _ = prune(layer, calibration, "dsnot", "2:4", dsnot_cycles=0)
    assert torch.equal(keep, base_keep)
    assert torch.equal(pruned.weight, base_layer.weight)


def test_dsnot_cannot_refine_itself(layer):
    with pytest.raises(InputError):
        METHODS.get("dsnot")(layer, PruneConfig(method="dsnot", dsnot_base="dsnot"), "test.linear")


# -- bad weights and inputs ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_nan_weights_raise_before_anything_changes(layer, calibration, method):
    broken = copy.deepcopy(layer)
    with torch.no_grad():
        broken.weight[3, 7] = math.nan
    before = broken.weight.detach().clone()
    with pytest.raises(ModelError, match="test.linear"):
        prune(broken, calibration, method)
    pruner = METHODS.get(method)(broken, PruneConfig(method=method), "test.linear")
    if pruner.needs_inputs:
        pruner.add_batch(calibration)
    with pytest.raises(ModelError) as info:
        pruner.prune(0.5)
    assert "test.linear" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(broken.weight.isnan(), before.isnan())
    assert torch.equal(broken.weight.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "dsnot"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_raise_naming_the_layer(layer, calibration, method, bad):
    x = calibration.clone()
    x[10, 20] = bad
    target = copy.deepcopy(layer)
    pruner = METHODS.get(method)(target, PruneConfig(method=method), "test.linear")
    pruner.add_batch(x)
    with pytest.raises(ModelError, match="test.linear"):
        pruner.prune(0.5)
    assert torch.equal(target.weight, layer.weight)


def test_no_inputs_and_wrong_width_raise_input_error(layer, calibration):
    pruner = METHODS.get("wanda")(copy.deepcopy(layer), PruneConfig(), "test.linear")
    with pytest.raises(InputError, match="test.linear"):
        pruner.prune(0.5)
    with pytest.raises(InputError, match="test.linear"):
        pruner.add_batch(calibration[:, :100])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_nm_that_does_not_divide_raises_naming_the_layer(method):
    odd = nn.Linear(250, 16, bias=False)
    before = odd.weight.detach().clone()
    pruner = METHODS.get(method)(odd, PruneConfig(method=method, pattern="2:4"), "model.layers.0.mlp.down_proj")
    if pruner.needs_inputs:
        pruner.add_batch(torch.randn(64, 250))
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.down_proj has 250 input features.*M=4"):
        pruner.prune(0.5)
    assert torch.equal(odd.weight, before)


def test_free_drops_statistics(layer, calibration):
    _, _, pruner = prune(layer, calibration, "sparsegpt")
    pruner.free()
    assert pruner.hessian.numel() == 0 and pruner.tokens == 0


# -- OWL ---------------------------------------------------------------------------------------

def test_owl_budgets_average_to_target_and_order_inversely_to_ratios():
    ratios = torch.rand(24, generator=torch.Generator().manual_seed(3)).tolist()
    budgets = owl_budgets(ratios, target=0.7, lam=0.08)
    assert sum(budgets) / len(budgets) == pytest.approx(0.7, abs=1e-12)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    ordered = [budgets[i] for i in order]
    assert all(a > b for a, b in zip(ordered, ordered[1:]))  # more outliers -> lower sparsity
    assert max(budgets) - min(budgets) == pytest.approx(0.16, abs=1e-12)


def test_owl_budgets_weighted_mean_and_clamping():
    ratios = [0.01, 0.05, 0.2, 0.02]
    sizes = [100, 300, 50, 1000]
    budgets = owl_budgets(ratios, target=0.5, lam=0.2, weights=sizes)
    assert sum(b * w for b, w in zip(budgets, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    assert budgets[2] == min(budgets) and budgets[0] == max(budgets)
    clamped = owl_budgets([0.0, 1.0, 1.0, 1.0], target=0.9, lam=0.5)
    assert all(0 <= b <= 0.99 for b in clamped) and clamped[0] == 0.99
    assert sum(clamped) / 4 == pytest.approx(0.9, abs=1e-12)
    assert owl_budgets([0.3, 0.3, 0.3], target=0.6, lam=0.1) == pytest.approx([0.6, 0.6, 0.6], abs=1e-12)


def test_owl_rejects_bad_arguments():
    with pytest.raises(InputError):
        owl_budgets([], 0.5, 0.1)
    with pytest.raises(InputError):
        owl_budgets([0.1, math.nan], 0.5, 0.1)
    with pytest.raises(InputError):
        owl_budgets([0.1, 0.2], 0.5, 0.1, weights=[1.0])


def test_outlier_ratio_counts_scores_far_above_the_mean():
    scores = torch.ones(1000)
    scores[:10] = 100.0  # mean = 1.99; threshold 5 -> 9.95
    assert outlier_ratio(scores, threshold=5.0) == pytest.approx(0.01)
    assert outlier_ratio(torch.ones(10, 10), threshold=5.0) == 0.0


def test_owl_ratio_is_higher_for_a_layer_reading_outlier_features(layer, calibration):
    _, _, pruner = prune(layer, calibration, "wanda")
    with_outliers = wanda.wanda_scores(layer.weight, pruner.stats.norm)
    flat_inputs = wanda.wanda_scores(layer.weight, torch.ones(IN))
    assert outlier_ratio(with_outliers, 5.0) > outlier_ratio(flat_inputs, 5.0)
