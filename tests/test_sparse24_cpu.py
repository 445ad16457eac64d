"""2:4 sparse kernels on the CPU: the compressed format, input errors, accelerate's CPU fallback,
and the Triton kernels under Triton's interpreter (when triton is installed)."""

from __future__ import annotations

import copy
import importlib
import textwrap
import threading
import warnings

import pytest
import torch
import torch.nn as nn

from sparsa.errors import InputError
from sparsa.kernels import SparseLinear24, accelerate, bucket, compress_24, decompress_24, is_24

accelerate_module = importlib.import_module("sparsa.kernels.accelerate")  # the package's `accelerate` is the function


def random_24(n: int, k: int, dtype=torch.float32, seed: int = 0, fewer: float = 0.25) -> torch.Tensor:
    """A random 2:4 weight; a share ``fewer`` of the kept entries is zeroed (groups with 0 or 1 nonzeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(dim=2)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True)
    mask &= torch.rand(n, k // 4, 4, generator=g) >= fewer
    return (w * mask.reshape(n, k)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4), (8, 32), (7, 20), (33, 100), (16, 4100)])
def test_round_trip_is_exact(shape, dtype):
    w = random_24(*shape, dtype=dtype)
    c = compress_24(w)
    n, k = shape
    kp = -(-k // 32) * 32
    assert c.values.shape == (n, kp // 2) and c.values.dtype == dtype
    assert c.meta.shape == (n, kp // 8) and c.meta.dtype == torch.uint8
    assert c.shape == (n, k) and c.padded_in_features == kp
    assert torch.equal(decompress_24(c), w)


def test_round_trip_extreme_groups():
    w = torch.zeros(3, 16)
    w[1, 3] = 5.0  # a single nonzero at the last position
    w[2] = torch.arange(1.0, 17.0) * torch.tensor([0, 1, 1, 0] * 4)  # two in the middle of every group
    assert torch.equal(decompress_24(compress_24(w)), w)


def test_layout_is_as_documented():
    # row 0: group 0 keeps inputs 1 and 3, group 1 keeps only input 2, group 2 only input 11 (its last),
    # groups 3..7 are empty
    w = torch.zeros(1, 32)
    w[0, 1], w[0, 3], w[0, 6], w[0, 11] = 1.0, 2.0, 3.0, 4.0
    c = compress_24(w)
    assert c.values[0, :6].tolist() == [1.0, 2.0, 0.0, 3.0, 0.0, 4.0]  # free slots padded with zeros, lowest first
    word = sum(int(b) << (8 * i) for i, b in enumerate(c.meta[0, :4]))  # little-endian int32 of groups 0..7

    def positions(j):  # group j's first position at bits 16 (j % 2) + 2 (j // 2), its second 8 bits higher
        shift = 16 * (j % 2) + 2 * (j // 2)
        return (word >> shift) & 3, (word >> (shift + 8)) & 3

    assert positions(0) == (1, 3)
    assert positions(1) == (0, 2)  # position 0 holds the padding zero
    assert positions(2) == (0, 3)
    assert all(positions(j) == (0, 1) for j in range(3, 8))  # empty groups: positions 0, 1
    # byte 0: firsts of groups 0, 2, 4, 6 (two bits each); byte 1: their seconds; bytes 2, 3: the odd groups
    assert c.meta[0].tolist() == [0b00000001, 0b01011111, 0b00000000, 0b01010110]


def test_not_24_is_rejected_with_the_layer_name():
    w = random_24(8, 16)
    w[3, 4:8] = 1.0  # four nonzeros in one group
    assert not is_24(w)
    with pytest.raises(InputError, match="model.layers.0.mlp.up_proj.*2:4.*--pattern 2:4"):
        compress_24(w, "model.layers.0.mlp.up_proj")
    with pytest.raises(InputError, match="not a multiple of 4"):
        compress_24(torch.zeros(4, 10), "odd")


def _linear(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_from_linear_errors_name_the_layer():
    dense = _linear(torch.randn(8, 16, dtype=torch.float16))
    with pytest.raises(InputError, match="layer q_proj is not 2:4 sparse.*--pattern 2:4"):
        SparseLinear24.from_linear(dense, "q_proj")
    fp32 = _linear(random_24(8, 16))
    with pytest.raises(InputError, match="layer k_proj has dtype float32.*float16 or bfloat16"):
        SparseLinear24.from_linear(fp32, "k_proj")
    cpu = _linear(random_24(8, 16, dtype=torch.float16))
    with pytest.raises(InputError, match="layer v_proj is on cpu.*CUDA"):
        SparseLinear24.from_linear(cpu, "v_proj")


def test_prepared_calls_are_dropped_when_the_tensors_change():
    w = random_24(8, 32, dtype=torch.bfloat16)
    layer = SparseLinear24(compress_24(w), torch.zeros(8, dtype=torch.bfloat16), name="t", dense_weight=w)

    def prepare():  # stands in for a prepared call, which holds a compiled kernel that does not copy
        layer._calls[1] = threading.Lock()
        layer._routes[(1, torch.bfloat16)] = ("triton", None, None)

    def dropped():
        return not layer._calls and not layer._routes

    prepare()
    twin = copy.deepcopy(layer)
    assert twin._calls == {} and layer._calls, "a copy starts unprepared; the original keeps its calls"
    assert torch.equal(twin.values, layer.values)
    layer.to(torch.float16)
    assert dropped() and layer.values.dtype == torch.float16 and layer.meta.dtype == torch.uint8
    prepare()
    layer.values = layer.values.clone()
    assert dropped()
    prepare()
    layer.load_state_dict(layer.state_dict(), assign=True)
    assert dropped()


def test_a_named_cusparselt_library_is_the_only_candidate(monkeypatch):
    from sparsa.kernels import cusparselt

    monkeypatch.delenv("SPARSA_CUSPARSELT", raising=False)
    assert "libcusparseLt.so.0" in cusparselt._candidates()
    monkeypatch.setenv("SPARSA_CUSPARSELT", "/opt/cusparselt-0.8.1/libcusparseLt.so.0")
    assert cusparselt._candidates() == ["/opt/cusparselt-0.8.1/libcusparseLt.so.0"]


def test_buckets():
    assert [bucket(m) for m in (1, 2, 3, 17, 64, 65, 1000, 4096, 16384, 50000)] == [1, 2, 4, 32, 64, 128, 1024, 4096, 16384, 16384]


def _tiny_24_llama(dtype=torch.bfloat16):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from sparsa.prune.patterns import mask_nm

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(256)).to(dtype).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.mul_(mask_nm(module.weight.float().abs(), 2, 4))
    return model


def test_accelerate_on_cpu_leaves_the_model_and_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(accelerate_module, "_WARNED", False)
    model = _tiny_24_llama()
    before = {name: module for name, module in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = accelerate(model)
        again = accelerate(model)
    messages = [str(w.message) for w in caught if "sparsa.accelerate" in str(w.message)]
    assert messages == ["sparsa.accelerate: no CUDA GPU, 2:4 layers stay dense"]
    assert report["replaced"] == [] and not report["accelerated"] and again["replaced"] == []
    assert "no CUDA GPU" in report["reason"]
    assert dict(model.named_modules()) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # what it would have done: every decoder linear is 2:4, the dense head is not
    assert report["sparse_fraction"] > 0.5
    assert report["skipped"]["lm_head"] == "not 2:4 sparse"
    assert report["skipped"]["model.layers.0.self_attn.q_proj"] == "on cpu, not a CUDA GPU"


# ----------------------------------------------------------------------------- Triton interpreter

INTERPRETER_BODY = textwrap.dedent(
    r"""
    import torch
    from sparsa.kernels.sparse24 import SparseLinear24, compress_24
    from sparsa.kernels.triton_sparse24 import TritonConfig, sparse24_matmul

    def random_24(n, k, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g)
        keep = torch.rand(n, k // 4, 4, generator=g).argsort(dim=2)[..., :2]
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True)
        mask &= torch.rand(n, k // 4, 4, generator=g) >= 0.2
        return (w * mask.reshape(n, k)).to(dtype)

    cases = [  # m, n, k, config (small blocks: the interpreter is slow)
        (1, 40, 72, TritonConfig("gemv", 16, 64, 1, 4, 1)),
        (3, 50, 328, TritonConfig("gemv", 32, 64, 4, 4, 1)),
        (2, 40, 256, TritonConfig("gemv", 16, 64, 2, 4, 1)),  # K steps cover the groups exactly: no masks
        (3, 33, 200, TritonConfig("mma", 32, 64, 2, 4, 1)),
        (18, 20, 256, TritonConfig("mma", 16, 64, 2, 4, 1)),  # no masks; rows and tokens wrap
        (17, 20, 136, TritonConfig("mma", 16, 64, 3, 4, 1)),
        (5, 16, 4100, TritonConfig("mma", 16, 256, 1, 4, 1)),
        (16, 33, 128, TritonConfig("mma", 16, 128, 1, 4, 1)),  # one step: only the carried tile's product
        (3, 24, 96, TritonConfig("mma", 16, 64, 1, 4, 1)),  # one and a half steps: the last one masked
    ]
    worst = 0.0
    for dtype in (torch.float16, torch.bfloat16):
        for seed, (m, n, k, cfg) in enumerate(cases):
            for with_bias in (False, True):
                w = random_24(n, k, dtype, seed)
                g = torch.Generator().manual_seed(100 + seed)
                x = torch.randn(m, k, generator=g).to(dtype)
                bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
                c = compress_24(w)
                out = torch.full((m, n), float("nan"), dtype=dtype)
                y = sparse24_matmul(x, c.values, c.meta, k, bias, cfg, out=out)
                ref = x.double() @ w.double().T + (bias.double() if with_bias else 0)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                assert not torch.isnan(y).any(), (dtype, m, n, k, cfg)
                assert err < 1e-2, (dtype, m, n, k, cfg, err)
                worst = max(worst, err)
        # the module, on the Triton path by name (no dispatch on the CPU)
        w = random_24(24, 96, dtype, 7)
        layer = SparseLinear24(compress_24(w), torch.randn(24).to(dtype), name="t", dense_weight=w)
        x = torch.randn(2, 3, 96).to(dtype)
        ref = x.double() @ w.double().T + layer.bias.double()
        for path in ("triton", "dense"):
            os.environ["SPARSA_24_PATH"] = path
            with torch.no_grad():
                y = layer(x)
            assert y.shape == (2, 3, 24)
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, path
        # a measured Triton route: the first call prepares the launch, the second reuses it
        del os.environ["SPARSA_24_PATH"]
        layer._routes[(8, dtype)] = ("triton", TritonConfig("mma", 16, 64, 1, 4, 1), None)
        for _ in range(2):
            with torch.no_grad():
                y = layer(x)
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, "prepared"
        assert 6 in layer._calls
    print(f"interpreter ok, worst relative error {worst:.2e}")
    """
)


def test_triton_kernels_under_the_interpreter(tmp_path):
    from triton_interpreter import run_interpreted

    assert "interpreter ok" in run_interpreted(INTERPRETER_BODY, tmp_path)


def test_a_bound_input_shape_skips_the_checks_but_not_for_other_inputs():
    """After one checked call, inputs of the same shape, dtype and device take the bound call; others are still checked."""
    from sparsa.kernels import sparse24

    w = random_24(8, 32, dtype=torch.bfloat16)
    layer = SparseLinear24(compress_24(w), None, name="layers.0.q_proj", dense_weight=w)
    layer._routes[(bucket(6), torch.bfloat16)] = ("dense", None, None)  # as if measured
    with torch.no_grad():
        for shape in ((2, 3, 32), (6, 32), (2, 3, 32)):
            x = torch.randn(shape, dtype=torch.bfloat16)
            y = layer(x)
            assert y.shape == (*shape[:-1], 8)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w))
        assert set(layer._calls) == {6} and len(layer._bound) == 2
        with pytest.raises(InputError, match="q_proj is torch.bfloat16 but got a torch.float16 input"):
            layer(torch.randn(2, 3, 32, dtype=torch.float16))
    with pytest.raises(InputError, match="inference-only"):
        layer(torch.randn(2, 3, 32, dtype=torch.bfloat16, requires_grad=True))
    cache = {}
    for key in range(sparse24.REMEMBERED + 3):
        sparse24._remember(cache, key, key)
    assert list(cache) == list(range(3, sparse24.REMEMBERED + 3)), "the oldest entries go first"
    layer.to(torch.float16)
    assert not layer._bound, "a cast drops the bound shapes with the prepared calls"


PTX_ENTRY = """
.visible .entry kernel(
\t.param .u64 .ptr .global .align 1 kernel_param_0,
\t.param .u64 .ptr .global .align 1 kernel_param_1,
\t.param .u32 kernel_param_2,
\t.param .u32 kernel_param_3,
\t.param .u64 .ptr .global .align 1 kernel_param_4,
\t.param .u64 .ptr .global .align 1 kernel_param_5
)
.reqntid 128, 1, 1
{
\tret;
}
"""


def test_driver_launch_reads_the_kernels_parameters_from_its_ptx():
    """The direct launch matches arguments to the compiled kernel's parameters, or declines."""
    from sparsa.kernels.launch import _reading, entry_params

    types = entry_params(PTX_ENTRY)
    assert types == ["u64", "u64", "u32", "u32", "u64", "u64"]
    a, b = torch.empty(1), torch.empty(1)
    assert _reading((a, b, 7, 9), types, scratch=2) == [0, 1, 2, 3]  # two scratch pointers follow
    assert _reading((a, b, 7, 1, 9), types, scratch=2) == [0, 1, 2, 4]  # Triton made the integer 1 a constant
    assert _reading((a, b, 7, 9), types, scratch=1) is None  # one scratch pointer too many
    assert _reading((a, b, 7, 9, 5), types[:4], scratch=0) is None  # more arguments than parameters
    assert _reading((a, 7, b, 9), types, scratch=2) is None  # a pointer where an integer is: never guess
    assert _reading((a, b, 7, 9, 4), types, scratch=1) is None  # an integer where a pointer is
    assert _reading((a, b, 2**40, 9), types, scratch=2) is None  # an i64 argument against a u32 parameter
    assert entry_params("not ptx") == []


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_driver_launch_reads_the_2_4_gemv_as_this_triton_compiles_it():
    """The GEMV compiled for a Hopper GPU (no GPU needed): its PTX parameters are the arguments PreparedCall passes."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsa.kernels.launch import _SCRATCH, _reading, entry_params
    from sparsa.kernels.triton_sparse24 import _sparse24_gemv_kernel as kernel

    pointers = {"xq_ptr": "*i64", "pairs_ptr": "*i32", "words_ptr": "*i32", "bias_ptr": "*bf16", "y_ptr": "*bf16",
                "ws_ptr": "*fp32", "count_ptr": "*i32"}
    constexprs = dict(HAS_BIAS=False, BLOCK_N=16, BLOCK_G=128, NUM_STAGES=3, EVEN=True, SUM_AT_ONCE=0, PRMT=True)
    names = kernel.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    except Exception as exc:  # noqa: BLE001 - no PTX toolchain here
        pytest.skip(f"Triton could not compile for sm_90 here: {exc}")
    t = torch.empty(1)
    # m = 1 token, n = 4096, k = 4096 (1024 groups), strides, split 1, 8 steps
    args = (t, t, t, t, t, t, t, 1, 4096, 1024, 1024, 1024, 1024, 128, 4096, 1, 8)
    scratch = sum(hasattr(compiled.metadata, size) for size in _SCRATCH)
    assert _reading(args, entry_params(compiled.asm["ptx"]), scratch) == list(range(len(args)))
