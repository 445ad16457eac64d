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


@pytest.mark.parametrize("lq,lk,stride", [(4096, 4096, 8), (1000, 3000, 16), (777, 777, 4)])
def test_fused_antidiagonal_scoring_matches_stock_ops(lq, lk, stride):
    """The Triton scoring kernel's block sums equal the stock-op definition in float64 (bf16 inputs)."""
    import math

    from sparsa.attention.antidiagonal import block_mass
    from sparsa.attention.masks import block_aligned
    from sparsa.kernels.antidiagonal_scores import antidiagonal_block_mass

    g = torch.Generator(device="cuda").manual_seed(lq + stride)
    q = torch.randn(1, 8, lq, 128, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(1, 8, lk, 128, device="cuda", generator=g).to(torch.bfloat16)
    block = 128
    qp, kp, _ = block_aligned(q, k, block)
    row0 = (lk - lq) // block * block // stride
    scale = 1.0 / (math.sqrt(128) * stride)
    ref = block_mass(qp.double(), kp.double(), stride, block, row0, lk, scale)
    got = antidiagonal_block_mass(qp, kp, stride, block, row0, lk, scale)
    assert got.shape == ref.shape
    # each row of the block sums holds block / stride units of probability
    assert (got.double() - ref).abs().max().item() < 1e-3 * block / stride


@pytest.mark.parametrize("lq,lk,n", [(5000, 5000, 128), (300, 4099, 64)])
def test_fused_line_scores_match_stock_ops(lq, lk, n):
    """The Triton column/diagonal scores equal the stock-op scores in float64 (bf16 inputs)."""
    import math

    from sparsa.attention.base import last_queries_softmax
    from sparsa.attention.vertical_slash import column_and_diagonal_scores
    from sparsa.kernels.line_scores import last_query_line_scores

    g = torch.Generator(device="cuda").manual_seed(lq + n)
    q = torch.randn(1, 8, lq, 128, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(1, 8, lk, 128, device="cuda", generator=g).to(torch.bfloat16)
    columns, diagonals = column_and_diagonal_scores(last_queries_softmax(q.double(), k.double(), n), lk)
    got_c, got_d = last_query_line_scores(q[..., lq - n :, :], k, lk, 1.0 / math.sqrt(128))
    assert (got_c.double() - columns).abs().max().item() < 1e-3 * n
    assert (got_d.double() - diagonals).abs().max().item() < 1e-3 * n


@pytest.mark.parametrize("shape", [(2, 32, 512, 512), (1, 4, 1000), (3, 7, 4096)])
def test_top_cumulative_kernel_matches_stock_ops(shape):
    """The Triton selection keeps what the stock sort and cumulative sum keep (random rows: no ties)."""
    from sparsa.attention.masks import top_cumulative

    g = torch.Generator(device="cuda").manual_seed(shape[-1])
    probs = torch.rand(shape, device="cuda", generator=g) ** 4
    probs = probs / probs.sum(-1, keepdim=True)
    for threshold in (0.3, 0.9, 0.99):
        got = top_cumulative(probs, threshold)  # the kernel, on CUDA
        want = top_cumulative(probs.cpu(), threshold)
        # float32 sums in another order may move an entry whose mass-before sits on the threshold
        assert (got.cpu() != want).sum().item() <= max(1, probs.numel() // probs.shape[-1] // 1000)


def test_fp8_rows_match_the_reference_rounding():
    from sparsa.kernels.antidiagonal_scores import fp8_rows, fp8_rows_reference

    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(3, 50, 1000, device="cuda", generator=g) * torch.logspace(-3, 3, 50, device="cuda")[:, None]).to(torch.bfloat16)
    x[0, 0] = 0.0  # an all-zero row keeps scale 1
    y, scale = fp8_rows(x)
    assert y.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    amax = x.float().abs().amax(-1)
    assert torch.allclose(scale, torch.where(amax > 0, amax / 448, 1.0), rtol=1e-6)
    assert y.float().abs().amax(-1).le(448).all()
    # the same values as the reference rounding, give or take one e4m3 step where a value sits on a tie
    ref = fp8_rows_reference(x)
    got = y.float() * scale[..., None]
    off = (got - ref).abs() > 1e-6 * ref.abs()
    assert off.float().mean().item() < 1e-3
    assert ((got - ref).abs() <= 0.125 * ref.abs() + 1e-30)[off].all()


@pytest.mark.parametrize("lq,lk,stride", [(4096, 4096, 8), (1000, 3000, 16)])
def test_fused_fp8_antidiagonal_scoring_matches_stock_ops(lq, lk, stride):
    """In fp8 the kernel equals the stock definition on the same rounded rows; the masks barely move from bf16's."""
    import math

    from sparsa.attention.antidiagonal import block_mass
    from sparsa.attention.masks import block_aligned
    from sparsa.kernels.antidiagonal_scores import antidiagonal_block_mass

    g = torch.Generator(device="cuda").manual_seed(lq + stride + 1)
    q = torch.randn(1, 8, lq, 128, device="cuda", generator=g).to(torch.bfloat16)
    k = (torch.randn(1, 8, lk, 128, device="cuda", generator=g) * 4).to(torch.bfloat16)
    block = 128
    qp, kp, _ = block_aligned(q, k, block)
    row0 = (lk - lq) // block * block // stride
    scale = 1.0 / (math.sqrt(128) * stride)
    ref = block_mass(qp.double(), kp.double(), stride, block, row0, lk, scale, fp8=True)
    got = antidiagonal_block_mass(qp, kp, stride, block, row0, lk, scale, fp8=True)
    assert (got.double() - ref).abs().max().item() < 1e-3 * block / stride
    exact = block_mass(qp.double(), kp.double(), stride, block, row0, lk, scale)
    assert (got.double() - exact).abs().max().item() < 3e-2 * block / stride
    bf16 = make_pattern("antidiagonal", block_size=block, stride=stride).mask(q, k).blocks
    fp8 = make_pattern("antidiagonal", block_size=block, stride=stride, fp8=True).mask(q, k).blocks
    assert (bf16 != fp8).sum().item() <= 0.02 * bf16.sum().item()


@pytest.mark.parametrize("head_dim,expected", [(128, "triton"), (256, "flex")])
def test_hf_auto_backend_on_cuda(head_dim, expected):
    """``auto`` runs our Triton kernel for heads up to 128 (FlexAttention above), with the same logits as FlexAttention."""
    from transformers import LlamaForCausalLM

    from sparsa.attention import apply, remove
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(256, hidden_size=4 * head_dim, head_dim=head_dim, intermediate_size=256)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (1, 700), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        apply(model, "streaming", min_len=1, sink_blocks=1, local_blocks=2)
        assert model.model.layers[0].self_attn.sparsa_attention.run_backend(ids.device, head_dim) == expected
        auto = model(ids).logits.float()
        apply(model, "streaming", min_len=1, sink_blocks=1, local_blocks=2, backend="flex")
        flex = model(ids).logits.float()
        remove(model)
    assert ((auto - flex).norm() / flex.norm()).item() < 2e-2
