"""Sparse attention: block masks, backends against a float64 reference, and the Hugging Face plug-in."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from sparsa.attention import BACKENDS, PATTERNS, apply, attend, make_pattern, remove
from sparsa.attention import masks as M
from sparsa.errors import InputError
from sparsa.models.adapters import cache_keyword, returned_cache

from conftest import tiny_llama_config

CACHE = cache_keyword(LlamaForCausalLM)  # how this transformers version's forward takes the KV cache

# settings that keep every causal block (each pattern at full density)
FULL = {
    "streaming": dict(local_blocks=1000),
    "vertical_slash": dict(vertical=10_000, slash=10_000),
    "antidiagonal": dict(threshold=1.0),
    "flexprefill": dict(coverage=1.0, divergence=10.0),
    "quest": dict(pages=1000),
}
SPARSE = {
    "streaming": dict(sink_blocks=1, local_blocks=2),
    "vertical_slash": dict(vertical=2, slash=2, last_q=32),
    "antidiagonal": dict(stride=4, threshold=0.5),
    "flexprefill": dict(coverage=0.5),
    "quest": dict(pages=2),
}
BLOCK = 32


def qkv(seed: int, b=2, h=4, hkv=2, lq=200, lk=200, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q, k, v


def expand(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def reference64(q, k, v, allowed):
    """float64 softmax attention restricted to ``allowed [B, H, Lq, Lk]``."""
    ke, ve = expand(k, q.shape[1]).double(), expand(v, q.shape[1]).double()
    scores = (q.double() @ ke.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ ve


def causal(lq, lk):
    rows = torch.arange(lk - lq, lk)
    return torch.arange(lk)[None, :] <= rows[:, None]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_every_pattern_is_registered():
    assert set(PATTERNS.names()) == set(FULL)
    assert set(BACKENDS.names()) >= {"reference", "flex", "masked", "triton"}


@pytest.mark.parametrize("name", sorted(FULL))
@pytest.mark.parametrize("lq", [200, 45, 1])
def test_full_density_equals_dense(name, lq):
    q, k, v = qkv(1, lq=lq)
    mask = make_pattern(name, block_size=BLOCK, **FULL[name]).mask(q, expand(k, q.shape[1]))
    assert mask.density() == pytest.approx(1.0)
    ref = reference64(q, k, v, causal(lq, 200).expand(2, 4, lq, 200))
    for backend in ("reference", "flex", "masked"):
        assert rel(attend(q, k, v, mask, backend=backend), ref) < 1e-5, backend


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("lq", [200, 45, 1])
def test_sparse_masks_are_causal_and_backends_agree(name, lq):
    q, k, v = qkv(2 + lq, lq=lq, lk=200)
    mask = make_pattern(name, block_size=BLOCK, **SPARSE[name]).mask(q, expand(k, q.shape[1]))
    tokens = mask.token_mask()
    assert not (tokens & ~causal(lq, 200)).any(), "a mask lets a query see the future"
    assert tokens.any(-1).all(), "every query keeps at least one key"
    if lq > 1:
        assert mask.density() < 1.0, f"{name} kept everything at sparse settings"
    ref = reference64(q, k, v, tokens)
    for backend in ("reference", "flex", "masked"):
        assert rel(attend(q, k, v, mask, backend=backend), ref) < 1e-5, backend


def test_masked_backend_in_row_chunks_equals_one_piece(monkeypatch):
    """The CPU path never builds the whole L x L mask: chunks of query rows give the same output."""
    import sparsa.attention.backends as backends

    q, k, v = qkv(21, lq=150, lk=333)
    mask = make_pattern("vertical_slash", block_size=BLOCK, **SPARSE["vertical_slash"]).mask(q, expand(k, q.shape[1]))
    whole = attend(q, k, v, mask, backend="masked")
    monkeypatch.setattr(backends, "MASKED_CHUNK_ELEMENTS", 2 * 4 * 333 * 7)  # 7 query rows at a time
    assert rel(attend(q, k, v, mask, backend="masked"), whole) < 1e-6
    assert rel(whole, reference64(q, k, v, mask.token_mask())) < 1e-5


def test_streaming_is_sinks_plus_window():
    q, k, _ = qkv(3, b=1, h=1, hkv=1, lq=256, lk=256)
    blocks = make_pattern("streaming", block_size=BLOCK, sink_blocks=1, local_blocks=2).mask(q, k).blocks[0, 0]
    for qb in range(8):
        assert blocks[qb].nonzero().flatten().tolist() == sorted({0, max(qb - 1, 0), qb})


@pytest.mark.parametrize("lq,lk,block", [(1, 257, 64), (5, 300, 16), (100, 100, 64), (257, 1025, 128), (64, 1024, 32)])
def test_causal_block_count_and_density_tensor(lq, lk, block):
    assert M.causal_block_count(lq, lk, block) == int(M.causal_blocks(lq, lk, block).sum())
    mask = make_pattern("streaming", block_size=block, sink_blocks=1, local_blocks=2).mask(torch.zeros(2, 3, lq, 8), torch.zeros(2, 1, lk, 8))
    exact = float(mask.blocks.sum()) / float(M.causal_blocks(lq, lk, block).sum() * 6)
    assert mask.density_tensor().dtype == torch.float32 and mask.density() == pytest.approx(exact, rel=1e-6)


def test_vertical_slash_finds_a_planted_column():
    q, k, _ = qkv(4, b=1, h=1, hkv=1, lq=256, lk=256)
    k[..., 100, :] = q[..., -32:, :].mean(dim=-2) * 50  # every late query attends key 100
    mask = make_pattern("vertical_slash", block_size=BLOCK, vertical=1, slash=1, last_q=32).mask(q, k)
    assert mask.blocks[0, 0, -1, 100 // BLOCK]


def test_top_cumulative_and_js():
    from sparsa.attention.flexprefill import js_divergence

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert M.top_cumulative(p, 0.7).tolist() == [[True, True, False, False]]
    assert M.top_cumulative(p, 0.81).tolist() == [[True, True, True, False]]
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2), rel=1e-5)


def test_quest_with_every_page_is_dense_decoding():
    q, k, v = qkv(5, lq=1, lk=333)
    mask = make_pattern("quest", block_size=BLOCK, pages=1000).mask(q, expand(k, 4))
    assert mask.blocks.all()
    ref = reference64(q, k, v, causal(1, 333).expand(2, 4, 1, 333))
    assert rel(attend(q, k, v, mask), ref) < 1e-5


def test_quest_bound_is_an_upper_bound():
    from sparsa.attention.quest import page_bounds

    q, k, _ = qkv(6, b=1, h=1, hkv=1, lq=1, lk=128)
    lo, hi = page_bounds(k, BLOCK)
    bound = torch.maximum(q[..., None, :] * lo[..., None, :, :], q[..., None, :] * hi[..., None, :, :]).sum(-1)
    scores = (q @ k.transpose(-1, -2)).reshape(1, 1, 1, 4, BLOCK).amax(-1)
    assert (scores <= bound + 1e-5).all()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(InputError, match="no setting"):
        make_pattern("streaming", window=3)
    with pytest.raises(InputError, match="unknown attention pattern"):
        make_pattern("nope")
    with pytest.raises(InputError, match="block_size"):
        make_pattern("quest", block_size=48)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture()
def tiny_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(256, max_position_embeddings=1024)).eval()
    return model


def test_hf_full_density_matches_dense_and_remove_restores(tiny_llama):
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        apply(tiny_llama, "antidiagonal", min_len=1, block_size=BLOCK, threshold=1.0)
        same = tiny_llama(ids).logits
        assert (same - dense).abs().max() < 1e-4
        apply(tiny_llama, "streaming", min_len=1, block_size=BLOCK, sink_blocks=1, local_blocks=1)
        sparse = tiny_llama(ids).logits
        assert (sparse - dense).abs().max() > 1e-3
        assert tiny_llama.model.layers[0].self_attn.sparsa_last_density < 1.0
        remove(tiny_llama)
        assert (tiny_llama(ids).logits - dense).abs().max() < 1e-5


def test_hf_sparse_heads_leave_the_shared_streaming_mask_alone(tiny_llama):
    """Streaming hands every layer one cached mask; making some heads dense must copy it, not write into it."""
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(2))
    pattern = make_pattern("streaming", block_size=BLOCK, sink_blocks=1, local_blocks=1)
    probe = torch.zeros(1, 1, 300, 8)
    before = pattern.mask(probe, probe).blocks.clone()
    with torch.no_grad():
        apply(tiny_llama, "streaming", heads=[0], min_len=1, block_size=BLOCK, sink_blocks=1, local_blocks=1)
        first = tiny_llama(ids).logits
        density = float(tiny_llama.model.layers[0].self_attn.sparsa_last_density)
        assert torch.equal(tiny_llama(ids).logits, first)
        remove(tiny_llama)
    assert torch.equal(pattern.mask(probe, probe).blocks, before)
    all_heads = float(before.sum()) / M.causal_block_count(300, 300, BLOCK)
    heads = tiny_llama.config.num_attention_heads
    assert density == pytest.approx((all_heads + (heads - 1)) / heads, rel=1e-6)


@pytest.mark.parametrize("sink,local", [(1, 2), (0, 3), (2, 100)])
def test_hf_streaming_decode_slices_equal_the_block_mask(tiny_llama, monkeypatch, sink, local):
    """A streaming decode step attends slices of the cache; it computes what the block mask does."""

    from sparsa.attention.streaming import Streaming

    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(3))
    apply(tiny_llama, "streaming", min_len=1, block_size=BLOCK, sink_blocks=sink, local_blocks=local)

    def decode(steps=4):
        cache = DynamicCache()
        with torch.no_grad():
            out = tiny_llama(ids, **{CACHE: cache}, use_cache=True)
            logits, densities = [], []
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                out = tiny_llama(nxt, **{CACHE: cache}, use_cache=True)
                logits.append(out.logits)
                densities.append(float(tiny_llama.model.layers[0].self_attn.sparsa_last_density))
        return torch.cat(logits, 1), densities

    sliced, d_sliced = decode()
    monkeypatch.setattr(Streaming, "decode_key_ranges", lambda self, k_len: None)
    masked, d_masked = decode()
    remove(tiny_llama)
    assert (sliced - masked).abs().max() < 1e-5
    assert d_sliced == pytest.approx(d_masked, rel=1e-6)
    assert (max(d_sliced) == 1.0) == (local >= 100)  # sparse steps were taken, except where the window is everything


def greedy_steps(model, ids, cache, steps: int):
    """Prefill ``ids`` into ``cache``, then ``steps`` greedy decode steps at explicit positions: their logits and
    the first layer's attention density at each step."""
    logits, densities = [], []
    with torch.no_grad():
        out = model(ids, **{CACHE: cache}, use_cache=True, cache_position=torch.arange(ids.shape[1]))
        for step in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            position = torch.tensor([ids.shape[1] + step])
            out = model(nxt, **{CACHE: cache}, use_cache=True, cache_position=position)
            logits.append(out.logits)
            densities.append(float(model.model.layers[0].self_attn.sparsa_last_density))
    return torch.cat(logits, 1), densities


