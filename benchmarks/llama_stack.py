"""A Llama-3-8B-shaped decoder stack for end-to-end GPU benchmarks, written out (gpt-fast style).

RMSNorm, fused qkv, rotary embeddings, grouped-query SDPA (32 query heads,
8 KV heads, head dim 128), o, RMSNorm, fused gate+up, SiLU, down; bf16;
hidden 4096, FFN 14336; a static KV cache. The linear layers come from a
factory ``linear(out_features, in_features, seed)``, so each benchmark
chooses its weights (random 2:4, random dense). :func:`time_decode` times one
decode step captured in a CUDA graph (:func:`capture_decode`), as a serving engine runs it;
:func:`time_decode_eager` times it without a graph, as a plain Python loop
(Hugging Face ``generate``) runs it, launch costs included;
:func:`compile_glue` fuses the small operations between the linears.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsa.benchmarking import cuda_median_ms

LinearFactory = Callable[[int, int, int], nn.Module]

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128


def _norm(x, weight):
    return F.rms_norm(x, (HIDDEN,), weight, 1e-5)


def _add_norm(x, delta, weight):
    x = x + delta
    return x, F.rms_norm(x, (HIDDEN,), weight, 1e-5)


def _attention(qkv, cos, sin, cache_k, cache_v, start: int):
    """Split the fused projection, rotate q and k, write the cache, attend; ``[B, T, H * D]``."""
    b, t, _ = qkv.shape
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    q = rotate(q.view(b, t, HEADS, HEAD_DIM), cos, sin).transpose(1, 2)
    k = rotate(k.view(b, t, KV_HEADS, HEAD_DIM), cos, sin).transpose(1, 2)
    v = v.view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
    cache_k[:, :, start : start + t] = k
    cache_v[:, :, start : start + t] = v
    keys, values = cache_k[:, :, : start + t], cache_v[:, :, : start + t]
    # prefill from 0: causal; one decode token: it sees the whole cache
    attn = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=True)
    return attn.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)


def _swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


EAGER = {"norm": _norm, "add_norm": _add_norm, "attention": _attention, "swiglu": _swiglu}
GLUE = dict(EAGER)


def compile_glue() -> None:
    """Fuse everything between the linear layers with ``torch.compile``, as serving engines do (gpt-fast, vLLM).

    Eager, the glue is ~40 small kernels per layer and, at one token, costs as
    much as a third of the decode step; compiled, it is a handful. Dense and
    sparse stacks share the same compiled glue, so only the linears differ.
    """
    for name, fn in list(GLUE.items()):
        GLUE[name] = torch.compile(fn, fullgraph=True, dynamic=False)


class Block(nn.Module):
    def __init__(self, seed: int, linear: LinearFactory) -> None:
        super().__init__()
        self.qkv = linear((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, seed * 8)
        self.o = linear(HIDDEN, HEADS * HEAD_DIM, seed * 8 + 1)
        self.gate_up = linear(2 * FFN, HIDDEN, seed * 8 + 2)
        self.down = linear(HIDDEN, FFN, seed * 8 + 3)
        self.norm1 = nn.RMSNorm(HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.norm2 = nn.RMSNorm(HIDDEN, device="cuda", dtype=torch.bfloat16)

    def forward(self, x, cos, sin, cache_k, cache_v, start: int, glue: dict | None = None):
        glue = GLUE if glue is None else glue
        attn = glue["attention"](self.qkv(glue["norm"](x, self.norm1.weight)), cos, sin, cache_k, cache_v, start)
        x, h = glue["add_norm"](x, self.o(attn), self.norm2.weight)
        return x + self.down(glue["swiglu"](self.gate_up(h)))


def block_prefill(block: Block, x: torch.Tensor) -> torch.Tensor:
    """One block on a prefill ``x`` in x's dtype (float64 for a reference), eager glue, a fresh cache."""
    cos, sin = rope(torch.arange(x.shape[1], device="cuda"))
    cache = torch.zeros((1, KV_HEADS, x.shape[1], HEAD_DIM), device="cuda", dtype=x.dtype)
    return block(x, cos, sin, cache, cache.clone(), 0, glue=EAGER)


def rotate(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope(positions: torch.Tensor):
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM))
    angles = positions.float()[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


class Stack(nn.Module):
    def __init__(self, layers: int, max_len: int, linear: LinearFactory) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(i, linear) for i in range(layers))
        shape = (1, KV_HEADS, max_len, HEAD_DIM)
        self.caches = [(torch.zeros(shape, device="cuda", dtype=torch.bfloat16),
                        torch.zeros(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]

    def forward(self, x, start: int):
        cos, sin = rope(torch.arange(start, start + x.shape[1], device="cuda"))
        for block, (ck, cv) in zip(self.blocks, self.caches):
            x = block(x, cos, sin, ck, cv, start)
        return x


def _decode_token() -> torch.Tensor:
    """The one token every decode timing feeds (seeded, so dense and ours see the same input)."""
    return torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(7))


def capture_decode(model, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One decode step at position ``context`` captured in a CUDA graph, and the graph's output tensor."""
    token = _decode_token()
    model(token, context)  # eager first: dispatch measured outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(token, context)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(token, context)
    return graph, out


def time_decode(model, context: int, reps: int) -> tuple[float, torch.Tensor]:
    """Median ms of one graph-captured decode step at position ``context`` (its output, for checking)."""
    graph, out = capture_decode(model, context)
    return cuda_median_ms(graph.replay, reps=reps, warmup=3), out.clone()


def time_decode_eager(model, context: int, steps: int) -> float:
    """Milliseconds per decode step at position ``context`` without a CUDA graph: wall time over ``steps``
    steps, so a step costs whichever is longer, the GPU's work or the CPU's launches."""
    token = _decode_token()
    for _ in range(3):
        model(token, context)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(token, context)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0 / steps


def rel_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
