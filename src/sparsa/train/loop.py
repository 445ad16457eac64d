"""A plain PyTorch training loop whose checkpoints resume exactly.

A checkpoint holds everything the next step depends on: the weights
(safetensors), the masks (safetensors), the method's own tensors
(safetensors), and the optimizer, scheduler, random-number states, step and
loss curve (``torch.save``, read back with ``weights_only=True``). The data
position needs no state of its own: batch ``k`` is a pure function of the
text, the sizes, the seed and ``k``. Each checkpoint is written to a
temporary directory that is renamed into place, then ``latest.json`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint
intact. On a CPU with the same settings, training N steps, stopping at k and
resuming to N gives bitwise the same weights as N steps in one go.

Several processes: launched by ``torchrun --nproc_per_node G``, the model's
decoder layers and then the model are wrapped with FSDP2
(``torch.distributed.fsdp.fully_shard``); the batch of each step is split
between the processes, so the loss curve is that of one process with the
same batch size. Nothing else is distributed by hand.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.calibration import tokenize
from ..errors import DataError, InputError, require
from ..models import atomic_write_text
from ..prune.pipeline import checkpoint_directory, read_checkpoint
from .config import TrainConfig
from .masks import MaskState

__all__ = ["TokenBatches", "full_state_dict", "rank", "train_loop", "world"]

LATEST = "latest.json"
# Settings that may differ between an interrupted run and its resumption.
FREE_ON_RESUME = ("checkpoint_every", "log_every")


# -- data ---------------------------------------------------------------------------------

class TokenBatches:
    """Batches of ``seq_len``-token windows of a text, in a seeded order, addressed by step.

    The text is cut into non-overlapping windows; each pass over them (epoch)
    takes its own seeded permutation. ``batch(step)`` is a pure function of
    the step, so resuming needs no data state, and under ``world`` processes
    each takes its slice of the same global batch.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        count = len(ids) // seq_len
        if count == 0:
            raise DataError(f"the training text has {len(ids)} tokens, fewer than one sequence of {seq_len}; pass a longer text or a smaller --seq-len")
        require(batch_size % world == 0, f"batch size {batch_size} does not split over {world} processes; pass a multiple of {world}")
        self.windows = ids[: count * seq_len].view(count, seq_len)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.sha256 = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        self._orders: dict[int, torch.Tensor] = {}

    @classmethod
    def from_text(cls, tokenizer, text: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> "TokenBatches":
        return cls(tokenize(tokenizer, text), seq_len, batch_size, seed, rank, world)

    def __len__(self) -> int:
        return len(self.windows)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.windows), generator=generator)}
        return self._orders[epoch]

    def batch(self, step: int) -> torch.Tensor:
        """This process's share of the ``step``-th global batch: ``[batch_size / world, seq_len]``."""
        per = self.batch_size // self.world
        first = step * self.batch_size + self.rank * per
        rows = []
        for index in range(first, first + per):
            epoch, position = divmod(index, len(self.windows))
            rows.append(self.windows[self._order(epoch)[position]])
        return torch.stack(rows)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.windows.shape[1]


# -- processes ----------------------------------------------------------------------------