@pytest.mark.parametrize("sink,local", [(1, 2), (0, 3), (2, 100)])
def test_hf_streaming_decode_over_a_static_cache_gathers_what_the_slices_keep(tiny_llama, sink, local):
    """Under a static cache's mask a decode step finds its slots on the device; it equals the dynamic cache's slices."""

    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    apply(tiny_llama, "streaming", min_len=1, block_size=BLOCK, sink_blocks=sink, local_blocks=local)

    gathered, d_gathered = greedy_steps(tiny_llama, ids, StaticCache(config=tiny_llama.config, max_cache_len=260), 5)
    sliced, d_sliced = greedy_steps(tiny_llama, ids, DynamicCache(), 5)
    remove(tiny_llama)
    assert (gathered - sliced).abs().max() < 1e-5
    assert d_gathered == pytest.approx(d_sliced, rel=1e-6)
    assert (max(d_gathered) == 1.0) == (local >= 100)


def test_hf_streaming_decode_counts_blocks_from_a_padded_rows_first_token(tiny_llama):
    """A left-padded row decodes as the same row alone: its sinks are its first tokens, not the padding."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (2, 190), generator=gen)
    pad = 37
    streaming = dict(min_len=1, block_size=BLOCK, sink_blocks=1, local_blocks=2)
    with torch.no_grad():  # prefills run dense (a padded prefill does), decode steps sparse
        mask = torch.ones(2, 191, dtype=torch.long)
        mask[1, :pad] = 0
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = tiny_llama(ids, attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True)
        nxt = torch.tensor([[7], [9]])
        apply(tiny_llama, "streaming", **streaming)
        step = tiny_llama(nxt, attention_mask=mask, position_ids=positions[:, -1:], **{CACHE: returned_cache(out)},
                          use_cache=True).logits[:, -1]
        assert float(tiny_llama.model.layers[0].self_attn.sparsa_last_density) < 1.0
        alone = []
        for row, start in ((0, 0), (1, pad)):
            remove(tiny_llama)
            o = tiny_llama(ids[row:row + 1, start:], use_cache=True)
            apply(tiny_llama, "streaming", **streaming)
            alone.append(tiny_llama(nxt[row:row + 1], **{CACHE: returned_cache(o)}, use_cache=True).logits[:, -1])
    remove(tiny_llama)
    assert (step - torch.cat(alone)).abs().max() < 1e-4


@pytest.mark.parametrize("inner", [False, True])
def test_hf_streaming_decode_follows_a_mask_updated_in_place(tiny_llama, inner):
    """The slots are found once per forward pass, not once per mask object: a caller that updates one mask tensor
    in place from step to step decodes as one that passes a fresh mask each time, through the model or its body."""

    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(6))
    steps = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    apply(tiny_llama, "streaming", min_len=1, block_size=BLOCK, sink_blocks=1, local_blocks=1)

    def decode(reuse: bool):
        cache = StaticCache(config=tiny_llama.config, max_cache_len=200)
        mask = torch.zeros(1, 1, 1, 200, dtype=torch.bool)
        logits = []
        with torch.no_grad():
            tiny_llama(ids, **{CACHE: cache}, use_cache=True, cache_position=torch.arange(150))
            for step in range(steps.shape[1]):
                position = 150 + step
                if reuse:
                    mask[..., : position + 1] = True
                    given = mask
                else:
                    given = torch.zeros(1, 1, 1, 200, dtype=torch.bool)
                    given[..., : position + 1] = True
                out = (tiny_llama.model if inner else tiny_llama)(
                    steps[:, step:step + 1], attention_mask=given, **{CACHE: cache}, use_cache=True,
                    cache_position=torch.tensor([position]), position_ids=torch.tensor([[position]]))
                logits.append(out.last_hidden_state if inner else out.logits)
        return torch.cat(logits, 1)

    reused, fresh = decode(True), decode(False)
    remove(tiny_llama)
    assert (reused - fresh).abs().max() < 1e-5


def test_hf_non_causal_attention_stays_dense(tiny_llama):
    """The patterns are causal: a bidirectional (or cross) attention module runs transformers' SDPA untouched, and
    so does a call with a position bias; ``is_causal=None`` means the module's own setting."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparsa.attention.hf import _forward

    apply(tiny_llama, "streaming", min_len=1, block_size=BLOCK, sink_blocks=1, local_blocks=1)
    module = tiny_llama.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(8)
    heads, kv_heads = tiny_llama.config.num_attention_heads, tiny_llama.config.num_key_value_heads
    q = torch.randn(1, heads, 100, 16, generator=gen)
    k, v = torch.randn(1, kv_heads, 300, 16, generator=gen), torch.randn(1, kv_heads, 300, 16, generator=gen)
    q_square, k_square, v_square = q[:, :, :100], k[:, :, :100], v[:, :, :100]
    try:
        module.is_causal = False
        ours = _forward(module, q, k, v, None, scaling=0.25)[0]
        reference = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0]
        module.is_causal = True
        # is_causal=None means the module's own (causal): sparse; a position bias keeps transformers' path
        sparse = _forward(module, q_square, k_square, v_square, None, scaling=0.25, is_causal=None)[0]
        causal = sdpa_attention_forward(module, q_square, k_square, v_square, None, scaling=0.25)[0]
        bias = torch.zeros(1, heads, 100, 100)
        biased = _forward(module, q_square, k_square, v_square, None, scaling=0.25, position_bias=bias)[0]
    finally:
        module.is_causal = True
        remove(tiny_llama)
    assert torch.equal(ours, reference)
    assert (sparse - causal).abs().max() > 1e-3
    assert (biased - causal).abs().max() < 1e-5


