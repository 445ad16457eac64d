"""Block-sparse attention backends on a CUDA GPU against a float64 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from sparsa.attention import attend, make_pattern  # noqa: E402

SETTINGS = {
    "streaming": dict(local_blocks=2),
    "vertical_slash": dict(vertical=64, slash=64),
    "antidiagonal": dict(threshold=0.8),
    "flexprefill": dict(coverage=0.8),
    "quest": dict(pages=3),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (300, 1000), (1, 777)])
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_backends_match_float64(name, lq, lk, backend):
    g = torch.Generator(device="cuda").manual_seed(lq + lk)
    q = torch.randn(1, 8, lq, 64, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(1, 2, lk, 64, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(1, 2, lk, 64, device="cuda", generator=g).to(torch.bfloat16)
    mask = make_pattern(name, block_size=64, **SETTINGS[name]).mask(q, k.repeat_interleave(4, 1))
    ref = attend(q.double(), k.double(), v.double(), mask, backend="reference")
    out = attend(q, k, v, mask, backend=backend)
    assert out.shape == q.shape and torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err
