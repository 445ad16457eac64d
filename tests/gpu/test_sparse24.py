"""2:4 sparse linear layers on a CUDA GPU: every path against a float64 reference (skipped without CUDA)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from sparsa.errors import InputError  # noqa: E402
from sparsa.kernels import SparseLinear24, accelerate, choose, compress_24, cusparselt_available, decompress_24  # noqa: E402
from sparsa.kernels import dispatch  # noqa: E402
from sparsa.kernels.splitk import counters as _counters  # noqa: E402
from sparsa.kernels.triton_sparse24 import TritonConfig, candidate_configs, default_config, sparse24_matmul  # noqa: E402

TOL = 1e-2  # relative Frobenius error: bf16 rounding of the output is ~4e-3
DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(256, 512), (1000, 4100)]  # the second pads K (4100 -> 4128) and N for cuSPARSELt (1000 -> 1008)
TOKENS = [1, 3, 17, 63, 65, 1000]


@pytest.fixture(autouse=True)
def private_dispatch_cache(tmp_path, monkeypatch, request):
    monkeypatch.setenv("SPARSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSA_24_PATH", raising=False)
    if "every_config" not in request.node.name:
        # the dispatch's searches are about speed, not correctness: a narrow one keeps these tests fast
        from sparsa.kernels import cusparselt, triton_sparse24

        monkeypatch.setattr(cusparselt, "MAX_CONFIGS", 4)
        monkeypatch.setattr(triton_sparse24, "KERNEL_SHAPES", {k: v[:2] for k, v in triton_sparse24.KERNEL_SHAPES.items()})
    dispatch.clear_memory()
    yield
    dispatch.clear_memory()


def random_24(n, k, dtype, seed=0, fewer=0.1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, generator=g, device="cuda") * 0.05
    keep = torch.rand(n, k // 4, 4, generator=g, device="cuda").argsort(dim=2)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(2, keep, True)
    mask &= torch.rand(n, k // 4, 4, generator=g, device="cuda") >= fewer  # some groups keep fewer than 2
    return (w * mask.reshape(n, k)).to(dtype)


def make_linear(n, k, dtype, bias, seed=0):
    lin = nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(random_24(n, k, dtype, seed))
        if bias:
            lin.bias.copy_(torch.randn(n, device="cuda", dtype=dtype))
    return lin


def reference(x, weight, bias):
    y = x.double() @ weight.double().T
    return y + bias.double() if bias is not None else y


def rel_error(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def fresh_x(m, k, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(1000 + seed)
    return torch.randn(m, k, generator=g, device="cuda").to(dtype)


@contextlib.contextmanager
def nan_filled_allocations():
    """Every torch.empty (ours, and cuSPARSELt's result inside torch) comes back full of NaN."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with torch.no_grad():
            yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def check(y, ref, what):
    assert torch.isfinite(y).all(), f"{what}: output not fully written (NaN left)"
    err = rel_error(y, ref)
    assert err < TOL, f"{what}: relative error {err:.3g}"


# bias on fp16, none on bf16: both epilogues, half the compilations
@pytest.mark.parametrize("dtype,bias", [(torch.float16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("n,k", SHAPES)
def test_triton_every_config(n, k, dtype, bias):
    lin = make_linear(n, k, dtype, bias)
    c = compress_24(lin.weight)
    b = lin.bias.detach() if bias else None
    for seed, m in enumerate(TOKENS):
        x = fresh_x(m, k, dtype, seed)
        ref = reference(x, lin.weight, b)
        configs = candidate_configs(m, n, k) + [default_config(m, n, k)]
        if m <= 4:  # gemv also serves a few tokens, one program per token
            configs.append(TritonConfig("gemv", 32, 256, 2, 4, 4))
        for cfg in configs:
            out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            y = sparse24_matmul(x, c.values, c.meta, k, b, cfg, out=out)
            check(y, ref, f"triton {cfg.key()} m={m} {n}x{k} {dtype}")
    assert int(_counters(torch.device("cuda"), 1).abs().sum()) == 0, "split-K counters were not reset"


@pytest.mark.skipif(not cusparselt_available(), reason="no cuSPARSELt library here")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_cusparselt_path(n, k, dtype):
    from sparsa.kernels.cusparselt import SEARCH_FINALISTS, Algorithm

    lin = make_linear(n, k, dtype, bias=True, seed=1)
    layer = SparseLinear24.from_linear(lin, "cslt")
    assert "cusparselt" in layer.available_paths()
    assert torch.equal(decompress_24(compress_24(lin.weight)), lin.weight)
    for seed, m in enumerate(TOKENS):
        x = fresh_x(m, k, dtype, seed)
        ref = reference(x, lin.weight, lin.bias)
        with nan_filled_allocations():
            check(layer.run(x, "cusparselt", algorithm=Algorithm(0)), ref, f"cusparselt alg 0 m={m} {n}x{k} {dtype}")
            check(layer.run(x, "cusparselt"), ref, f"cusparselt searched m={m} {n}x{k} {dtype}")  # runs the search
            check(layer.run(x, "cusparselt"), ref, f"cusparselt cached plan m={m} {n}x{k} {dtype}")
        found = layer.cslt.algorithm_for(dispatch.bucket(m))
        assert found is not None
        finalists = list(layer.cslt.search_us.values())[-1]  # this search's: timed again in alternating rounds
        assert 1 <= len(finalists) <= SEARCH_FINALISTS and found.key() == min(finalists, key=finalists.get)
        with nan_filled_allocations():  # a fresh plan with the stored algorithm
            layer.cslt._plans.clear()
            check(layer.run(x, "cusparselt", algorithm=Algorithm.from_key(found.key())), ref, f"cusparselt {found.key()} m={m}")
    print(f"{n}x{k} {dtype}: values shared with cuSPARSELt: {layer.shares_values}; algorithms {layer.cslt.algorithms}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_module_with_dispatch_every_path(n, k, dtype):
    lin = make_linear(n, k, dtype, bias=True, seed=2)
    layer = SparseLinear24.from_linear(lin, "model.layers.0.mlp.down_proj")
    assert torch.equal(decompress_24(compress_24(lin.weight)), lin.weight)
    for seed, m in enumerate(TOKENS):
        x = fresh_x(m, k, dtype, seed).reshape(1, m, k)  # [batch, tokens, features]
        ref = reference(x.reshape(m, k), lin.weight, lin.bias)
        for path in layer.available_paths():
            with nan_filled_allocations():
                y = layer.run(x.reshape(m, k), path)
            check(y, ref, f"{path} m={m} {n}x{k} {dtype}")
        with torch.no_grad():
            y = layer(x)  # measures this bucket (outside the NaN fill: timing needs cuBLAS as usual)
        assert y.shape == (1, m, n)
        check(y.reshape(m, n), ref, f"dispatch ({layer.route(m)[0]}) m={m} {n}x{k} {dtype}")
        with nan_filled_allocations():
            check(layer(x).reshape(m, n), ref, f"dispatch ({layer.route(m)[0]}) m={m} {n}x{k} {dtype}, NaN-filled")
    doc = json.loads(dispatch.cache_path().read_text())
    assert doc["format"] == dispatch.FORMAT and doc["device"] == torch.cuda.get_device_name()
    entries = [v for key, v in doc["entries"].items() if key.startswith(f"{n}x{k}:")]
    assert len(entries) == len({dispatch.bucket(m) for m in TOKENS})
    for entry in entries:
        assert entry["choice"] in ("triton", "cusparselt", "dense")
        finite = {p: t for p, t in entry["times_us"].items() if t is not None}
        assert "dense" in finite
        best = min(finite.values())
        assert finite[entry["choice"]] <= finite["dense"], entry  # never slower than dense, as measured
        assert math.isfinite(best)


def test_split_k_is_deterministic_and_resets_its_counters():
    n, k, m = 512, 8192, 3
    lin = make_linear(n, k, torch.bfloat16, bias=True, seed=3)
    c = compress_24(lin.weight)
    x = fresh_x(m, k, torch.bfloat16, 3)
    ref = reference(x, lin.weight, lin.bias)
    for cfg in (TritonConfig("mma", 64, 128, 8, 4, 3), TritonConfig("gemv", 16, 256, 8, 4, 3)):
        first = sparse24_matmul(x, c.values, c.meta, k, lin.bias, cfg)
        check(first, ref, cfg.key())
        for _ in range(50):
            assert torch.equal(sparse24_matmul(x, c.values, c.meta, k, lin.bias, cfg), first), cfg.key()
    torch.cuda.synchronize()
    assert int(_counters(torch.device("cuda"), 1).abs().sum()) == 0


def test_keep_dense_false_never_runs_dense():
    lin = make_linear(512, 1024, torch.float16, bias=False, seed=4)
    layer = SparseLinear24.from_linear(lin, "no-dense", keep_dense=False)
    assert layer.dense_weight is None and "dense" not in layer.available_paths()
    for m in (1, 64, 2048):
        x = fresh_x(m, 1024, torch.float16, m)
        with torch.no_grad():
            y = layer(x)
        assert layer.route(m)[0] != "dense"
        check(y, reference(x, lin.weight, None), f"keep_dense=False m={m}")


def test_prepared_calls_take_fresh_inputs():
    """From the second call of a token count on, the layer launches the compiled Triton kernel directly."""
    n, k = 1000, 4100
    lin = make_linear(n, k, torch.bfloat16, bias=True, seed=5)
    layer = SparseLinear24.from_linear(lin, "prepared", keep_dense=False)
    routed = []
    for m in (1, 2, 3):
        with torch.no_grad():
            for seed in range(4):
                x = fresh_x(m, k, torch.bfloat16, 10 * m + seed)
                with nan_filled_allocations():
                    y = layer(x)
                check(y, reference(x, lin.weight, lin.bias), f"call {seed}, m={m}")
            if layer.route(m)[0] == "triton":
                routed.append(m)
                assert layer._calls[m]._direct, "the prepared call never launched directly"
            # 8 but not 16-byte aligned: the direct launch (compiled for aligned inputs) must not take it
            buf = torch.empty(m * k + 4, dtype=torch.bfloat16, device="cuda")
            x = buf[4:].view(m, k)
            x.copy_(fresh_x(m, k, torch.bfloat16, 99))
            assert x.data_ptr() % 16 == 8
            check(layer(x), reference(x, lin.weight, lin.bias), f"misaligned input, m={m}")
            # another row stride: specialised differently, so not the direct launch either
            x = fresh_x(m, k + 32, torch.bfloat16, 98)[:, :k]
            check(layer(x), reference(x, lin.weight, lin.bias), f"row stride {k + 32}, m={m}")
    assert routed, "no token count ran on Triton: prepared calls were not exercised"
    with pytest.raises(InputError, match="got an input on cpu"):
        layer(torch.randn(1, k, dtype=torch.bfloat16))  # a bound shape and dtype, but on the CPU
    layer.cuda()  # a move (even to where it is) drops what was prepared for the old tensors
    assert not layer._calls and not layer._routes
    with torch.no_grad():
        x = fresh_x(1, k, torch.bfloat16, 7)
        check(layer(x), reference(x, lin.weight, lin.bias), "after .cuda()")


@pytest.mark.parametrize("dtype,bias", [(torch.float16, True), (torch.bfloat16, False)])
def test_driver_launch_equals_tritons_launch(dtype, bias):
    """A prepared call's later launches go through the CUDA driver: fresh inputs, split-K, both kernels, a CUDA graph."""
    from sparsa.kernels.launch import DriverLaunch
    from sparsa.kernels.triton_sparse24 import PreparedCall

    n, k = 1000, 4100
    lin = make_linear(n, k, dtype, bias, seed=8)
    c = compress_24(lin.weight)
    b = lin.bias.detach() if bias else None
    configs = [(1, TritonConfig("gemv", 32, 256, 1, 4, 4)), (1, TritonConfig("gemv", 32, 256, 4, 4, 4)),
               (3, TritonConfig("gemv", 64, 128, 2, 4, 3)), (17, default_config(17, n, k)),
               (64, dataclasses.replace(candidate_configs(64, n, k)[0], split_k=2))]
    for m, cfg in configs:
        call = PreparedCall(m, c.values, c.meta, k, b, cfg)
        with torch.no_grad():
            for seed in range(3):
                x = fresh_x(m, k, dtype, 100 * m + seed)
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                check(call(x, out), reference(x, lin.weight, b), f"call {seed} of {cfg.key()} m={m}")
            assert call._direct and isinstance(call._driver, DriverLaunch), f"{cfg.key()}: Triton's launcher kept"
            assert (call._rows is not None) == (call.split == 1), "x and the output alone vary exactly without split-K"
            def rows(x):  # the layer's reshape around the call, for what the fast path does not take
                assert call.split > 1, "a contiguous input left the fast path"
                return call(x.reshape(m, k)).view(1, m, n)

            bound = call.bind((1, m, n), rows)  # a layer's binding for [1, m, k] inputs: no reshape on the fast path
            for seed in range(2):
                x = fresh_x(m, k, dtype, 300 + seed)
                with nan_filled_allocations():
                    y = bound(x[None])
                assert y.shape == (1, m, n)
                check(y[0], reference(x, lin.weight, b), f"bound call {seed} of {cfg.key()} m={m}")
            x = fresh_x(m, k, dtype, 7)
            static = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = call(static)
            for seed in range(2):
                static.copy_(fresh_x(m, k, dtype, 200 + seed))
                y.fill_(float("nan"))
                graph.replay()
                check(y, reference(static, lin.weight, b), f"graph replay {seed} of {cfg.key()} m={m}")
    torch.cuda.synchronize()
    assert int(_counters(torch.device("cuda"), 1).abs().sum()) == 0, "split-K counters were not reset"


@pytest.mark.skipif(not cusparselt_available(), reason="needs cuSPARSELt")
def test_prepared_cusparselt_calls_take_fresh_inputs():
    """A measured cuSPARSELt route is called through arguments bound once: fresh inputs, bias, other row strides."""
    n, k, m = 768, 1024, 256
    lin = make_linear(n, k, torch.float16, bias=True, seed=6)
    layer = SparseLinear24.from_linear(lin, "prepared-cslt")
    layer._routes[layer._route_key(m)] = ("cusparselt", None, None)  # as if measured
    with torch.no_grad():
        for seed in range(3):
            x = fresh_x(m, k, torch.float16, 20 + seed)
            with nan_filled_allocations():
                y = layer(x)
            check(y, reference(x, lin.weight, lin.bias), f"call {seed}")
        assert m in layer._calls, "the cuSPARSELt route was not prepared"
        x = fresh_x(m, k + 32, torch.float16, 29)[:, :k]
        check(layer(x), reference(x, lin.weight, lin.bias), f"row stride {k + 32}")


def test_bad_inputs_name_the_layer():
    fp32 = nn.Linear(64, 32, device="cuda")
    with torch.no_grad():
        fp32.weight.copy_(random_24(32, 64, torch.float32))
    with pytest.raises(InputError, match="layer a.b has dtype float32"):
        SparseLinear24.from_linear(fp32, "a.b")
    dense = nn.Linear(64, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(InputError, match="layer c.d is not 2:4 sparse.*--pattern 2:4"):
        SparseLinear24.from_linear(dense, "c.d")
    cpu = nn.Linear(64, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        cpu.weight.copy_(random_24(32, 64, torch.bfloat16).cpu())
    with pytest.raises(InputError, match="layer e.f is on cpu.*CUDA"):
        SparseLinear24.from_linear(cpu, "e.f")
    layer = SparseLinear24.from_linear(make_linear(32, 64, torch.float16, False), "g.h")
    with pytest.raises(InputError, match="layer g.h is torch.float16 but got a torch.float32 input"):
        layer(torch.randn(2, 64, device="cuda"))


def test_choose_measures_once_and_caches():
    path = choose(768, 512, 16, torch.float16)
    assert path in ("triton", "cusparselt", "dense")
    entry = json.loads(dispatch.cache_path().read_text())["entries"]["768x512:m16:float16"]
    assert entry["choice"] == path
    assert choose(768, 512, 16, torch.float16) == path


def _tiny_llama(dtype):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from sparsa.prune.patterns import mask_nm

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(512, hidden_size=128, intermediate_size=256)).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.mul_(mask_nm(module.weight.float().abs(), 2, 4))
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_accelerate_tiny_llama_matches_dense(dtype):
    dense = _tiny_llama(dtype)
    sparse = _tiny_llama(dtype)
    report = accelerate(sparse, tune_tokens=[1, 8])
    assert report["accelerated"] and len(report["replaced"]) == 2 * 7, report
    assert report["skipped"] == {"lm_head": "not 2:4 sparse"}
    assert all(isinstance(sparse.get_submodule(name), SparseLinear24) for name in report["replaced"])
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        for batch in (ids, ids[:1, :1]):  # 16 tokens per layer call, then one (a decode step)
            a = dense(batch).logits.double()
            b = sparse(batch).logits.double()
            err = ((a - b).norm() / a.norm()).item()
            assert err < 2e-2, f"{tuple(batch.shape)}: logits differ by {err:.3g}"