def test_hf_dense_below_min_len_and_per_layer(tiny_llama):
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        apply(tiny_llama, "streaming", min_len=1000, block_size=BLOCK, local_blocks=1)
        assert (tiny_llama(ids).logits - dense).abs().max() < 1e-5
        apply(tiny_llama, "streaming", layers=[-1], min_len=1, block_size=BLOCK, local_blocks=1)
        assert tiny_llama.model.layers[0].self_attn.sparsa_attention is None
        assert tiny_llama.model.layers[1].self_attn.sparsa_attention is not None


def test_hf_quest_decoding_with_every_page_equals_dense(tiny_llama):
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False)
        apply(tiny_llama, "quest", min_len=1, block_size=BLOCK, pages=1000)
        assert torch.equal(tiny_llama.generate(ids, max_new_tokens=8, do_sample=False), dense)


@pytest.mark.parametrize("pages", [2, 3, 100])
def test_hf_quest_decode_over_a_static_cache_chooses_what_the_dynamic_cache_chooses(tiny_llama, pages):
    """Under a static cache quest keeps page bounds from step to step and chooses on the device; its steps equal
    the dynamic cache's, which bound every page from the keys each step (grouped heads: 4 query, 2 key-value)."""

    ids = torch.randint(0, 256, (1, 220), generator=torch.Generator().manual_seed(8))
    apply(tiny_llama, "quest", min_len=1, block_size=BLOCK, pages=pages)

    static_cache = StaticCache(config=tiny_llama.config, max_cache_len=300)
    chosen, d_chosen = greedy_steps(tiny_llama, ids, static_cache, 6)  # 220 + 6 tokens: slot 224 starts a page
    kept = tiny_llama.model.layers[0].self_attn.sparsa_state["quest"]
    (bounds,) = kept.values()
    other = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(10))
    static_cache.reset()  # zeroed in place, as generate() does
    # a second prompt into the same cache renews the bounds in place; a one-token prompt (no prefill call that
    # could renew them) starts each page afresh as its steps reach it
    again, _ = greedy_steps(tiny_llama, other, static_cache, 6)
    assert list(kept.values()) == [bounds]
    static_cache.reset()  # one token: each page it reaches still holds the first prompt's bounds until reset
    single, _ = greedy_steps(tiny_llama, ids[:, :1], static_cache, 70)
    dynamic, d_dynamic = greedy_steps(tiny_llama, ids, DynamicCache(), 6)
    other_dynamic, _ = greedy_steps(tiny_llama, other, DynamicCache(), 6)
    single_dynamic, _ = greedy_steps(tiny_llama, ids[:, :1], DynamicCache(), 70)
    remove(tiny_llama)
    assert (chosen - dynamic).abs().max() < 1e-5 and (again - other_dynamic).abs().max() < 1e-5
    assert (single - single_dynamic).abs().max() < 1e-5
    assert d_chosen == pytest.approx(d_dynamic, rel=1e-6)
    assert (max(d_chosen) == 1.0) == (pages >= 100)  # sparse steps were taken, except where every page is kept


