"""Layers launch their kernels on the GPU that holds their input (a model split over GPUs), checked on the CPU."""

import contextlib

import pytest
import torch

from sparsa.activations.kernel import SparseInputLinear
from sparsa.attention import attend
from sparsa.attention.hf import _forward
from sparsa.kernels import SparseLinear24
from sparsa.kernels import devices
from sparsa.kernels.devices import on_input_device


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on CUDA device ``index`` (the decorator reads nothing else)."""

    index = 0

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return self.index

    @property
    def device(self):
        return torch.device("cuda", self.index)


def _on(index: int) -> torch.Tensor:
    t = torch.zeros(2).as_subclass(_OnGpu)
    t.index = index
    return t


@pytest.fixture
def current(monkeypatch):
    """Two GPUs, the current one 0; ``made_current`` records each device a call made current, and what ran inside."""
    log = {"made_current": [], "inside": []}

    @contextlib.contextmanager
    def device(d):
        log["made_current"].append(torch.device(d).index)
        yield

    monkeypatch.setattr(devices, "_several_gpus", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return log


def test_input_elsewhere_is_made_current_for_the_call(current):
    @on_input_device()
    def layer(self, x, scale=1):
        current["inside"].append(len(current["made_current"]))
        return scale

    assert layer(None, _on(1), scale=3) == 3
    assert current["made_current"] == [1] and current["inside"] == [1]  # the call ran with device 1 current


def test_input_on_the_current_device_or_cpu_changes_nothing(current):
    @on_input_device(0)
    def run(x):
        return x

    run(_on(0))
    run(torch.zeros(2))
    run(x=_on(1))  # by keyword: left as it is
    assert current["made_current"] == []


def test_one_gpu_changes_nothing(current, monkeypatch):
    monkeypatch.setattr(devices, "_several_gpus", lambda: False)
    on_input_device(0)(lambda x: x)(_on(1))
    assert current["made_current"] == []


@pytest.mark.parametrize("entry, position", [(SparseLinear24.forward, 1), (SparseInputLinear.forward, 1), (_forward, 1),
                                             (attend, 0)])
def test_kernel_entry_points_follow_their_input(current, entry, position):
    args = [None] * 5
    args[position] = _on(1)
    with pytest.raises(Exception):  # the stand-in arguments fail inside: what matters is what was current there
        entry(*args)
    assert current["made_current"] == [1]
