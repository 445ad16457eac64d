"""Measured speed of a configuration against the dense model on a CUDA GPU: prefill time and decode tokens/s.

Decoding is timed two ways. *Eager*: a Python loop of forward calls with
a growing cache, as Hugging Face ``generate`` runs; for a small model the
CPU that issues the kernels bounds it, not the GPU. *Graph*: one decode
step (forward, greedy pick of the next token, position advanced) captured
in a CUDA graph over a static KV cache and replayed, as serving engines
run it; this times the GPU's work. A model whose step cannot be captured
(a host synchronisation inside it) is timed eagerly only, and the record
says why. A sparse attention pattern chooses its slots of the static cache
on the device (streaming by position; quest by page bounds it keeps from
step to step), so its step is replayed like any other.

Dense and the configuration alternate for ``MEASURE_ROUNDS`` rounds, the
order swapped every round, and each speedup is the median of the per-round
ratios: a drift in clocks or in the host's load then moves both sides of a
ratio alike, and neither always finds the GPU warmer.
"""

from __future__ import annotations

import statistics

import torch

from ..models.adapters import cache_keyword, returned_cache
from .config import Settings

__all__ = ["MEASURE_ROUNDS", "GraphDecoder", "eager_decode", "measure"]

MEASURE_ROUNDS = 6  # an even count: each side goes first as often


def _inputs(model, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, settings.prefill_tokens), generator=gen).to(device)
    ctx = torch.randint(0, config.vocab_size, (1, settings.decode_context), generator=gen).to(device)
    return ids, ctx


def _events_ms(fn) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def eager_decode(model, ctx: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """Greedy decoding after ``ctx`` with a growing cache, one forward per step: the tokens picked, and the
    milliseconds the ``steps`` steps took (the prefill of ``ctx`` before them is not timed)."""
    out = model(input_ids=ctx, use_cache=True)
    past, token, tokens = returned_cache(out), out.logits[:, -1:].argmax(-1), []
    keyword = cache_keyword(model)

    def run() -> None:
        nonlocal out, past, token
        for _ in range(steps):
            tokens.append(token)
            out = model(input_ids=token, use_cache=True, **{keyword: past})
            past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)

    ms = _events_ms(run)
    return [int(t) for t in torch.cat(tokens, dim=1)[0]], ms


class GraphDecoder:
    """Greedy decode steps after a fixed context, replayed from one CUDA graph over a static KV cache.

    :meth:`start` prefills the context (eagerly) and sets the first token;
    each :meth:`step` replays the captured step: the forward at the current
    position, the next token picked into the same buffer, the position
    advanced. Construction raises if the step cannot be captured.
    """

    WARM_STEPS = 2  # eager steps before capture: the kernels measure their dispatch, compile, allocate

    def __init__(self, model, ctx: torch.Tensor, steps: int) -> None:
        from transformers import StaticCache

        self.model, self.ctx, self.steps = model, ctx, steps
        self.keyword = cache_keyword(model)
        self.cache = StaticCache(config=model.config, max_cache_len=ctx.shape[1] + steps + self.WARM_STEPS + 1)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=ctx.device)
        self.position = torch.zeros((1,), dtype=torch.long, device=ctx.device)
        self.start()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARM_STEPS):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.start()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.start()  # the capture recorded the step without running it; begin again from the context

    def _step(self) -> None:
        out = self.model(input_ids=self.token, cache_position=self.position, use_cache=True, **{self.keyword: self.cache})
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.add_(1)

    def start(self) -> None:
        self.cache.reset()
        length = self.ctx.shape[1]
        out = self.model(input_ids=self.ctx, use_cache=True, **{self.keyword: self.cache},
                         cache_position=torch.arange(length, device=self.ctx.device))
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.fill_(length)

    def step(self) -> None:
        self.graph.replay()

    def tokens(self) -> list[int]:
        """The tokens of a fresh run of ``steps`` replays (for checking the graph against eager decoding)."""
        self.start()
        picked = []
        for _ in range(self.steps):
            picked.append(int(self.token))
            self.step()
        return picked

    def tok_s(self) -> float:
        self.start()
        return self.steps / (_events_ms(lambda: [self.step() for _ in range(self.steps)]) / 1000.0)


