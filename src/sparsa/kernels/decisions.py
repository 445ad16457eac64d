"""Measured kernel decisions, kept in memory and in a JSON file per GPU model.

A decision (which path or launch configuration runs a shape fastest) is
measured once on the real device and reused. :class:`DecisionCache` holds
one kind of them: ``<cache_dir>/<stem>-<gpu-name>.json`` (``cache_dir()``
from :mod:`sparsa.models.loading`, ``$SPARSA_CACHE`` or ``~/.cache/sparsa``)::

    {"format": 6, "device": "NVIDIA H100 80GB HBM3", "versions": {...}, "entries": {KEY: ENTRY, ...}}

A file of another format, device or library versions is ignored (its
decisions are measured again). ``SPARSA_DISPATCH_CACHE=0`` keeps decisions
in memory only. Writes are atomic and merge what another process added.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

__all__ = ["DecisionCache", "shape_key"]


def shape_key(n: int, k: int, m_bucket: int, dtype: torch.dtype) -> str:
    """The part of a decision's key that names the layer: ``"NxK:mBUCKET:dtype"``."""
    return f"{n}x{k}:m{m_bucket}:{str(dtype).replace('torch.', '')}"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class DecisionCache:
    """The decisions of one kind (``stem``), in a file format ``format`` valid under ``versions()``."""

    def __init__(self, stem: str, format: int, versions: Callable[[], dict], what: str) -> None:
        self.stem, self.format, self.versions, self.what = stem, format, versions, what
        self._memory: dict[str, dict] | None = None

    def path(self) -> Path:
        from ..models.loading import cache_dir

        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", _device_name()).strip("-")
        return cache_dir() / f"{self.stem}-{slug}.json"

    @staticmethod
    def on_disk() -> bool:
        return os.environ.get("SPARSA_DISPATCH_CACHE", "1") != "0"

    def _read_file(self) -> dict[str, dict]:
        try:
            doc = json.loads(self.path().read_text())
        except (OSError, ValueError):
            return {}
        if doc.get("format") != self.format or doc.get("versions") != self.versions() or doc.get("device") != _device_name():
            return {}
        entries = doc.get("entries")
        return entries if isinstance(entries, dict) else {}

    def entries(self) -> dict[str, dict]:
        if self._memory is None:
            self._memory = self._read_file() if self.on_disk() else {}
        return self._memory

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def put(self, key: str, entry: dict) -> None:
        self.entries()[key] = entry
        if not self.on_disk():
            return
        from ..models.saving import atomic_write_text

        merged = self._read_file()  # another process may have added entries meanwhile
        merged.update(self.entries())
        doc = {"format": self.format, "device": _device_name(), "versions": self.versions(), "entries": dict(sorted(merged.items()))}
        try:
            atomic_write_text(self.path(), json.dumps(doc, indent=1) + "\n")
        except OSError as exc:  # a read-only cache only costs re-measuring
            warnings.warn(f"sparsa: could not write the {self.what} cache {self.path()}: {exc}", RuntimeWarning)

    def clear_memory(self) -> None:
        """Forget the decisions held in memory (the file stays)."""
        self._memory = None
