"""Run a sweep: one fresh copy of the dense model per configuration, results appended to a JSONL file.

The first line of ``results.jsonl`` is a header (model and settings); each
later line is one configuration's record, written (line, flush, fsync) as
soon as it finishes. A rerun with the same model and settings skips every
id already recorded, ``ok`` or ``error``; a failing configuration is recorded
with its error type and message, and the sweep goes on.

``ray="ADDRESS"`` (or ``"local"``) runs each configuration as a Ray task,
one GPU each where the cluster has GPUs, else one CPU each; the driver
writes the records as the tasks finish.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InputError
from .config import Config, Settings, Sweep

__all__ = ["ResultStore", "evaluate_config", "run_sweep"]

STOP_ENV = "SPARSA_FRONTIER_STOP_AFTER"  # tests: exit abruptly after this many records (a killed sweep)
HEADER = "sparsa-frontier"


# -- the JSONL file ----------------------------------------------------------------------

class ResultStore:
    """An append-only JSONL file: a header line, then one record per configuration."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> tuple[dict | None, list[dict]]:
        """The header and the records; a line cut short by a kill is ignored."""
        if not self.path.is_file():
            return None, []
        header, records = None, []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if item.get("kind") == HEADER:
                header = header or item
            elif "id" in item:
                records.append(item)
        return header, records

    def append(self, item: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(item, default=_json_default, allow_nan=True) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a kill may have left a partial last line: start a new one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def reset(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def latest(records: Iterable[dict]) -> dict[str, dict]:
    """The last record of each id."""
    out: dict[str, dict] = {}
    for r in records:
        out[r["id"]] = r
    return out


# -- one configuration ---------------------------------------------------------------------

_BASE: dict = {}  # (source, device, dtype) -> LoadedModel, loaded once per process


def base_model(source: str | None, device: str = "cpu", dtype: str = "auto"):
    key = (str(source), device, str(dtype))
    if key not in _BASE:
        from ..models import load_model

        _BASE.clear()
        _BASE[key] = load_model(source, device=device, dtype=dtype)
    return _BASE[key]


def _fresh(base):
    from ..models import LoadedModel

    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source, base.info, copy.deepcopy(base.record))


class _DensityProbe:
    """Collects the block density each sparse attention call chose (``sparsa_last_density``)."""

    def __init__(self, model) -> None:
        self.values: list = []  # floats or scalar tensors
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith("self_attn") and isinstance(getattr(module, "layer_idx", None), int):
                self.handles.append(module.register_forward_pre_hook(self._clear))
                self.handles.append(module.register_forward_hook(self._take))

    @staticmethod
    def _clear(module, args):
        module.sparsa_last_density = None

    def _take(self, module, args, output):
        d = getattr(module, "sparsa_last_density", None)
        if d is not None:
            self.values.append(d)  # a GPU scalar is read at the end, not at every layer

    def mean(self) -> float | None:
        return sum(float(v) for v in self.values) / len(self.values) if self.values else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _speed_mode(settings: Settings, model) -> str:
    import torch

    on_gpu = next(model.parameters()).device.type == "cuda"
    if settings.speed == "measured" and not on_gpu:
        raise InputError("speed mode 'measured' needs the model on a CUDA GPU (--device cuda); use 'auto' or 'predicted'")
    if settings.speed == "predicted" or not on_gpu or not torch.cuda.is_available():
        return "predicted"
    return "measured"


def _measured_speed(base, model, settings: Settings, weights_24: bool, activations=None, attention: dict | None = None) -> dict:
    """Measured speedups over the dense model (``model is base.model`` for dense itself).

    The sparse model is timed on its kernels: the activation-sparse GEMV for
    the layers whose input ``activations`` cuts, then the 2:4 kernels for the
    other 2:4 layers (a layer runs one of the two; they do not combine).
    """
    import torch

    notes = []
    if activations is not None:
        from ..activations.kernel import use_kernels

        notes.append(f"activation sparse GEMV: {len(use_kernels(model, activations))} layers")
    if weights_24:
        try:
            from ..kernels import accelerate

            report = accelerate(model)
            notes.append(f"2:4 kernels: {len(report.get('replaced', []))} layers replaced" + (f" ({report['reason']})" if report.get("reason") else ""))
        except Exception as e:  # noqa: BLE001 - measured as it is, and said
            notes.append(f"2:4 kernels not used: {type(e).__name__}: {e}"[:200])
    from .timing import MEASURE_ROUNDS, measure

    no_graph = None
    if attention is not None and attention["phase"] in ("both", "decode") and not attention["graph_decode"]:
        no_graph = (f"{attention['method']} cannot choose its slots of a static cache on the device (a CUDA graph): "
                    "it would run dense there, so it decodes with a dynamic KV cache only")
    return {"kind": "measured", "device": torch.cuda.get_device_name(), **measure(base.model, model, settings, no_graph),
            "rounds": MEASURE_ROUNDS, "notes": notes}


def _apply(lm, config: Config, settings: Settings):
    """Make ``lm`` sparse as ``config`` says; returns (activation handle or None, attention policy dict or None)."""
    from ..api import prune

    if config.weights is not None:
        w = config.weights
        prune(lm, method=w.method, sparsity=w.sparsity, pattern=w.pattern, n_samples=settings.calibration_samples,
              seq_len=settings.calibration_seq_len, seed=settings.seed, progress=False)
    handle = None
    if config.activations is not None:
        from ..activations import apply as sparsify

        a = config.activations
        handle = sparsify(lm, a.method, a.sparsity, samples=settings.calibration_samples, seq_len=settings.calibration_seq_len, seed=settings.seed)
    attention = None
    if config.attention is not None:
        from ..attention import apply as sparse_attention, make_pattern

        at = config.attention
        sparse_attention(lm.model, at.method, min_len=at.min_len, **dict(at.settings))
        pattern = make_pattern(at.method, **dict(at.settings))
        attention = {"method": at.method, "min_len": at.min_len, "phase": pattern.phase, "graph_decode": pattern.decodes_in_graph}
    return handle, attention


def evaluate_config(config: Config, settings: Settings, *, source: str | None = None, device: str = "cpu", dtype: str = "auto", base=None) -> dict:
    """One configuration's record: accuracy, sparsity and speed; an exception becomes an ``error`` record."""
    import torch

    started = time.time()
    record: dict = {"id": config.id, "label": config.label, "config": config.to_dict()}
    lm = None
    try:
        base = base or base_model(source, device, dtype)
        torch.manual_seed(settings.seed)
        lm = _fresh(base)
        lm.model.eval()
        handle, attention = _apply(lm, config, settings)
        probe = _DensityProbe(lm.model)
        if handle is not None:
            handle.start_tracking()
        from ..api import inspect
        from ..data import load_text
        from ..eval.perplexity import perplexity

        ppl = perplexity(lm.model, lm.tokenizer, load_text(settings.text), seq_len=settings.seq_len,
                         max_tokens=settings.perplexity_tokens or None, progress=False)
        record.update(perplexity=ppl.perplexity, perplexity_tokens=ppl.tokens)
        if settings.longctx_tasks:
            from ..eval.longctx import evaluate_longctx

            res = evaluate_longctx(lm.model, lm.tokenizer, list(settings.longctx_tasks), [settings.longctx_length],
                                   n=settings.longctx_examples, seed=settings.seed, progress=False)
            tasks = {t: v[settings.longctx_length] for t, v in res["scores"].items()}
            record["longctx"] = {"score": sum(tasks.values()) / len(tasks), "length": settings.longctx_length, "tasks": tasks}
        if settings.lm_eval_tasks:
            from ..eval.lm_eval_adapter import evaluate_tasks

            record["lm_eval"] = evaluate_tasks(lm.model, lm.tokenizer, list(settings.lm_eval_tasks),
                                               include_path=settings.lm_eval_include_path, limit=settings.lm_eval_limit)
        record["linear_sparsity"] = inspect(lm).linear_sparsity
        if handle is not None:
            record["activation_sparsity"] = handle.measured_sparsity()
        if attention is not None:
            attention["density"] = probe.mean()
            record["attention_density"] = attention["density"]
        probe.remove()

        if _speed_mode(settings, lm.model) == "measured":
            if handle is not None:
                handle.track = False  # counting zeros syncs with the host at every cut
            timed = base.model if config.is_dense else lm.model
            record["speed"] = _measured_speed(base, timed, settings, bool(config.weights and config.weights.pattern == "2:4"), handle, attention)
        else:
            from ..activations.kernel import sparse_input_layers
            from .costmodel import model_cost, predict

            act_modules = set(sparse_input_layers(lm.model, handle)) if handle is not None else set()
            prediction = predict(model_cost(base.model), model_cost(lm.model, act_modules), prefill_tokens=settings.prefill_tokens,
                                 decode_context=settings.decode_context, activation_sparsity=config.activations.sparsity if config.activations else None,
                                 attention=attention)
            record["speed"] = prediction.to_dict()
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        record["status"] = "error"
        record["error"] = {"type": type(e).__name__, "message": (str(e).strip().splitlines() or [""])[0][:500],
                           "traceback": traceback.format_exc(limit=6)[-2000:]}
    finally:
        del lm
    record["seconds"] = round(time.time() - started, 2)
    record["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return record


def _ray_task(config_dict: dict, settings_dict: dict, source, device: str, dtype: str) -> dict:
    """What a Ray worker runs: rebuild the typed objects, evaluate, return the record."""
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings_dict.items()})
    return evaluate_config(Config.from_dict(config_dict), settings, source=source, device=device, dtype=dtype)


