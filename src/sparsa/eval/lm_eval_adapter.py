"""Run lm-evaluation-harness tasks on an in-memory model.

``evaluate_tasks`` wraps a loaded transformers causal LM and its tokenizer in
lm-eval's own ``HFLM`` and runs tasks through ``lm_eval.evaluator.evaluate``, so
prompts, few-shot sampling and scoring are exactly lm-eval's. It adds:

* task lookup with a one-line error for unknown names (``include_path`` adds a
  folder of task YAML files to lm-eval's built-in ones);
* quiet runs: lm-eval's logging, its progress bars and those of ``datasets``
  are silenced while it runs;
* determinism: Python, NumPy and torch are seeded with ``seed`` (and few-shot
  sampling too), and their previous random states are restored afterwards;
* a flat result, ``{task: {metric: value}}``, with lm-eval's ``",none"`` filter
  suffix stripped and standard errors left out (bootstrapping is off).

lm-eval is optional (``pip install 'sparsa[eval]'``) and imported only here,
inside the function.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsa.errors import DataError, InputError, SparsaError, require

__all__ = ["evaluate_tasks"]

_NOT_INSTALLED = "lm-eval is not installed; pip install 'sparsa[eval]' (or lm-eval) to use --tasks"


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on lm-eval ``tasks`` and return ``{task: {metric: value}}``.

    Args:
        model: a transformers causal LM instance (``PreTrainedModel``), on any device.
        tokenizer: its tokenizer (a transformers tokenizer instance).
        tasks: lm-eval task, group or tag names (``"hellaswag"``, ``"arc_easy"``), or
            paths to task YAML files.
        include_path: a folder of extra task YAML files (searched before the built-in ones).
        limit: evaluate only the first ``limit`` documents of each task.
        batch_size: requests per forward pass.
        num_fewshot: few-shot examples per prompt; ``None`` keeps each task's own
            setting (0 when it has none). Tasks whose config pins 0 stay at 0.
        seed: seeds Python, NumPy, torch and few-shot sampling for this run.

    Returns:
        ``{task: {metric: value}}`` for every task (and group) lm-eval reports, e.g.
        ``{"arc_easy": {"acc": 0.61, "acc_norm": 0.57}}``. Metrics under lm-eval's
        default filter lose their ``",none"`` suffix; metrics under another filter keep
        it (``"exact_match,strict-match"``). Standard errors are not computed.

    Raises:
        SparsaError: lm-eval is not installed.
        InputError: bad arguments, a missing ``include_path``, or unknown task names.
        DataError: a task that lm-eval cannot build (broken YAML, unreadable dataset).
    """
    try:
        import lm_eval  # noqa: F401
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise SparsaError(_NOT_INSTALLED) from err

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = [str(t).strip() for t in (tasks or [])]
    require(bool(tasks) and all(tasks), "no lm-eval tasks given; name at least one, e.g. --tasks arc_easy")
    tasks = list(dict.fromkeys(tasks))  # drop repeats, keep order
    require(limit is None or (_is_int(limit) and limit >= 1), f"limit must be a positive integer, got {limit!r}")
    require(_is_int(batch_size) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}")
    require(
        num_fewshot is None or (_is_int(num_fewshot) and num_fewshot >= 0),
        f"num_fewshot must be a non-negative integer, got {num_fewshot!r}",
    )
    require(_is_int(seed), f"seed must be an integer, got {seed!r}")
    require(tokenizer is not None, "evaluate_tasks needs the model's tokenizer")
    if include_path is not None:
        include_path = Path(include_path).expanduser()
        require(
            include_path.is_dir(),
            f"task include path {str(include_path)!r} is not a folder; point it at a folder of lm-eval task YAML files",
        )

    was_training = bool(getattr(model, "training", False))
    had_pad_token = getattr(tokenizer, "pad_token", None) is not None
    try:
        with _quiet(), _seeded(seed):
            manager = _task_manager(TaskManager, tasks, include_path)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), backend="causal")
            loaded = _load_tasks(manager, tasks)  # TaskManager.load: lm-eval 0.4.13 and later
            for task in loaded["tasks"].values():
                _set_fewshot(task, num_fewshot, seed)
            output = evaluate(
                lm=lm,
                task_dict=loaded,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                write_out=False,
                cache_requests=False,
            )
    finally:
        # HFLM switches the model to eval mode and gives a pad-less tokenizer a pad
        # token; hand both back as they came.
        if was_training:
            model.train()
        if not had_pad_token and getattr(tokenizer, "pad_token", None) is not None:
            with contextlib.suppress(Exception):
                tokenizer.pad_token = None
    return _flatten(output)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _task_manager(TaskManager, tasks: list[str], include_path: Path | None):
    """A TaskManager that knows every name in ``tasks``, or InputError naming the unknown ones.

    Indexing lm-eval's ~15,000 built-in task configs takes seconds, so when every
    requested name is a plain task found in ``include_path`` alone, that smaller index
    is used: include_path tasks take precedence over built-in ones of the same name, so
    the result is the same.
    """
    if include_path is not None:
        try:
            local = TaskManager(include_path=str(include_path), include_defaults=False)
        except TypeError:  # an lm-eval without include_defaults
            local = None
        index = getattr(local, "task_index", None) or {}
        if all(getattr(getattr(index.get(t), "kind", None), "name", None) in ("TASK", "PY_TASK") for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not _is_yaml_file(t)]
    if unknown:
        hints = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3, cutoff=0.75)})
        did_you_mean = f" (did you mean {', '.join(hints)}?)" if hints else ""
        where = f" or in {str(include_path)!r}" if include_path is not None else ""
        raise InputError(
            f"unknown lm-eval task(s): {', '.join(unknown)}{did_you_mean}; not among lm-eval's built-in tasks{where}. "
            "List them with `lm-eval ls tasks`, or pass a folder of task YAML files with --include-path "
            "(include_path=...)"
        )
    return manager