def test_hf_quest_decode_counts_pages_from_a_padded_rows_first_token(tiny_llama):
    """A left-padded row decodes under quest as the same row alone: its pages start at its first token (the
    steps reach a page start of each row: offsets 192 and 160)."""

    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 256, (2, 190), generator=gen)
    pad, steps = 37, 10
    tokens = [torch.tensor([[7 + i], [90 + i]]) for i in range(steps)]
    mask = torch.ones(2, 190 + steps, dtype=torch.long)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    apply(tiny_llama, "quest", min_len=1, block_size=BLOCK, pages=2)
    with torch.no_grad():
        cache = StaticCache(config=tiny_llama.config, max_cache_len=256)
        tiny_llama(ids, attention_mask=mask[:, :190], position_ids=positions[:, :190], **{CACHE: cache},
                   use_cache=True, cache_position=torch.arange(190))
        batched = []
        for i, token in enumerate(tokens):
            at = 190 + i
            batched.append(tiny_llama(token, attention_mask=mask[:, :at + 1], position_ids=positions[:, at:at + 1],
                                      **{CACHE: cache}, use_cache=True, cache_position=torch.tensor([at])).logits[:, -1])
        assert float(tiny_llama.model.layers[0].self_attn.sparsa_last_density) < 1.0
        alone = []
        for row, start in ((0, 0), (1, pad)):
            o = tiny_llama(ids[row:row + 1, start:], use_cache=True)
            got = []
            for token in tokens:
                o = tiny_llama(token[row:row + 1], **{CACHE: returned_cache(o)}, use_cache=True)
                got.append(o.logits[:, -1])
            alone.append(got)
    remove(tiny_llama)
    for i in range(steps):
        assert (batched[i] - torch.cat([alone[0][i], alone[1][i]])).abs().max() < 1e-4, i


