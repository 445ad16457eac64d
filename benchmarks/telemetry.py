"""The GPU's SM clock, board power, temperature and clock-event reasons, read through NVML while a benchmark runs.

A GPU under sustained load runs at its power limit, and the clock it holds
there falls as the chip warms; two kernels timed at different moments can
therefore run at different clocks. :class:`Telemetry` samples in a thread
between ``start`` and ``stop`` so that a benchmark can report the clock
beside each time. Needs ``nvidia-ml-py`` (``pynvml``, in sparsa's ``gpu`` extra).
"""

from __future__ import annotations

import statistics
import threading
import time

SAMPLE_S = 0.02
THROTTLE_NAMES = {0x1: "idle", 0x2: "app clocks", 0x4: "sw power cap", 0x8: "hw slowdown", 0x20: "sw thermal",
                  0x40: "hw thermal", 0x80: "hw power brake"}


class Telemetry:
    """Samples SM clock (MHz), power (W), temperature (C) and clock-event reasons every ``SAMPLE_S`` seconds.

    ``settle_s``: samples this soon after ``start`` are left out of the means
    (the clock takes about 0.3 s to follow a change of load).
    """

    def __init__(self, index: int, settle_s: float = 0.3) -> None:
        import pynvml
        import torch

        pynvml.nvmlInit()
        try:  # NVML numbers the GPUs physically; CUDA's index counts only those CUDA_VISIBLE_DEVICES shows
            nvml_index = torch.cuda._get_nvml_device_index(index)
        except Exception:  # noqa: BLE001 - a private helper of torch's: without it, assume the numbering agrees
            nvml_index = index
        self.nvml, self.handle, self.settle_s = pynvml, pynvml.nvmlDeviceGetHandleByIndex(nvml_index), settle_s
        self.error: str | None = None
        self.samples: list[tuple[float, int, float, int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def maybe(cls, index: int, settle_s: float = 0.3) -> "Telemetry | None":
        """A Telemetry, or None where NVML cannot be read (no ``pynvml``, no driver access)."""
        try:
            return cls(index, settle_s)
        except Exception:  # noqa: BLE001 - telemetry is optional: ImportError, or any NVMLError
            return None

    def _reasons(self) -> int:
        get = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(get(self.handle))

    def _run(self) -> None:
        nvml, h = self.nvml, self.handle
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                                     nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                                     nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU), self._reasons()))
            except Exception as exc:  # noqa: BLE001 - a query this GPU does not support: no telemetry, the benchmark goes on
                self.error = f"{type(exc).__name__}: {exc}"
                return
            time.sleep(SAMPLE_S)

    def start(self) -> None:
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """Means over the samples since ``start`` (after ``settle_s``), and every clock-event reason seen (NaN means
        where NVML answered no query: ``error`` says why)."""
        self._stop.set()
        self._thread.join()
        if not self.samples:
            nan = float("nan")
            return {"sm_mhz": nan, "power_w": nan, "temp_c": nan, "samples": 0, "reasons": [], "error": self.error}
        t0 = self.samples[0][0]
        kept = [s for s in self.samples if s[0] - t0 >= self.settle_s] or self.samples
        reasons = 0
        for s in kept:
            reasons |= s[4]
        return {"sm_mhz": statistics.mean(s[1] for s in kept), "power_w": statistics.mean(s[2] for s in kept),
                "temp_c": statistics.mean(s[3] for s in kept), "samples": len(kept),
                "reasons": sorted(name for bit, name in THROTTLE_NAMES.items() if reasons & bit)}
