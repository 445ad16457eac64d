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