def test_hf_quest_keeps_its_bounds_only_while_their_cache_lives(tiny_llama):
    """Page bounds are kept per cache, made without autograd history even when the prefill tracks gradients,
    and let go when the cache is freed."""
    import gc

    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(11))
    apply(tiny_llama, "quest", min_len=1, block_size=BLOCK, pages=2)
    kept = lambda: tiny_llama.model.layers[0].self_attn.sparsa_state["quest"]  # noqa: E731
    caches = [StaticCache(config=tiny_llama.config, max_cache_len=160) for _ in range(2)]
    with torch.enable_grad():
        tiny_llama(ids, **{CACHE: caches[0]}, use_cache=True, cache_position=torch.arange(100))
    assert len(kept()) == 1 and not next(iter(kept().values())).lo.requires_grad
    with torch.no_grad():
        greedy_steps(tiny_llama, ids, caches[1], 2)
    assert len(kept()) == 2
    del caches
    gc.collect()
    assert len(kept()) == 0
    remove(tiny_llama)


def test_hf_rejects_what_it_cannot_serve(tiny_llama):
    with pytest.raises(InputError, match="not a Hugging Face"):
        apply(torch.nn.Linear(2, 2), "streaming")
    with pytest.raises(InputError, match="heads"):
        apply(tiny_llama, "streaming", heads=[7])
    with pytest.raises(InputError, match="unknown attention backend"):
        apply(tiny_llama, "streaming", backend="cuda-magic")
    tiny_llama.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # as gpt-oss has
    with pytest.raises(InputError, match="attention sinks"):
        apply(tiny_llama, "streaming")


TRITON_BODY = r"""
import math
import torch
from sparsa.attention import attend, make_pattern

torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    # (block, query rows per program): whole blocks, and blocks split over two programs; d = 24 is padded
    for lq, lk, d, block, block_m in ((64, 64, 16, 16, None), (40, 100, 24, 16, None), (1, 70, 32, 16, None),
                                      (70, 130, 16, 32, 16)):
        batch = 2 if block_m else 1  # program ids map to (batch, head, tile) in both launch orders
        q = torch.randn(batch, 4, lq, d).to(dtype)
        k = torch.randn(batch, 2, lk, d).to(dtype)
        v = torch.randn(batch, 2, lk, d).to(dtype)
        for name, settings in (("streaming", dict(local_blocks=1)), ("antidiagonal", dict(stride=4, threshold=0.6)), ("quest", dict(pages=1000))):
            mask = make_pattern(name, block_size=block, **settings).mask(q, k.repeat_interleave(2, 1))
            ref = attend(q.double(), k.double(), v.double(), mask, backend="reference")
            # pointer loads, and TMA descriptors (power-of-two head dims) with keys taken 16 at a time
            # and programs launched head by head instead of key-value head by key-value head
            for launch in [dict(tma=False), dict(tma=False, kv_major=False)] + ([dict(tma=True, inner=16)] if d & (d - 1) == 0 else []):
                out = attend(q, k, v, mask, backend="triton", block_m=block_m, **launch)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                assert err < (1e-5 if dtype == torch.float32 else 2e-2), (dtype, lq, lk, name, launch, err)
                worst = max(worst, err)
print(f"attention interpreter ok, worst {worst:.2e}")
"""


