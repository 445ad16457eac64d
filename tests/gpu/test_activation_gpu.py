"""The sparse GEMV kernel on a CUDA GPU against float64 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from sparsa.kernels.sparse_gemv import GemvConfig, _accumulator, sparse_gemv, transpose_weight  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (3, 1000, 1100), (8, 512, 14336)])
@pytest.mark.parametrize("block_k", [64, 256, 1024])
def test_sparse_gemv_matches_float64(dtype, m, n, k, block_k):
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(dtype)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[torch.rand(m, k, device="cuda", generator=g) < 0.5] = 0
    if m > 1:
        x[0] = 0  # an all-zero token
    x = x.to(dtype)
    ref = x.double() @ w.double().T
    out = sparse_gemv(x, transpose_weight(w), config=GemvConfig(block_k=block_k))
    assert torch.isfinite(out).all()
    if m > 1:
        assert out[0].abs().max() == 0
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < 1e-2, err
    assert int((_accumulator(x.device, 1) != 0).sum()) == 0, "the accumulator was not cleared for the next call"


def test_sparse_gemv_thresholds_match_float64():
    g = torch.Generator(device="cuda").manual_seed(7)
    n, k = 4096, 14336
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(2, k, device="cuda", generator=g).to(torch.bfloat16)
    thr = torch.rand(k, device="cuda", generator=g)
    keep = x.double().abs() >= thr.double()
    ref = (x.double() * keep) @ w.double().T
    out = sparse_gemv(x, transpose_weight(w), threshold=thr)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_sparse_input_linear_kernel_equals_masked_dense(tokens):
    from sparsa.activations.kernel import SparseInputLinear

    g = torch.Generator(device="cuda").manual_seed(tokens)
    linear = torch.nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    thr = torch.rand(1024, device="cuda", generator=g)
    layer = SparseInputLinear(linear, thr)
    x = torch.randn(2, tokens, 1024, device="cuda", generator=g).to(torch.bfloat16)[:1]
    keep = x.double().abs() >= thr.double()
    ref = (x.double() * keep) @ linear.weight.double().T + linear.bias.double()
    out = layer(x)
    assert out.shape == (1, tokens, 768)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_cut_outside_the_gemv_is_exact_on_the_gpu(dtype, per_channel):
    """The prefill cut (one hardshrink, or abs-compare-multiply) keeps exactly |x| >= t as float64 compares it,
    with values placed at, just above and just below the thresholds in x's dtype."""
    from sparsa.activations.cut import prepare_cut

    g = torch.Generator(device="cuda").manual_seed(11 + per_channel)
    k = 1536
    thr = torch.rand(k, device="cuda", generator=g) + 0.05 if per_channel else torch.full((k,), 0.4321, device="cuda")
    x = torch.randn(300, k, device="cuda", generator=g).to(dtype)
    t = thr.to(dtype)
    x[0::5], x[1::5] = t, -torch.nextafter(t, torch.full_like(t, float("-inf")))
    x[2::5] = torch.nextafter(t, torch.full_like(t, float("inf")))
    cut = prepare_cut(thr, dtype, x.device)
    assert (cut.floor is not None) == per_channel
    expected = torch.where(x.double().abs() >= thr.double(), x, torch.zeros_like(x))
    assert torch.equal(cut(x), expected)


def test_measured_configuration_is_cached_and_used(tmp_path, monkeypatch):
    """A layer measures its launch configuration once per shape and token bucket, keeps the fastest, and is exact."""
    import json

    from sparsa.activations.kernel import SparseInputLinear
    from sparsa.kernels import gemv_dispatch

    monkeypatch.setenv("SPARSA_CACHE", str(tmp_path))
    monkeypatch.setattr(gemv_dispatch._CACHE, "_memory", None)
    g = torch.Generator(device="cuda").manual_seed(3)
    linear = torch.nn.Linear(576, 192, bias=False, device="cuda", dtype=torch.bfloat16)
    thr = torch.where(torch.rand(576, device="cuda", generator=g) < 0.5, 0.0, float("inf")).float()
    layer = SparseInputLinear(linear, thr, sparsity=0.5)
    x = torch.randn(1, 3, 576, device="cuda", generator=g).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    keep = x.double().abs() >= thr.double()
    ref = (x.double() * keep) @ linear.weight.double().T
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    entry = json.loads(gemv_dispatch.cache_path().read_text())["entries"]["192x576:m4:bfloat16:s0.50"]
    sparse = {label: t for label, t in entry["times_us"].items() if label != "dense"}
    assert len(sparse) >= 8 and not entry["errors"], entry
    assert entry["config"] == min(sparse, key=sparse.get)
    assert layer._configs[4].key() == entry["config"]


@pytest.mark.parametrize("bias,thresholds", [(False, True), (True, False)])
def test_prepared_driver_launches_take_fresh_inputs(bias, thresholds):
    """After its first call a prepared GEMV launches through the CUDA driver; every later input is its own."""
    from sparsa.kernels.sparse_gemv import PreparedGemv

    g = torch.Generator(device="cuda").manual_seed(11)
    m, n, k = 3, 700, 1000
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    thr = torch.rand(k, device="cuda", generator=g) if thresholds else None
    call = PreparedGemv(transpose_weight(w), b, thr, GemvConfig(32, 128, 1), m)
    for i in range(4):
        x = torch.randn(m, k, device="cuda", generator=g)
        x[torch.rand(m, k, device="cuda", generator=g) < 0.5] = 0
        x = x.to(torch.bfloat16)
        if i == 3:  # a view on an odd offset: not 16-byte aligned, so Triton's launch takes it
            x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(m, k)
        keep = x.double() != 0 if thr is None else x.double().abs() >= thr.double()
        ref = (x.double() * keep) @ w.double().T + (0 if b is None else b.double())
        out = call(x)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2, i
        if i == 1 and torch.version.hip is None:
            assert call._launches, "the second call should launch through the driver"
