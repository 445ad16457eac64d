"""Where text comes from: the shipped corpora, a user's file, or a Hugging Face dataset.

Two corpora ship inside the package (see ``corpora/PROVENANCE.json``):
``calibration`` (Python documentation prose, PSF License) and ``evaluation``
(the Jargon File, public domain). They are different works, so calibrating on
one and evaluating on the other never leaks text.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import DataError, InputError

SHIPPED = ("calibration", "evaluation")
MIN_CHARS = 200  # below this a "corpus" is a typo, not text


def shipped_text(name: str) -> str:
    """One of the shipped corpora: 'calibration' or 'evaluation'."""
    if name not in SHIPPED:
        raise InputError(f"unknown shipped corpus {name!r}; choose one of: {', '.join(SHIPPED)}")
    return resources.files("sparsa.data").joinpath("corpora", f"{name}.txt").read_text("utf-8")


def provenance() -> dict:
    return json.loads(resources.files("sparsa.data").joinpath("corpora", "PROVENANCE.json").read_text("utf-8"))


def load_text(source: str, *, field: str = "text") -> str:
    """Text from a named source.

    ``source`` is a shipped corpus name ('calibration', 'evaluation'), a path
    to a UTF-8 text file, a path to a JSONL file (one JSON object a line, text
    under ``field``), or ``hf:NAME[:CONFIG]:SPLIT`` for a Hugging Face dataset
    when the datasets library and the data are available.
    """
    if source in SHIPPED:
        return shipped_text(source)
    if source.startswith("hf:"):
        return _hf_text(source, field)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"text file {path} does not exist; pass a .txt or .jsonl file, 'calibration', 'evaluation' or hf:NAME:SPLIT")
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass a .txt or .jsonl file")
    try:
        raw = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) or pass another file") from None
    text = _jsonl_text(raw, path, field) if path.suffix in (".jsonl", ".ndjson") else raw
    return _checked(text, str(path))


def _jsonl_text(raw: str, path: Path, field: str) -> str:
    docs = []
    shape = f'each line must be an object like {{"{field}": "..."}}'
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not valid JSON; {shape}") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{path} line {number} has no string field {field!r}; {shape}")
        docs.append(row[field])
    return "\n\n".join(docs)


def _hf_text(source: str, field: str) -> str:
    parts = source[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"{source!r} is not understood; write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise InputError("reading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"cannot load dataset {source}: {str(e).splitlines()[0][:200]}") from None
    if field not in data.column_names:
        raise DataError(f"dataset {source} has no column {field!r} (it has {', '.join(data.column_names)}); use a dataset with a {field!r} column")
    return _checked("\n\n".join(t for t in data[field] if t), source)


def _checked(text: str, where: str) -> str:
    if not text.strip():
        raise DataError(f"{where} holds no text; pass a file with real text in it")
    if len(text) < MIN_CHARS:
        raise DataError(f"{where} is too short ({len(text)} characters); pass at least a few paragraphs of text")
    return text
