"""The frontier's measured speed on a CUDA model: each configuration is timed on its kernels (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")


def test_measured_sweep_times_the_sparse_kernels(tiny_bytes_dir, tmp_path):
    from sparsa.frontier import run_sweep
    from sparsa.frontier.config import parse_sweep

    sweep = parse_sweep({
        "eval": {"seq_len": 64, "perplexity_tokens": 128, "longctx_tasks": []},
        "calibration": {"samples": 2, "seq_len": 32},
        "speed": {"mode": "measured", "prefill_tokens": 64, "decode_context": 64, "decode_tokens": 4},
        "axes": {"weights": [{"method": "magnitude", "pattern": "2:4"}],
                 "activations": [{"method": "teal", "sparsity": 0.5}, {"method": "cats", "sparsity": 0.5}]},
    })
    records = {r["id"]: r for r in run_sweep(sweep, str(tiny_bytes_dir), tmp_path, device="cuda", progress=False)}
    assert all(r["status"] == "ok" for r in records.values()), [r.get("error") for r in records.values()]
    for r in records.values():
        assert r["speed"]["kind"] == "measured" and math.isfinite(r["speed"]["decode_speedup"])
    layers = 2  # the tiny model's decoder layers
    assert f"activation sparse GEMV: {7 * layers} layers" in records["activations=teal@0.5"]["speed"]["notes"]
    assert f"activation sparse GEMV: {layers} layers" in records["activations=cats@0.5"]["speed"]["notes"]  # down_proj
    assert any(n.startswith("2:4 kernels:") for n in records["weights=magnitude@2:4"]["speed"]["notes"])
    for r in records.values():  # the tiny model's steps capture: decode is timed from CUDA graphs, and eagerly too
        speed = r["speed"]
        assert speed["decode_mode"] == "graph", speed.get("decode_graph_error")
        assert math.isfinite(speed["decode_eager_speedup"]) and speed["decode_speedup"] == speed["decode_graph_speedup"]


def test_graph_decoding_picks_the_tokens_eager_decoding_picks(tiny_bytes_dir):
    """The captured step (static cache, position and token advanced in the graph) decodes as the eager loop does."""
    from transformers import AutoModelForCausalLM

    from sparsa.frontier.timing import GraphDecoder, eager_decode

    model = AutoModelForCausalLM.from_pretrained(tiny_bytes_dir, dtype=torch.float32).cuda().eval()
    ctx = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        eager, _ = eager_decode(model, ctx, 12)
        decoder = GraphDecoder(model, ctx, 12)
        assert decoder.tokens() == eager
        assert decoder.tokens() == eager  # a second run starts again from the context
        assert decoder.tok_s() > 0


def test_graph_decoding_with_streaming_attention_runs_sparse(tiny_bytes_dir):
    """Streaming attention in a captured step (static cache: slots found on the device) picks eager decoding's
    tokens (dynamic cache: slices), which are not dense decoding's."""
    from transformers import AutoModelForCausalLM

    from sparsa.attention import apply, remove
    from sparsa.frontier.timing import GraphDecoder, eager_decode

    model = AutoModelForCausalLM.from_pretrained(tiny_bytes_dir, dtype=torch.float32).cuda().eval()
    ctx = torch.randint(0, model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        dense, _ = eager_decode(model, ctx, 16)
        apply(model, "streaming", min_len=1, block_size=16, sink_blocks=1, local_blocks=1)
        eager, _ = eager_decode(model, ctx, 16)
        assert eager != dense  # the check below can tell sparse steps from dense ones
        assert GraphDecoder(model, ctx, 16).tokens() == eager
        remove(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoding_with_quest_runs_sparse(tiny_bytes_dir, dtype):
    """Quest in a captured step (static cache: page bounds kept on the device; in bf16 chosen by the Triton
    kernel) decodes sparse, and a second run, whose prefill renews the bounds in place, decodes the same. In
    float32 (the stock operations) it picks eager decoding's tokens (dynamic cache: bounds from the keys)."""
    from transformers import AutoModelForCausalLM

    from sparsa.attention import apply, remove
    from sparsa.frontier.timing import GraphDecoder, eager_decode

    model = AutoModelForCausalLM.from_pretrained(tiny_bytes_dir, dtype=dtype).cuda().eval()
    ctx = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        dense = GraphDecoder(model, ctx, 16).tokens()
        apply(model, "quest", min_len=1, block_size=16, pages=2)
        decoder = GraphDecoder(model, ctx, 16)
        graphed = decoder.tokens()
        assert graphed != dense  # sparse steps were replayed
        assert decoder.tokens() == graphed
        if dtype == torch.float32:
            assert graphed == eager_decode(model, ctx, 16)[0]
        remove(model)