def test_a_shared_mask_is_listed_once_and_its_lists_are_kept_with_it():
    """Streaming's mask (one per shape, expanded over rows and heads) is listed once, expanded, equal to listing
    every row; the lists and density are made once per mask."""
    from sparsa.attention.backends import kept_lists

    pattern = make_pattern("streaming", block_size=16, local_blocks=2)
    q = torch.randn(2, 4, 100, 8)
    mask = pattern.mask(q, q)
    assert pattern.mask(q, q) is mask
    counts, indices = kept_lists(mask.blocks)
    assert counts.stride()[:2] == (0, 0) and indices.stride()[:2] == (0, 0)
    full_counts, full_indices = kept_lists(mask.blocks.clone())
    assert torch.equal(counts, full_counts) and torch.equal(indices, full_indices)
    made = []
    first = mask.derived("lists", lambda: made.append(1) or kept_lists(mask.blocks))
    assert mask.derived("lists", lambda: made.append(1)) is first and made == [1]
    assert mask.density_tensor() is mask.density_tensor()


def test_triton_block_sparse_kernel_under_the_interpreter(tmp_path):
    from triton_interpreter import run_interpreted

    assert "attention interpreter ok" in run_interpreted(TRITON_BODY, tmp_path)


ANTIDIAGONAL_BODY = r"""
import math
import torch
from sparsa.attention.antidiagonal import block_mass
from sparsa.attention.masks import block_aligned
from sparsa.kernels.antidiagonal_scores import antidiagonal_block_mass

torch.manual_seed(0)
worst = 0.0
# (q rows, keys, head dim, block, stride): lengths off the block grid, queries that are a suffix, PER = 1 .. 16
for lq, lk, d, block, stride in ((200, 200, 16, 32, 8), (90, 300, 32, 16, 4), (64, 64, 16, 16, 16), (130, 257, 64, 64, 4)):
    q = torch.randn(1, 2, lq, d)
    k = torch.randn(1, 2, lk, d)
    qp, kp, _ = block_aligned(q, k, block)
    row0 = (lk - lq) // block * block // stride
    scale = 1.0 / (math.sqrt(d) * stride)
    ref = block_mass(qp.double(), kp.double(), stride, block, row0, lk, scale)
    got = antidiagonal_block_mass(qp, kp, stride, block, row0, lk, scale)
    row_major = antidiagonal_block_mass(qp, kp, stride, block, row0, lk, scale, head_major=False)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = max((got.double() - ref).abs().max().item(), (row_major.double() - ref).abs().max().item())
    assert err < 1e-4, (lq, lk, d, block, stride, err)
    worst = max(worst, err)
print(f"antidiagonal interpreter ok, worst {worst:.2e}")
"""


def test_fused_antidiagonal_scoring_under_the_interpreter(tmp_path):
    """The Triton scoring kernel equals the stock-op block sums (float64) on fresh random inputs."""
    from triton_interpreter import run_interpreted

    assert "antidiagonal interpreter ok" in run_interpreted(ANTIDIAGONAL_BODY, tmp_path)


LINE_SCORES_BODY = r"""
import math
import torch
from sparsa.attention.base import last_queries_softmax
from sparsa.attention.vertical_slash import column_and_diagonal_scores
from sparsa.kernels import line_scores as ls

ls.CHUNK_KEYS = 128  # several key chunks in pass 1 at these small lengths
torch.manual_seed(0)
worst = 0.0
# (queries, keys, last n, head dim): n == all queries, n < queries, lengths off any tile
for lq, lk, n, d in ((16, 16, 16, 16), (100, 300, 16, 32), (64, 200, 32, 16)):
    q = torch.randn(1, 2, lq, d)
    k = torch.randn(1, 2, lk, d)
    columns, diagonals = column_and_diagonal_scores(last_queries_softmax(q.double(), k.double(), n), lk)
    got_c, got_d = ls.last_query_line_scores(q[..., lq - n :, :], k, lk, 1.0 / math.sqrt(d))
    err = max((got_c.double() - columns).abs().max().item(), (got_d.double() - diagonals).abs().max().item())
    assert err < 1e-4, (lq, lk, n, d, err)
    worst = max(worst, err)
print(f"line scores interpreter ok, worst {worst:.2e}")
"""


def test_fused_line_scores_under_the_interpreter(tmp_path):
    """The Triton column/diagonal kernels equal the stock-op scores (float64) on fresh random inputs."""
    from triton_interpreter import run_interpreted

    assert "line scores interpreter ok" in run_interpreted(LINE_SCORES_BODY, tmp_path)


