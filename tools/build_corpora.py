"""Rebuild the two text corpora shipped in ``sparsa/data/corpora``.

Both come from Debian packages, so anyone can verify them:

    apt-get download jargon-text python3.11-doc
    python tools/build_corpora.py jargon-text_*.deb python3.11-doc_*.deb

* evaluation: the Jargon File 4.4.7 (public domain), package ``jargon-text``.
* calibration: the Python 3.11 tutorial, HOWTOs and FAQ (PSF License 2.0),
  package ``python3.11-doc``; reST markup, code samples and directives removed
  so that what remains is the prose.

The two sources share no text, so calibration and evaluation are disjoint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "sparsa" / "data" / "corpora"
DOCS = "usr/share/doc/python3.11/html/_sources"
JARGON = "usr/share/doc/jargon-text/jargon.txt.gz"
EVAL_CHARS = 650_000  # a slice of the lexicon: enough for 150k+ tokens


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
LITERAL = re.compile(r"``([^`]*)``")
LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
UNDERLINE = re.compile(r"^[=\-*~^#\"'+]{3,}\s*$")


def rst_prose(text: str) -> str:
    """Keep the paragraphs of a reST file; drop directives, code and markup."""
    out: list[str] = []
    lines = text.splitlines()
    skip_indent: int | None = None
    literal_follows = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped == "" or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".."):  # directive, comment, target: drop with its body
            skip_indent = indent
            continue
        if stripped.startswith((">>>", "...", "$ ", "%")) or UNDERLINE.match(stripped):
            continue
        if indent > 0 and literal_follows:
            skip_indent = indent - 1  # an indented literal block
            continue
        literal_follows = stripped.endswith("::") or (literal_follows and not stripped)
        line = ROLE.sub(r"\1", line)
        line = LINK.sub(r"\1", line)
        line = LITERAL.sub(r"\1", line)
        line = line.replace("**", "").replace("::", ":")
        line = re.sub(r"\s*\[#\w*\]_", "", line)
        out.append(line.strip())
    prose = "\n".join(out)
    prose = re.sub(r"\n{3,}", "\n\n", prose)
    return prose.strip() + "\n"


def jargon_text(gz: Path) -> str:
    """The File's introduction, then its lexicon entries (its tables of contents dropped)."""
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").splitlines()
    stripped = [line.strip() for line in lines]
    welcome = stripped.index("Welcome to the Jargon File")
    toc = lines.index("Glossary", welcome) - 4  # the lexicon's own table of contents
    entries = lines.index("  0", toc)  # the lexicon body opens with its '0' heading
    body = "\n".join(line.strip() for line in lines[welcome:toc] + lines[entries:])
    body = re.sub(r"\n{3,}", "\n\n", body)
    cut = body.rfind("\n\n", 0, EVAL_CHARS)
    return body[:cut].strip() + "\n"


def entry(name: str, text: str, deb: Path, package: str, source: str, licence: str) -> dict:
    """Write one corpus and describe where it came from."""
    (OUT / name).write_text(text, "utf-8")
    return {
        "source": source,
        "package": f"Debian {package} {deb.name.split('_')[1]}",
        "package_sha256": sha256(deb),
        "licence": licence,
        "sha256": sha256(OUT / name),
        "bytes": (OUT / name).stat().st_size,
    }


def main(jargon_deb: str, python_doc_deb: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root_j = unpack(Path(jargon_deb), Path(tmp) / "j")
        root_p = unpack(Path(python_doc_deb), Path(tmp) / "p")
        evaluation = jargon_text(root_j / JARGON)
        parts = []
        for section in ("tutorial", "howto", "faq"):
            for f in sorted((root_p / DOCS / section).rglob("*.rst.txt")):
                parts.append(rst_prose(f.read_text("utf-8")))
        calibration = "\n\n".join(parts)
    OUT.mkdir(parents=True, exist_ok=True)
    provenance = {
        "evaluation.txt": entry(
            "evaluation.txt", evaluation, Path(jargon_deb), "jargon-text",
            "The Jargon File 4.4.7 (Eric S. Raymond, ed.), the lexicon section",
            "Public domain (see /usr/share/doc/jargon-text/copyright)",
        ),
        "calibration.txt": entry(
            "calibration.txt", calibration, Path(python_doc_deb), "python3.11-doc",
            "Python 3.11 documentation: tutorial, HOWTOs and FAQ, prose only",
            "PSF License Version 2 (see /usr/share/doc/python3.11-doc/copyright)",
        ),
        "disjoint": "different works by different authors; no shared text",
        "rebuild": "apt-get download jargon-text python3.11-doc && python tools/build_corpora.py jargon-text_*.deb python3.11-doc_*.deb",
    }
    (OUT / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n", "utf-8")
    for name in ("evaluation.txt", "calibration.txt"):
        print(name, provenance[name]["bytes"], "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:3])