# -- the sweep -----------------------------------------------------------------------------

def _model_key(source) -> str:
    return "default" if source is None else str(source)


def prepare(store: ResultStore, sweep: Sweep, source, fresh: bool) -> set[str]:
    """Write or check the header; the ids already done."""
    if fresh:
        store.reset()
    header, records = store.read()
    fingerprint = sweep.settings.fingerprint(_model_key(source))
    if header is not None and header.get("fingerprint") != fingerprint:
        old = header.get("settings", {})
        changed = sorted(k for k, v in sweep.settings.to_dict().items() if old.get(k) != v)
        what = f"settings differ: {', '.join(changed)}" if changed else f"model differs: {header.get('model')} vs {_model_key(source)}"
        raise InputError(f"{store.path} was written by another sweep ({what}); rerun with --fresh, or choose another --out")
    if header is None:
        if records:
            raise InputError(f"{store.path} has results but no sparsa-frontier header; rerun with --fresh, or choose another --out")
        store.append({"kind": HEADER, "version": 1, "model": _model_key(source), "sweep": sweep.source,
                      "settings": sweep.settings.to_dict(), "fingerprint": fingerprint,
                      "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return {r["id"] for r in records if r.get("status") in ("ok", "error")}


def run_sweep(sweep: Sweep, source: str | None = None, out: str | os.PathLike = "frontier", *, fresh: bool = False,
              ray: str | None = None, device: str = "cpu", dtype: str = "auto", progress: bool = True,
              stop_after: int | None = None, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every configuration of ``sweep`` not yet in ``out/results.jsonl``; returns the latest record of each."""
    if sweep.settings.speed == "measured" and not ray and not str(device).startswith("cuda"):
        raise InputError("speed mode 'measured' needs a CUDA GPU: pass --device cuda, or use mode = \"auto\" or \"predicted\"")
    out = Path(out)
    store = ResultStore(out / "results.jsonl")
    done = prepare(store, sweep, source, fresh)
    todo = [c for c in sweep.configs if c.id not in done]
    if stop_after is None and os.environ.get(STOP_ENV):
        stop_after = int(os.environ[STOP_ENV])
    from tqdm.auto import tqdm

    bar = tqdm(total=len(sweep.configs), initial=len(sweep.configs) - len(todo), desc="frontier", unit="config",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    written = 0

    def finish(record: dict) -> None:
        nonlocal written
        store.append(record)
        written += 1
        if on_record is not None:
            on_record(record)
        if record["status"] == "error":
            bar.write(f"sparsa frontier: {record['id']} failed: {record['error']['type']}: {record['error']['message']}", file=sys.stderr)
        bar.update(1)
        if stop_after is not None and written >= stop_after:
            bar.close()
            os._exit(75)  # simulate a killed sweep (tests)

    try:
        if ray:
            _run_ray(ray, todo, sweep.settings, source, device, dtype, finish, bar)
        else:
            base = base_model(source, device, dtype) if todo else None
            for config in todo:
                bar.set_postfix_str(config.label[:40])
                finish(evaluate_config(config, sweep.settings, base=base))
    finally:
        bar.close()
    _, records = store.read()
    by_id = latest(records)
    return [by_id[c.id] for c in sweep.configs if c.id in by_id]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'sparsa[ray]'") from None
    return ray


def _run_ray(address: str, todo: list[Config], settings: Settings, source, device: str, dtype: str, finish, bar) -> None:
    ray = _import_ray()
    if not todo:
        return
    started_here = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise InputError(f"cannot reach the Ray cluster at {address}: {e}; start it with 'ray start --head' or pass --ray local") from None
        started_here = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_gpus=1, num_cpus=0)(_ray_task) if gpus else ray.remote(num_cpus=1)(_ray_task)
        worker_device = "cuda" if gpus else device
        src = None if source is None else str(Path(source).resolve()) if Path(str(source)).exists() else str(source)
        pending = {task.remote(c.to_dict(), settings.to_dict(), src, worker_device, dtype): c for c in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            config = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - a worker that died: recorded like any failure
                record = {"id": config.id, "label": config.label, "config": config.to_dict(), "status": "error",
                          "error": {"type": type(e).__name__, "message": (str(e).strip().splitlines() or [""])[0][:500]},
                          "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            bar.set_postfix_str(config.label[:40])
            finish(record)
    finally:
        if started_here:
            ray.shutdown()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
