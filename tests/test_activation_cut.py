"""The cut outside the GEMV keeps exactly the values whose magnitude reaches the float32 threshold, in every dtype."""

import pytest
import torch
import torch.nn as nn

from sparsa.activations.base import Site
from sparsa.activations.cut import prepare_cut
from sparsa.activations.kernel import SparseInputLinear

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reference(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x * (|x| >= t)`` with the comparison made in float64 (exact for all these dtypes)."""
    return torch.where(x.double().abs() >= threshold.double(), x, torch.zeros_like(x))


def values_at_the_edges(dtype: torch.dtype, channels: int, thresholds: torch.Tensor, seed: int) -> torch.Tensor:
    """Random values, with a third of them exactly at, just below and just above each channel's threshold in x's dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, channels, generator=g).to(dtype)
    t = thresholds.expand(channels).to(dtype)
    up = torch.nextafter(t, torch.full_like(t, float("inf")))
    down = torch.nextafter(t, torch.full_like(t, float("-inf")))
    x[0::6], x[1::6], x[2::6] = t, up, -down
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_one_threshold_is_exact_in_every_dtype(dtype, seed):
    g = torch.Generator().manual_seed(100 + seed)
    t = float(torch.rand(1, generator=g) + 0.1)  # a float32 value that x's dtype may not hold
    t = float(torch.tensor(t, dtype=torch.float32))
    x = values_at_the_edges(dtype, 64, torch.tensor([t]), seed)
    cut = prepare_cut(t, dtype)
    assert cut.bound is not None and cut.floor is None  # one hardshrink
    expected = reference(x, torch.tensor(t))
    assert torch.equal(cut(x), expected)
    assert torch.equal(cut.keep(x), x.double().abs() >= t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_thresholds_are_exact_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    thresholds = torch.rand(96, generator=g) * 2  # float32
    x = values_at_the_edges(dtype, 96, thresholds, 3)
    cut = prepare_cut(thresholds, dtype)
    assert cut.floor is not None and cut.floor.dtype == dtype
    assert torch.equal(cut(x), reference(x, thresholds))


def test_equal_channel_thresholds_become_one_bound_and_nothing_is_cut_below_zero():
    assert prepare_cut(torch.full((8,), 0.25), torch.bfloat16).bound is not None
    x = torch.randn(4, 8)
    for t in (float("-inf"), 0.0, -1.0, None):
        cut = prepare_cut(t, torch.float32)
        assert cut.bound is None and cut.floor is None and cut(x) is x
    everything = prepare_cut(float("inf"), torch.bfloat16)
    assert not everything(x.bfloat16()).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_site_and_layer_cut_as_the_reference(dtype):
    """A hooked site (scaled and not) and SparseInputLinear's dense path compute the reference cut, and count what it cut."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(dtype)
    x = torch.randn(5, 64).to(dtype)
    plain = Site("p", linear, "input", None, threshold=0.6)
    scale = torch.rand(64).to(dtype) + 0.5
    scaled = Site("s", linear, "input", scale, threshold=0.6)
    for site in (plain, scaled):
        per_channel = site.channel_thresholds(64)
        expected = reference(x, per_channel)
        assert torch.equal(site.cut(x, track=True), expected)
        assert (site.zeros, site.total) == (int((x.double().abs() < per_channel.double()).sum()), x.numel())
        layer = SparseInputLinear(linear, per_channel)
        ref = torch.nn.functional.linear(expected.double(), linear.weight.double(), linear.bias.double())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert torch.allclose(layer(x).double(), ref, atol=tol, rtol=tol)
    site = plain
    site.threshold = 10.0  # a new threshold is prepared anew
    assert not site.cut(x, track=False).any()


def test_cuts_follow_threshold_updates_and_round_as_the_gemv_stores():
    """A layer's cut follows thresholds loaded in place; a float threshold is the float32 the GEMV keeps; NaN cuts all."""
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    layer = SparseInputLinear(linear, torch.full((16,), 0.1))
    x = torch.randn(3, 16)
    before = layer(x)
    layer.load_state_dict({**layer.state_dict(), "threshold": torch.full((16,), 10.0)})  # copied in place
    assert torch.allclose(layer(x), linear.bias.expand(3, 8)) and not torch.allclose(before, layer(x))
    t = 0.7  # float32 rounds it down: float32(0.7) itself is kept by the GEMV's comparison
    kept = torch.tensor([float(torch.tensor(t, dtype=torch.float32))])
    assert torch.equal(Site("s", linear, "input", None, threshold=t).cut(kept, track=False), kept)
    assert not prepare_cut(float("nan"), torch.bfloat16)(torch.ones(4, dtype=torch.bfloat16)).any()
    assert not prepare_cut(torch.full((4,), float("nan")), torch.float32)(torch.ones(4)).any()


@pytest.mark.parametrize("threshold", [0.5, torch.tensor([0.5, 0.2, 0.9, 0.1]), float("nan"), None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inputs_pass_every_cut(threshold, dtype):
    """A NaN input stays NaN through the cut, as the GEMV keeps it (a broken model shows, whatever the thresholds)."""
    x = torch.tensor([float("nan"), 0.05, float("nan"), 3.0], dtype=dtype)
    out = prepare_cut(threshold, dtype)(x)
    assert out[[0, 2]].isnan().all() and not out[[1, 3]].isnan().any()
