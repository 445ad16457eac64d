"""sparsa: make transformer models sparse, and measure what that buys.

The verbs mirror the CLI::

    import sparsa
    lm = sparsa.load_model()                       # the embedded SmolLM2-135M-Instruct
    before = sparsa.evaluate(lm)                   # perplexity on the shipped text
    sparsa.prune(lm, sparsa.PruneConfig(method="wanda", sparsity=0.5))
    after = sparsa.evaluate(lm)
    sparsa.save(lm, "smollm2-wanda50")
    sparsa.attention.apply(lm.model, "antidiagonal", threshold=0.9)   # sparse attention for long prompts
    sparsa.activations.apply(lm, "wina", sparsity=0.4)              # activation sparsity for decoding
    sparsa.train(lm, method="distill", teacher=dense_model, steps=200)  # recover after pruning, mask kept
"""

__version__ = "0.1.0"

from . import activations, attention  # noqa: E402
from .api import evaluate, inspect, load_model, prune, save, train  # noqa: E402
from .errors import SparsaError  # noqa: E402
from .kernels import accelerate  # noqa: E402
from .prune.config import PruneConfig  # noqa: E402

__all__ = [
    "PruneConfig", "SparsaError", "__version__", "accelerate", "activations", "attention", "evaluate", "inspect",
    "load_model", "prune", "save", "train",
]
