"""Dataset loader for the ``sparsa_tiny_mc`` lm-eval task (see sparsa_tiny_mc.yaml).

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``. Relative
``data_files`` are resolved against this folder, so the task does not depend on
the current working directory. The JSON lines are read here and turned into an
in-memory ``datasets.DatasetDict``: ``datasets.load_dataset("json", ...)`` would
give the same rows, but it also writes a cache and pings a download counter on
the network (3 s timeout), which an offline test should not do.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _resolve(path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else HERE / path


def _read_jsonl(paths) -> list[dict]:
    rows = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with _resolve(path).open(encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def load_local_json(data_files, **_ignored):
    """``{split: file(s)}`` (or one file, taken as ``train``) -> ``DatasetDict``."""
    import datasets

    if not isinstance(data_files, dict):
        data_files = {"train": data_files}
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(_read_jsonl(files)) for split, files in data_files.items()}
    )
