"""Block-sparse attention backends on a CUDA GPU against a float64 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from sparsa.attention import attend, make_pattern  # noqa: E402
from sparsa.models.adapters import cache_keyword  # noqa: E402

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


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hkv,d,length,n", [(1, 9, 3, 64, 2083, 576), (2, 32, 8, 128, 5000, 320), (3, 4, 4, 80, 300, 130)])
def test_slot_attention_matches_float64(dtype, b, h, hkv, d, length, n, per_head):
    """The decode kernel over chosen cache slots equals a float64 softmax over the kept slots, fresh inputs;
    one list of slots for every head, or one per query head (quest)."""
    from sparsa.kernels.slot_attention import slot_attention

    g = torch.Generator(device="cuda").manual_seed(b * 1000 + n + per_head)
    q = torch.randn(b, h, 1, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, device="cuda", generator=g).to(dtype)
    lists = (b, h, n) if per_head else (b, n)
    index = torch.randint(0, length, lists, device="cuda", generator=g)
    keep = torch.rand(lists, device="cuda", generator=g) < 0.8
    keep[..., :64] = False  # a chunk of nothing kept
    keep[..., -1] = True
    out = slot_attention(q, k, v, index, keep, 0.125)
    group = h // hkv
    ref = torch.empty(b, 1, h, d, dtype=torch.float64, device="cuda")
    for r in range(b):
        for head in range(h):
            slots = index[r, head][keep[r, head]] if per_head else index[r][keep[r]]
            kk, vv = k[r, head // group, slots].double(), v[r, head // group, slots].double()
            ref[r, 0, head] = torch.softmax(q[r, head, 0].double() @ kk.T * 0.125, dim=-1) @ vv
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_hf_streaming_decode_over_a_static_cache_runs_the_slot_kernel():
    """In bf16 on a GPU a static cache's decode step reads its slots with the kernel, and matches the dynamic
    cache's slices (SDPA) within bf16 rounding."""
    from transformers import DynamicCache, LlamaForCausalLM, StaticCache

    from sparsa.attention import apply, remove
    from sparsa.kernels import slot_attention as kernel
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(256, max_position_embeddings=1024)).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 300), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    calls = []
    original = kernel.slot_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    apply(model, "streaming", min_len=1, block_size=32, sink_blocks=1, local_blocks=2)

    def decode(cache):
        logits = []
        with torch.no_grad():
            out = model(ids, **{cache_keyword(model): cache}, use_cache=True, cache_position=torch.arange(300, device="cuda"))
            for step in range(4):  # the same tokens for both caches: bf16 rounding may not steer them apart
                nxt = ids[:, step:step + 1]
                out = model(nxt, **{cache_keyword(model): cache}, use_cache=True, cache_position=torch.tensor([300 + step], device="cuda"))
                logits.append(out.logits.float())
        return torch.cat(logits, 1)

    import sparsa.attention.hf as hf

    hf.slot_attention, saved = counted, hf.slot_attention
    try:
        static = decode(StaticCache(config=model.config, max_cache_len=320))
    finally:
        hf.slot_attention = saved
    dynamic = decode(DynamicCache())
    remove(model)
    assert len(calls) == 4 * model.config.num_hidden_layers
    assert ((static - dynamic).norm() / dynamic.norm()).item() < 2e-2


def test_hf_quest_decode_over_a_static_cache_runs_the_slot_kernel():
    """In bf16 on a GPU quest's static-cache decode step (page bounds kept between steps, pages chosen in one
    launch) reads one list of slots per query head with the kernel, and matches the dynamic cache's block-sparse
    step within bf16 rounding."""
    from transformers import DynamicCache, LlamaForCausalLM, StaticCache

    import sparsa.attention.hf as hf
    from sparsa.attention import apply, remove
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(256, max_position_embeddings=1024)).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 300), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    calls = []
    original = hf.slot_attention

    def counted(q, k, v, index, keep, scale):
        calls.append(index.dim())
        return original(q, k, v, index, keep, scale)

    apply(model, "quest", min_len=1, block_size=32, pages=3)

    def decode(cache, steps=4):
        logits = []
        with torch.no_grad():
            model(ids, **{cache_keyword(model): cache}, use_cache=True, cache_position=torch.arange(300, device="cuda"))
            for step in range(steps):  # the same tokens for both caches
                out = model(ids[:, step:step + 1], **{cache_keyword(model): cache}, use_cache=True,
                            cache_position=torch.tensor([300 + step], device="cuda"))
                logits.append(out.logits.float())
        return torch.cat(logits, 1)

    hf.slot_attention = counted
    try:
        static = decode(StaticCache(config=model.config, max_cache_len=320))
    finally:
        hf.slot_attention = original
    dynamic = decode(DynamicCache())
    assert calls == [3] * (4 * model.config.num_hidden_layers)  # per-query-head lists, every layer, every step
    assert ((static - dynamic).norm() / dynamic.norm()).item() < 2e-2

    remove(model)