def _load_tasks(manager, tasks: list[str]):
    """Build the tasks (this reads their datasets); a failure is one DataError line, not a traceback."""
    try:
        return manager.load(tasks)
    except Exception as err:  # a broken task YAML, a dataset that cannot be read or downloaded, ...
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise DataError(
            f"lm-eval could not load task(s) {', '.join(tasks)}: {type(err).__name__}"
            f"{': ' + detail if detail else ''}; check the task's YAML and that its dataset can be read "
            "(offline, it must already be in the Hugging Face cache; then set HF_HUB_OFFLINE=1)"
        ) from err


def _is_yaml_file(name: str) -> bool:
    path = Path(name).expanduser()
    return path.suffix in (".yaml", ".yml") and path.is_file()


def _set_fewshot(task, num_fewshot: int | None, seed: int) -> None:
    """lm-eval's own rule (as in simple_evaluate): a config that pins 0 shots wins."""
    configured = task.get_config("num_fewshot")
    if num_fewshot is not None and configured != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif configured is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)


def _flatten(output) -> dict[str, dict[str, float]]:
    results = (output or {}).get("results", {})
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue  # "alias", "samples", ..., and standard errors
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            row[metric if filter_name == "none" else key] = float(value)
        flat[task] = row
    return flat


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch for the run; restore their states afterwards."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _silent_tqdm(tqdm_cls):
    def make(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm_cls(*args, **kwargs)

    return make


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence lm-eval's logging and progress bars (and those of ``datasets`` and the hub client) for the run."""
    import importlib

    saved_levels = {}
    for name in ("lm_eval", "datasets", "huggingface_hub"):
        logger = logging.getLogger(name)
        saved_levels[name] = logger.level
        logger.setLevel(logging.ERROR)

    patched = []
    for module_name in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(module, "tqdm", None)
        if original is not None:
            patched.append((module, original))
            module.tqdm = _silent_tqdm(original)

    bars_were_on = None
    try:
        from datasets.utils import logging as ds_logging

        bars_were_on = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    except ImportError:
        ds_logging = None
    try:
        yield
    finally:
        if ds_logging is not None and bars_were_on:
            ds_logging.enable_progress_bar()
        for module, original in patched:
            module.tqdm = original
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
