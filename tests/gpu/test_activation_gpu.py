"""The sparse GEMV kernel on a CUDA GPU against float64 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from sparsa.kernels.sparse_gemv import sparse_gemv, transpose_weight  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (3, 1000, 1100), (8, 512, 14336)])
@pytest.mark.parametrize("split", [1, 4])
def test_sparse_gemv_matches_float64(dtype, m, n, k, split):
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(dtype)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[torch.rand(m, k, device="cuda", generator=g) < 0.5] = 0
    if m > 1:
        x[0] = 0  # an all-zero token
    x = x.to(dtype)
    ref = x.double() @ w.double().T
    out = sparse_gemv(x, transpose_weight(w), split_k=split)
    assert torch.isfinite(out).all()
    if m > 1:
        assert out[0].abs().max() == 0
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < 1e-2, err
