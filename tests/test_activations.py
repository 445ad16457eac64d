"""Activation sparsity: calibrated thresholds hold on held-out text, sparsity 0 is dense, hooks come off."""

from __future__ import annotations

import pytest
import torch

from sparsa.activations import ACTIVATION_METHODS, apply
from sparsa.data.calibration import tokenize
from sparsa.data.text import shipped_text
from sparsa.errors import InputError

from conftest import tiny_llama_config


def test_methods_registered():
    assert set(ACTIVATION_METHODS.names()) == {"teal", "wina", "wina_fisher", "cats"}


@pytest.fixture()
def tiny(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()


@pytest.mark.parametrize("method", ["teal", "wina", "wina_fisher", "cats"])
def test_sparsity_zero_is_dense_and_remove_restores(method, tiny, tokenizer):
    ids = tokenize(tokenizer, shipped_text("evaluation"))[:200][None]
    with torch.no_grad():
        dense = tiny(ids).logits
        handle = apply(tiny, method, 0.0, tokenizer=tokenizer, samples=2, seq_len=64)
        assert torch.equal(tiny(ids).logits, dense)
        handle.remove()
        handle = apply(tiny, method, 0.6, tokenizer=tokenizer, samples=2, seq_len=64)
        assert not torch.equal(tiny(ids).logits, dense)
        handle.remove()
        assert torch.equal(tiny(ids).logits, dense)


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
@pytest.mark.parametrize("sparsity", [0.4, 0.65])
def test_thresholds_hold_on_held_out_text(method, sparsity, default_lm):
    text = shipped_text("evaluation")
    half = len(text) // 2
    handle = apply(default_lm, method, sparsity, text=text[:half], samples=8, seq_len=256)  # calibrate on one half
    try:
        handle.start_tracking()
        ids = tokenize(default_lm.tokenizer, text[half:])  # measure on the other
        held_out = torch.stack([ids[start : start + 256] for start in range(1000, 1000 + 8 * 7919, 7919)])  # 8 windows
        with torch.no_grad():
            default_lm.model(held_out)
        assert abs(handle.measured_sparsity() - sparsity) <= 0.02, handle.measured_sparsity()
    finally:
        handle.remove()


@pytest.mark.parametrize("power", [1.0, None])
def test_wina_scores_weigh_columns(power, tiny, tokenizer):
    """|x_j| * ||W[:, j]|| ** p: WINA's p = 1 when given; otherwise one of WEIGHT_POWERS, chosen on calibration text."""
    from sparsa.activations.base import WEIGHT_POWERS

    handle = apply(tiny, "wina", 0.5, tokenizer=tokenizer, samples=4, seq_len=32, targets=("down_proj",), weight_power=power)
    try:
        p = handle.config.weight_power
        assert p == 1.0 if power == 1.0 else p in WEIGHT_POWERS
        site = handle.sites[0]
        norms = site.module.weight.norm(dim=0)
        scale = torch.ones_like(norms) if site.scale is None else site.scale  # p = 0 leaves |x_j| unweighted
        assert torch.allclose(scale, norms.pow(p), rtol=1e-5)
    finally:
        handle.remove()


def test_wina_fisher_weighs_rows_by_the_loss_gradient(tiny, tokenizer):
    """The score scale is ||sqrt(F) * W[:, j]|| ** p, F the mean squared loss gradient of each output, computed here by hand."""
    from sparsa.data.calibration import calibration_samples
    from sparsa.data.text import load_text

    grads, outputs = [], []
    module = tiny.model.layers[1].mlp.down_proj

    def keep(m, args, out) -> None:
        out.retain_grad()
        outputs.append(out)

    handle = module.register_forward_hook(keep)
    batches = calibration_samples(tokenizer, load_text("calibration"), 3, 32, 0)
    for row in batches:
        tiny(row[None], labels=row[None]).loss.backward()
        grads.append(outputs.pop().grad.reshape(-1, module.out_features))
    handle.remove()
    tiny.zero_grad(set_to_none=True)
    fisher = torch.cat(grads).pow(2).mean(0)
    before = [p.requires_grad for p in tiny.parameters()]
    handle = apply(tiny, "wina_fisher", 0.5, tokenizer=tokenizer, samples=3, seq_len=32, targets=("down_proj",), weight_power=0.5)
    try:
        site = next(s for s in handle.sites if s.module is module)
        expected = (module.weight.detach() * fisher.sqrt()[:, None]).norm(dim=0).pow(0.5)
        assert torch.allclose(site.scale, expected, rtol=1e-4)
        assert [p.requires_grad for p in tiny.parameters()] == before and all(p.grad is None for p in tiny.parameters())
    finally:
        handle.remove()


def test_wina_weights_only_the_named_layers(tiny, tokenizer):
    handle = apply(tiny, "wina", 0.5, tokenizer=tokenizer, samples=4, seq_len=32, weight_power=1.0,
                   targets=("k_proj", "v_proj", "gate_proj"), weighted=("k_proj", "gate_proj"))
    try:
        kinds = {site.name.rsplit(".", 1)[-1]: site.scale is not None for site in handle.sites}
        assert kinds == {"k_proj": True, "v_proj": False, "gate_proj": True}
    finally:
        handle.remove()


def test_bad_input(tiny, tokenizer):
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        apply(tiny, "teal", 1.0, tokenizer=tokenizer)
    with pytest.raises(InputError, match="unknown activation sparsity method"):
        apply(tiny, "magic", 0.5, tokenizer=tokenizer)
    with pytest.raises(InputError, match="no linear layer named"):
        apply(tiny, "teal", 0.5, tokenizer=tokenizer, targets=("w1",))
    with pytest.raises(InputError, match="tokenizer"):
        apply(tiny, "teal", 0.5)
    with pytest.raises(InputError, match="weight_power"):
        apply(tiny, "wina", 0.5, tokenizer=tokenizer, weight_power=-1.0)
    with pytest.raises(InputError, match="weighted names layers that are not targets: up_proj"):
        apply(tiny, "wina", 0.5, tokenizer=tokenizer, targets=("k_proj",), weighted=("up_proj",))


GEMV_BODY = r"""
import torch
from sparsa.kernels.sparse_gemv import GemvConfig, sparse_gemv, transpose_weight

torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # K split over 3, 13 and 1 programs
    for m, n, k, block_k in ((1, 70, 96, 32), (3, 130, 200, 16), (8, 64, 64, 64)):
        w = torch.randn(n, k).to(dtype)
        x = torch.randn(m, k)
        x[torch.rand(m, k) < 0.6] = 0.0  # 60% of channels inactive
        x[0] = 0.0 if m > 1 else x[0]     # an all-zero token
        if m > 2:
            x[1] = torch.randn(k)          # an all-active token
        x = x.to(dtype)
        b = torch.randn(n).to(dtype)
        config = GemvConfig(block_n=32, block_k=block_k)
        # nonzero channels active
        ref = x.double() @ w.double().T + b.double()
        out = sparse_gemv(x, transpose_weight(w), b, config=config)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        # fused per-channel thresholds: |x_k| >= t_k
        thr = torch.rand(k) * 1.5
        keep = x.double().abs() >= thr.double()
        ref_t = (x.double() * keep) @ w.double().T
        out_t = sparse_gemv(x, transpose_weight(w), threshold=thr, config=config)
        err = max(err, ((out_t.double() - ref_t).norm() / ref_t.norm()).item())
        if m > 1:
            assert out_t[0].abs().max() == 0
        assert err < (1e-6 if dtype == torch.float32 else 1e-2), (dtype, m, n, k, err)
        worst = max(worst, err)
        # a NaN input reaches its token's outputs (as through the cut and a dense product), under any threshold
        xn = x.clone()
        xn[-1, k // 2] = float("nan")
        for t in (thr, torch.full((k,), float("nan"))):
            out_n = sparse_gemv(xn, transpose_weight(w), threshold=t, config=config)
            assert out_n[-1].isnan().all() and not out_n[:-1].isnan().any(), (dtype, m)
print(f"gemv interpreter ok, worst {worst:.2e}")
"""


def test_sparse_gemv_under_the_interpreter(tmp_path):
    from triton_interpreter import run_interpreted

    assert "gemv interpreter ok" in run_interpreted(GEMV_BODY, tmp_path)


@pytest.mark.parametrize("method", ["teal", "wina", "wina_fisher", "cats"])
def test_kernel_layers_equal_the_hooks(method, tiny, tokenizer):
    """use_kernels swaps in SparseInputLinear; on CPU (masked dense path) the model computes what the hooks did."""
    from sparsa.activations.kernel import SparseInputLinear, use_kernels

    ids = tokenize(tokenizer, shipped_text("evaluation"))[:64][None]
    handle = apply(tiny, method, 0.5, tokenizer=tokenizer, samples=2, seq_len=64)
    with torch.no_grad():
        hooked = tiny(ids).logits
        swapped = use_kernels(tiny, handle)
        assert swapped and all(isinstance(tiny.get_submodule(n), SparseInputLinear) for n in swapped)
        assert torch.allclose(tiny(ids).logits, hooked, atol=1e-4, rtol=1e-4)
    handle.remove()


def test_greedy_allocation_lands_on_the_target_per_layer(default_lm):
    """Greedy (TEAL's) allocation: sites differ, each layer's weight-weighted mean is the target, and it holds on held-out text."""
    import collections
    import re

    text = shipped_text("evaluation")
    half = len(text) // 2
    handle = apply(default_lm, "teal", 0.5, text=text[:half], samples=4, seq_len=128, targets=("o_proj", "down_proj"),
                   allocation="greedy", greedy_step=0.25, greedy_tokens=64)
    try:
        layers = collections.defaultdict(list)
        for s in handle.sites:
            layers[re.search(r"layers\.(\d+)\.", s.name).group(1)].append(s)
        for sites in layers.values():
            weights = [s.weight_numel() for s in sites]
            assert abs(sum(w * s.sparsity for w, s in zip(weights, sites)) / sum(weights) - 0.5) < 1e-9
        assert len({round(s.sparsity, 6) for s in handle.sites}) > 1  # not uniform
        handle.start_tracking()
        ids = tokenize(default_lm.tokenizer, text[half:])
        with torch.no_grad():
            default_lm.model(torch.stack([ids[start : start + 256] for start in range(1000, 1000 + 4 * 7919, 7919)]))
        assert abs(handle.measured_weight_sparsity() - 0.5) <= 0.03, handle.measured_weight_sparsity()
    finally:
        handle.remove()


def test_gemv_configurations_round_trip_and_candidates():
    from sparsa.kernels.gemv_dispatch import bucket, candidates
    from sparsa.kernels.sparse_gemv import GemvConfig

    for n, k in ((192, 576), (14336, 4096), (4096, 4096)):
        tiles = candidates(n, k)
        assert tiles[0] == GemvConfig.for_shape(n, k)  # never worse than the unmeasured default
        assert len(set(tiles)) == len(tiles) >= 8
        assert all(GemvConfig.from_key(c.key()) == c for c in tiles)
    assert [bucket(m) for m in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(block_n=48)
    with pytest.raises(ValueError, match="1 to 8"):
        bucket(9)
