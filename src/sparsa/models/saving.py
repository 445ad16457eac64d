"""Saving a (sparse) model as a normal Hugging Face directory plus ``sparsa.json``.

Writes are atomic: everything goes to a temporary sibling directory that is
renamed into place at the end, so an interrupted save never leaves a
half-written model behind, and an existing output is replaced only with
``force=True``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn

from ..errors import InputError

RECORD = "sparsa.json"


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {
        "sparsa": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_output(out: str | os.PathLike, force: bool, flag: str = "--out") -> Path:
    """Fail before any work if the directory ``out`` exists and may not be overwritten, or cannot be created."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise InputError(f"{out} already exists; choose another {flag} or pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; choose another {flag}")
    _check_creatable(out, flag)
    return out


def check_file_output(path: str | os.PathLike, flag: str) -> Path:
    """Fail before any work if the file ``path`` cannot be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    _check_creatable(path, flag)
    return path


def _check_creatable(path: Path, flag: str) -> None:
    # missing parents are created on writing, so the nearest existing ancestor is where the first write lands
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise InputError(f"cannot write {path}: {ancestor} is not a directory; choose another {flag}")
    try:  # a real write, since os.access says yes to root even where nothing can be created (/proc)
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=f".{path.name}.probe-"))
    except OSError:
        raise InputError(f"cannot write {path}: {ancestor} is not writable; choose another {flag}") from None


def save_model(model: nn.Module, tokenizer, out: str | os.PathLike, record: dict | None = None, *, force: bool = False) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out`` with a sparsa.json record, atomically."""
    out = check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full = {
            **(record or {}),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def atomic_save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """Save tensors as safetensors by rename, so a kill never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file by rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