TOP_CUMULATIVE_BODY = r"""
import torch
from sparsa.attention.masks import top_cumulative
from sparsa.kernels.top_cumulative import top_cumulative_rows

torch.manual_seed(0)
# rows off the program's row count, lengths off a power of two, a zero row
for shape in ((3, 5, 40), (2, 17), (1, 1), (6, 300)):
    probs = torch.rand(shape) ** 4
    probs = probs / probs.sum(-1, keepdim=True)
    probs[0] = 0.0
    for threshold in (0.05, 0.5, 0.9, 0.99):  # (at 1.0 the last entries hang on summation order)
        got = top_cumulative_rows(probs, threshold)
        want = top_cumulative(probs, threshold)  # the stock ops on CPU
        assert torch.equal(got, want), (shape, threshold, (got != want).sum())
print("top cumulative interpreter ok")

# the kernels' kept-block lists: counts, and indices ascending then zeros, as the stock rank scatter makes them
from sparsa.attention.backends import kept_lists
from sparsa.kernels.block_sparse_attn import kept_block_lists

for shape in ((2, 3, 5, 40), (9, 17), (1, 1)):
    blocks = torch.rand(shape) < 0.3
    blocks[..., 0, :] = False
    for got, want in zip(kept_block_lists(blocks), kept_lists(blocks)):
        assert got.dtype == want.dtype and torch.equal(got, want), (shape, got, want)
print("kept lists interpreter ok")
"""


SLOT_ATTENTION_BODY = r"""
import torch
from sparsa.kernels.slot_attention import slot_attention

def reference(q, k, v, index, keep, scale):
    b, h, _, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, 1, h, d, dtype=torch.float64)
    for r in range(b):
        for head in range(h):
            slots = index[r, head][keep[r, head]] if index.dim() == 3 else index[r][keep[r]]
            kk, vv = k[r, head // group, slots].double(), v[r, head // group, slots].double()
            p = torch.softmax(q[r, head, 0].double() @ kk.T * scale, dim=-1)
            out[r, 0, head] = p @ vv
    return out

gen = torch.Generator().manual_seed(11)
cases = ((2, 9, 3, 64, 300, 192, False), (1, 4, 4, 80, 90, 70, False), (3, 8, 2, 32, 500, 130, False),
         (2, 9, 3, 64, 300, 150, True), (1, 4, 1, 80, 90, 70, True))  # True: a list of slots per query head
for b, h, hkv, d, length, n, per_head in cases:
    q = torch.randn(b, h, 1, d, generator=gen)
    k, v = torch.randn(b, hkv, length, d, generator=gen), torch.randn(b, hkv, length, d, generator=gen)
    lists = (b, h, n) if per_head else (b, n)
    index = torch.randint(0, length, lists, generator=gen)
    keep = torch.rand(lists, generator=gen) < 0.7
    keep[..., :64] = False  # a whole chunk of nothing kept
    keep[..., -1] = True
    scale = 0.3
    out = slot_attention(q, k, v, index, keep, scale)
    ref = reference(q, k, v, index, keep, scale)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (b, 1, h, d) and err < 1e-5, (b, h, hkv, d, err)
print("slot attention interpreter ok")
"""


PAGE_SELECT_BODY = r"""
import torch
from sparsa.attention.quest import PageBounds, Quest
from sparsa.kernels.page_select import select_pages

gen = torch.Generator().manual_seed(12)
cases = ((2, 4, 2, 16, 300, 16, 3, (0, 37), (250, 299)),  # grouped heads, a padded row, its last slot the cache's
         (1, 6, 3, 24, 200, 32, 10, (0,), (100,)),  # more pages asked than exist up to the query
         (1, 2, 1, 8, 128, 16, 2, (5,), (5,)),  # the query is the row's first slot
         (3, 4, 2, 16, 2101, 16, 5, (0, 37, 5), (2000, 1700, 901)),  # 132 pages: the choice crosses tiles of 64
         (1, 2, 2, 16, 200, 16, 3, (7,), (103,)))  # the step's key starts a page: stale bounds there are replaced
for b, h, hkv, d, length, bs, pages, pads, lasts in cases:
    q = torch.randn(b, h, 1, d, generator=gen)
    key = torch.randn(b, hkv, length, d, generator=gen)
    first, last = torch.tensor(pads), torch.tensor(lasts)
    slot = torch.arange(length)
    valid = (slot >= first[:, None]) & (slot <= last[:, None])
    before = PageBounds.of(key, first, valid & (slot < last[:, None]), bs)  # the prefill's: not the step's own key
    before.lo = torch.where(before.lo.isinf(), -3.0, before.lo)  # pages not reached yet: stale bounds (a reused cache)
    before.hi = torch.where(before.hi.isinf(), 3.0, before.hi)
    count = min(pages, before.lo.shape[2])
    state = {"quest": {before.cache: PageBounds(before.cache, before.lo.clone(), before.hi.clone())}}
    want_index, want_keep, want_density = Quest(block_size=bs, pages=pages).decode_query_slots(q, key, first, last, valid, state)
    lo, hi = before.lo.clone(), before.hi.clone()
    index, keep, share = select_pages(q, key, lo, hi, first, last, valid, count, bs)
    assert torch.equal(keep, want_keep), (b, h, keep.sum(), want_keep.sum())
    assert torch.equal(index[keep], want_index[want_keep])
    assert abs(float(share.mean()) - float(want_density)) < 1e-6
    assert torch.equal(lo, state["quest"][before.cache].lo) and torch.equal(hi, state["quest"][before.cache].hi)
    exact = PageBounds.of(key, first, valid, bs)  # the query's own page holds exactly its valid keys' bounds
    for r in range(b):
        own = int(last[r] - first[r]) // bs
        assert torch.equal(lo[r, :, own], exact.lo[r, :, own]) and torch.equal(hi[r, :, own], exact.hi[r, :, own])
print("page select interpreter ok")
"""


def test_page_select_under_the_interpreter(tmp_path):
    """Quest's one-launch choice of pages keeps exactly the slots the stock operations keep, and widens the page
    bounds by the step's key as they do (grouped heads, a left-padded row, fewer pages than asked, a first step)."""
    from triton_interpreter import run_interpreted

    assert "page select interpreter ok" in run_interpreted(PAGE_SELECT_BODY, tmp_path)


def test_slot_attention_under_the_interpreter(tmp_path):
    """The decode kernel over chosen slots equals a float64 softmax over the kept slots (grouped heads, a head
    size that is not a power of two, a chunk with nothing kept, several rows, one list per query head)."""
    from triton_interpreter import run_interpreted

    assert "slot attention interpreter ok" in run_interpreted(SLOT_ATTENTION_BODY, tmp_path)


def test_selection_kernels_under_the_interpreter(tmp_path):
    """The Triton selection keeps exactly the entries the stock sort and cumulative sum keep (no ties here),
    and the kept-block lists equal the stock rank scatter."""
    from triton_interpreter import run_interpreted

    out = run_interpreted(TOP_CUMULATIVE_BODY, tmp_path)
    assert "top cumulative interpreter ok" in out and "kept lists interpreter ok" in out


def test_antidiagonal_fp8_scoring_stays_close_to_exact():
    """fp8 rounding of the strided rows moves the block sums little, and the chosen blocks hardly at all."""
    from sparsa.attention.antidiagonal import block_mass
    from sparsa.attention.masks import block_aligned

    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 2048, 64), torch.randn(1, 4, 2048, 64) * 3
    qp, kp, _ = block_aligned(q, k, 64)
    exact = block_mass(qp.double(), kp.double(), 8, 64, 0, 2048, 1 / (math.sqrt(64) * 8))
    rounded = block_mass(qp, kp, 8, 64, 0, 2048, 1 / (math.sqrt(64) * 8), fp8=True)
    assert (rounded.double() - exact).abs().max().item() < 3e-2 * 64 / 8  # rows hold 8 units of probability
    a = make_pattern("antidiagonal", block_size=64, stride=8).mask(q, k).blocks
    b = make_pattern("antidiagonal", block_size=64, stride=8, fp8=True).mask(q, k).blocks
    assert (a != b).sum().item() <= 0.02 * a.sum().item()


def test_antidiagonal_scores_equal_the_strided_definition():
    """The one-GEMM estimate equals the explicit antidiagonal sums: q[iS+t] . k[jS+S-1-t], causal softmax, block sums."""
    from sparsa.attention.antidiagonal import Antidiagonal
    from sparsa.attention.masks import finalize, top_cumulative

    torch.manual_seed(3)
    bs, s, length = 32, 8, 200
    q, k = torch.randn(1, 2, length, 16, dtype=torch.float64), torch.randn(1, 2, length, 16, dtype=torch.float64)
    pad = -length % bs
    qp, kp = torch.nn.functional.pad(q, (0, 0, 0, pad)), torch.nn.functional.pad(k, (0, 0, 0, pad))
    n = qp.shape[-2] // s
    scores = torch.zeros(1, 2, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            scores[..., i, j] = sum((qp[..., i * s + t, :] * kp[..., j * s + s - 1 - t, :]).sum(-1) for t in range(s))
    idx = torch.arange(n)
    scores = (scores / (4.0 * s)).masked_fill((idx[None, :] > idx[:, None]) | (idx[None, :] * s >= length), float("-inf"))
    per = bs // s
    probs = scores.softmax(-1).reshape(1, 2, n // per, per, n // per, per).sum(dim=(3, 5))
    expected = finalize(top_cumulative(probs / probs.sum(-1, keepdim=True), 0.8), length, length, bs).blocks
    got = Antidiagonal(block_size=bs, stride=s, threshold=0.8).mask(q, k).blocks
    assert torch.equal(got, expected)


def test_diagonal_scores_sum_each_offset():
    from sparsa.attention.vertical_slash import column_and_diagonal_scores

    torch.manual_seed(4)
    n, lk = 5, 12
    probs = torch.rand(1, 2, n, lk, dtype=torch.float64)
    columns, diagonals = column_and_diagonal_scores(probs, lk)
    expected = torch.zeros(1, 2, lk, dtype=torch.float64)
    for r in range(n):
        for j in range(lk):
            offset = lk - n + r - j
            if offset >= 0:
                expected[..., offset] += probs[..., r, j]
    assert torch.allclose(diagonals, expected) and torch.allclose(columns, probs.sum(-2))
