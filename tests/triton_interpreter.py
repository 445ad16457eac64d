"""Run a script under Triton's CPU interpreter, with two gaps of the interpreter patched (tests only)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PROLOGUE = r"""
import os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import numpy as np
import triton.language as tl
import triton.runtime.interpreter as interp

# Two gaps of Triton's CPU interpreter, patched here only (the GPU compiler needs neither):
# NumPy >= 2.4 no longer turns 1-element arrays into ints (loop bounds from program ids),
# and its tl.dot multiplies bfloat16 bit patterns as integers.
try:
    int(np.array([1]))
except TypeError:
    _patch = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patch_lang_tensor
_dot = interp.InterpreterBuilder.create_dot

def _create_dot(self, a, b, d, *rest):
    def f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle(interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
    return _dot(self, f32(a), f32(b), d, *rest)

interp.InterpreterBuilder.create_dot = _create_dot

"""


def run_interpreted(body: str, tmp_path: Path, timeout: int = 600) -> str:
    """Run ``body`` (Python source) under ``TRITON_INTERPRET=1``; returns its stdout, fails the test on error."""
    pytest.importorskip("triton")
    script = tmp_path / "interpret.py"
    script.write_text(PROLOGUE + textwrap.dedent(body))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    env.pop("SPARSA_24_PATH", None)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout
