"""Sparse training and recovery: train a pruned model while its sparsity holds.

``MaskState`` (masks as state, enforced around every optimizer step, with a
Hugging Face ``Trainer`` callback, ``MaskCallback``), a plain PyTorch loop
whose checkpoints resume exactly (``loop.py``; FSDP2 under torchrun), and
one file per method, registered in ``TRAIN_METHODS``:

* ``masked``, ``distill``: masked fine-tuning, alone or distilled from the dense teacher (``distill.py``)
* ``sr_ste``: N:M training with SR-STE and a progressively decaying gradient to pruned weights (``sr_ste.py``)
* ``rigl``, ``set``: dynamic sparse training, mask moves, sparsity holds (``dst.py``)
* ``imp``: iterative magnitude pruning with weight rewinding (``imp.py``)
* ``soup``: copies sharing a mask, trained with different seeds, averaged (``soups.py``)

    import sparsa
    lm = sparsa.load_model(); teacher = sparsa.load_model()
    sparsa.prune(lm, method="wanda", pattern="2:4")
    sparsa.train(lm, method="distill", teacher=teacher, steps=200)
"""

from . import distill, dst, imp, soups, sr_ste  # noqa: F401  (each registers its methods)
from .base import TRAIN_METHODS, TrainMethod
from .config import TrainConfig
from .loop import TokenBatches, train_loop
from .masks import MaskState
from .run import train_model

__all__ = ["TRAIN_METHODS", "MaskCallback", "MaskState", "TokenBatches", "TrainConfig", "TrainMethod", "train_loop", "train_model"]


def __getattr__(name: str):
    if name == "MaskCallback":  # transformers' Trainer machinery loads only when asked for
        from .callback import MaskCallback

        return MaskCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
