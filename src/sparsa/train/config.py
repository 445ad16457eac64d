"""What a training run is asked to do: one frozen, validated record (written to sparsa.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import require
from ..prune.config import parse_nm


@dataclass(frozen=True)
class TrainConfig:
    method: str = "distill"
    data: str = "calibration"  # 'calibration' (shipped), a .txt/.jsonl file or hf:NAME:SPLIT
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4  # sequences per optimizer step, over all processes
    seq_len: int = 256
    seed: int = 0
    weight_decay: float = 0.0
    warmup: int = 0  # linear warm-up steps, then cosine decay to ``min_lr_ratio * lr``
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    checkpoint_every: int = 0  # 0: only at the end (when a checkpoint directory is given)
    log_every: int = 1
    # distill: per-layer L2 on normalised hidden states + KL on logits from the dense teacher
    ce_weight: float = 1.0
    hidden_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 1.0
    # sr_ste: the N:M pattern; rigl, set and imp (unstructured, per layer): the sparsity
    pattern: str = "2:4"
    sparsity: float = 0.5
    srste_decay: float = 2e-4  # lambda_W of SR-STE, the pull towards zero on pruned weights
    # rigl / set
    update_every: int = 10  # steps between mask updates (Delta T)
    update_fraction: float = 0.3  # alpha: fraction of active weights moved at the first update, cosine-decayed
    update_until: float = 0.75  # fraction of the run after which the mask stays put
    # imp
    rounds: int = 3
    rewind_step: int = 0  # weights rewind to their values after this many steps of round 1
    # soup
    soup_size: int = 3
    soup_base: str = "masked"  # the method each ingredient trains with
    soup_vary: str = "order"  # 'order' (data order), 'seed' (data order and method randomness)

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}; e.g. --lr 1e-4")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(self.seq_len >= 8, f"--seq-len / seq_len must be at least 8 tokens, got {self.seq_len}; pass 8 or more")
        require(self.weight_decay >= 0, f"weight_decay must be non-negative, got {self.weight_decay}")
        require(0 <= self.warmup < self.steps, f"warmup must be in [0, steps), got {self.warmup} with {self.steps} steps")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, f"grad_clip must be non-negative (0 disables it), got {self.grad_clip}")
        require(self.checkpoint_every >= 0 and self.log_every >= 1, "checkpoint_every must be >= 0 and log_every >= 1")
        require(min(self.ce_weight, self.hidden_weight, self.kl_weight) >= 0, "distillation weights must be non-negative")
        require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        require(0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity}; e.g. 0.5 for half the weights")
        require(self.srste_decay >= 0, f"srste_decay must be non-negative, got {self.srste_decay}")
        require(self.update_every >= 1, f"update_every must be at least 1, got {self.update_every}")
        require(0 < self.update_fraction < 1, f"update_fraction must be in (0, 1), got {self.update_fraction}")
        require(0 < self.update_until <= 1, f"update_until must be in (0, 1], got {self.update_until}")
        require(self.rounds >= 1, f"rounds must be at least 1, got {self.rounds}")
        if self.method == "imp":
            require(self.steps >= self.rounds, f"imp needs at least one step per round: {self.steps} steps, {self.rounds} rounds")
            require(0 <= self.rewind_step < max(1, self.steps // self.rounds), f"rewind_step must be inside the first round (< {self.steps // self.rounds}), got {self.rewind_step}")
        require(self.soup_size >= 1, f"soup_size must be at least 1, got {self.soup_size}")
        require(self.soup_base != "soup", "a soup's ingredients cannot be soups; set soup_base to masked, distill, ...")
        require(self.soup_vary in ("order", "seed"), f"soup_vary must be 'order' or 'seed', got {self.soup_vary!r}")
        if self.pattern != "unstructured":
            parse_nm(self.pattern, others=("unstructured",))  # training keeps no structured pattern

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern == "unstructured" else parse_nm(self.pattern)

    def to_dict(self) -> dict:
        return asdict(self)