def _graph_decoder(model, ctx: torch.Tensor, steps: int) -> tuple[GraphDecoder | None, str | None]:
    try:
        return GraphDecoder(model, ctx, steps), None
    except Exception as e:  # noqa: BLE001 - the model is timed eagerly instead, and the reason kept
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _one_round(model, settings: Settings, ids, ctx, graph: GraphDecoder | None) -> tuple[float, float, float | None]:
    """Prefill ms at ``prefill_tokens`` (CUDA-event median of 3), eager decode tokens/s over ``decode_tokens``
    steps, and CUDA-graph decode tokens/s (None without a graph)."""
    from ..benchmarking import cuda_median_ms

    prefill_ms = cuda_median_ms(lambda: model(input_ids=ids, use_cache=False), reps=3, warmup=0)
    eager = settings.decode_tokens / (eager_decode(model, ctx, settings.decode_tokens)[1] / 1000.0)
    return prefill_ms, eager, None if graph is None else graph.tok_s()


def measure(dense, model, settings: Settings, no_graph: str | None = None) -> dict:
    """Speedups of ``model`` over ``dense`` (the same object for dense itself): prefill, eager decode and, where
    both steps can be captured, CUDA-graph decode; ``*_range``: the smallest and largest per-round ratio.

    ``no_graph``: why ``model``'s decode step must not be timed from a graph (it would not run as configured
    there); decode is then timed eagerly only.
    """
    ids, ctx = _inputs(dense, settings)
    models = (dense, model) if model is not dense else (dense,)
    out: dict = {}
    with torch.inference_mode():
        graphs: list[GraphDecoder | None] = [None] * len(models)
        if no_graph is not None:
            out["decode_graph_error"] = no_graph
        elif settings.decode_graph:  # both or neither: a ratio compares one way of decoding
            built = [_graph_decoder(m, ctx, settings.decode_tokens) for m in models]
            why = next((reason for _, reason in built if reason is not None), None)
            if why is None:
                graphs = [graph for graph, _ in built]
            else:
                out["decode_graph_error"] = why
        for m, g in zip(models, graphs):  # warm-up: first calls pay for kernel selection, compilation and caches
            _one_round(m, settings, ids, ctx, g)
        rounds = []
        for i in range(MEASURE_ROUNDS):
            order = list(zip(models, graphs))
            order = order if i % 2 == 0 else order[::-1]
            timed = {id(m): _one_round(m, settings, ids, ctx, g) for m, g in order}
            rounds.append([timed[id(m)] for m in models])
        del graphs
    names = ("prefill_ms", "decode_eager_tok_s", "decode_graph_tok_s")
    graphed = rounds[0][0][2] is not None
    for j, name in enumerate(names[:3 if graphed else 2]):
        out[f"dense_{name}"] = statistics.median(r[0][j] for r in rounds)
        out[name] = statistics.median(r[-1][j] for r in rounds)
        ratios = [r[0][j] / r[-1][j] if j == 0 else r[-1][j] / r[0][j] for r in rounds]
        speedup = name.replace("_ms", "").replace("_tok_s", "") + "_speedup"
        out[speedup] = statistics.median(ratios)
        if model is not dense:
            out[f"{speedup}_range"] = [min(ratios), max(ratios)]
    # the headline decode figure: the GPU's work where the step was captured, else eager
    mode = "graph" if graphed else "eager"
    out["decode_mode"] = mode
    out["decode_speedup"] = out[f"decode_{mode}_speedup"]
    out["decode_tok_s"], out["dense_decode_tok_s"] = out[f"decode_{mode}_tok_s"], out[f"dense_decode_{mode}_tok_s"]
    if model is not dense:
        out["decode_speedup_range"] = out[f"decode_{mode}_speedup_range"]
    return out