def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _distributed_setup(model: nn.Module, teacher: nn.Module | None, masks: MaskState) -> torch.device:
    """Under torchrun: one process group, one GPU per process, FSDP2 on each decoder layer and the model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from ..models import adapter_for

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    model.to(device)
    # Every process starts from rank 0's weights and masks (pruning on several GPUs need not agree to the last bit).
    _broadcast(model.state_dict().values())
    for name, mask in masks.masks.items():
        flat = mask.to(device, torch.uint8)
        dist.broadcast(flat, src=0)
        masks.update(name, flat.to("cpu", torch.bool))
    for layer in adapter_for(model).layers(model):
        fully_shard(layer)
    fully_shard(model)
    if teacher is not None:
        teacher.to(device)  # the teacher only runs forward: a full copy per process
        _broadcast(teacher.state_dict().values())
    return device


def _broadcast(tensors) -> None:
    import torch.distributed as dist

    seen = set()
    for t in tensors:
        if id(t) not in seen:  # tied weights once
            seen.add(id(t))
            dist.broadcast(t.data, src=0)


def _mean_over_processes(value: torch.Tensor) -> float:
    if world() > 1:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return float(value.detach())


# -- the loop -----------------------------------------------------------------------------

def train_loop(
    model: nn.Module,
    method,
    masks: MaskState,
    config: TrainConfig,
    data: TokenBatches,
    teacher: nn.Module | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place with ``method`` for ``config.steps`` steps; returns the run's record."""
    if resume and checkpoint_dir is None:
        raise InputError("--resume needs --checkpoint-dir (the directory the interrupted run wrote)")
    processes = world()
    if processes > 1:
        require(method.distributed, f"method {config.method} runs in one process only; launch it without torchrun (masked and distill run under FSDP2)")
        device = _distributed_setup(model, teacher, masks)
    else:
        device = next(model.parameters()).device
    given, masks = masks, method.setup(model, masks)
    if method.holds_mask:
        masks.apply(model)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95), foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: method.lr_factor(s))
    handles = masks.attach(optimizer, model) if method.holds_mask else ()
    store = _Checkpoints(checkpoint_dir, config, data.sha256) if checkpoint_dir else None
    start, losses, seconds_before = 0, [], 0.0
    if resume:
        start, losses, seconds_before = store.load(model, optimizer, scheduler, masks, method)
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc=f"train {config.method}", unit="step", disable=not progress or rank() != 0)
    try:
        for step in range(start, config.steps):
            batch = data.batch(step).to(device)
            loss, metrics = method.loss(model, batch, teacher)
            loss.backward()
            method.before_step(model, masks, step)
            if method.holds_mask:
                masks.mask_gradients(model)  # before clipping, so pruned weights add nothing to the norm
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(model, masks, step, optimizer)
            value = _mean_over_processes(loss)
            losses.append(value)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                parts = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())
                bar.set_postfix_str(f"loss {value:.4f} {parts}".strip(), refresh=False)
            bar.update(1)
            if store and (step + 1 == config.steps or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
                store.save(step + 1, model, optimizer, scheduler, masks, method, losses, seconds_before + time.perf_counter() - started)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    method.finish(model, masks)
    given.assign(masks)  # the caller's MaskState ends as the run's masks
    model.eval()
    seconds = seconds_before + time.perf_counter() - started
    return {
        "method": config.method,
        "config": config.to_dict(),
        "steps": config.steps,
        "tokens": config.steps * data.tokens_per_step(),
        "processes": processes,
        "resumed_from_step": start if resume else None,
        "seconds": round(seconds, 2),
        "loss_curve": losses,
        "mask_sparsity": masks.sparsity(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **method.record(),
    }


# -- checkpoints --------------------------------------------------------------------------

def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own, contiguous CPU copies (safetensors refuses tensors that share memory, such as tied embeddings)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


class _Checkpoints:
    """``DIR/step-NNNNNNN/`` directories, the newest named by ``DIR/latest.json``; older ones are removed."""

    def __init__(self, directory, config: TrainConfig, data_sha256: str) -> None:
        self.dir = checkpoint_directory(directory)
        self.key = {"config": {k: v for k, v in config.to_dict().items() if k not in FREE_ON_RESUME}, "data_sha256": data_sha256}

    def save(self, step: int, model, optimizer, scheduler, masks: MaskState, method, losses: list[float], seconds: float) -> None:
        model_state, optim_state = _state_dicts(model, optimizer)
        if rank() != 0:
            return
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            save_file(_plain(model_state), tmp / "model.safetensors")
            save_file(masks.state_dict(), tmp / "masks.safetensors")
            save_file(_plain(method.state_dict()), tmp / "method.safetensors")
            torch.save({
                "step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "losses": losses, "seconds": seconds,
            }, tmp / "state.pt")
            name = f"step-{step:07d}"
            target = self.dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.dir / LATEST, json.dumps({**self.key, "step": step, "path": name}, indent=1, default=str) + "\n")
        for old in self.dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, model, optimizer, scheduler, masks: MaskState, method) -> tuple[int, list[float], float]:
        path = self.dir / LATEST
        if not path.is_file():
            raise InputError(f"no checkpoint in {self.dir} to resume from; run without --resume to start")
        latest = read_checkpoint(path, lambda p: json.loads(p.read_text()))
        if latest["config"] != json.loads(json.dumps(self.key["config"], default=str)) or latest["data_sha256"] != self.key["data_sha256"]:
            raise InputError(f"the checkpoint in {self.dir} was made with other settings or data; rerun with the same flags, or delete it to start over")
        where = self.dir / latest["path"]
        state = read_checkpoint(where / "state.pt", lambda p: torch.load(p, weights_only=True))
        _load_state_dicts(model, optimizer, read_checkpoint(where / "model.safetensors", load_file), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        saved_masks = MaskState.from_state_dict(read_checkpoint(where / "masks.safetensors", load_file))
        for name in masks.names():
            masks.update(name, saved_masks.masks[name])
        method.load_state_dict(read_checkpoint(where / "method.safetensors", load_file))
        _set_rng_state(state["rng"])
        return state["step"], list(state["losses"]), float(state["seconds"])


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    if world() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU; under FSDP2 every process must call it and rank 0 alone gets them."""
    if world() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_state_dicts(model, optimizer, model_state: dict, optim_state: dict) -> None:
    if world() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
