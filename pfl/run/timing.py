"""Wall time and peak memory of one method's inference (appendix Table A.3's measure).

Used by ``benchmarks/inference.py`` and notebook 07. Time is the median over repeats of one
batch, from pixels to maps (a fresh :class:`~pfl.method.contract.Batch` each time), divided by
the batch size. Memory is the peak while the method runs: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the resident set size sampled every 0.5 ms by a
thread (freed heap returned to the OS with glibc's ``malloc_trim`` first), so very short spikes
can be missed. Timings depend on the machine: compare ratios measured in one run.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import statistics
import threading
import time

import torch

from pfl.method.contract import Batch, Prediction


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so the RSS before a method is its floor."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory (bytes) while the block runs: total, and rise above the level at entry."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.start = device, math.nan, math.nan

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's lifetime peak (cannot be reset)
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return False


def run_once(method, images: torch.Tensor, cls_names: list[str], device: torch.device
             ) -> tuple[float, Prediction]:
    """Seconds for one batch, from pixels (a fresh Batch: nothing cached from a previous run)."""
    batch = Batch(cls_names=cls_names, images=images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = method.predict(batch, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, pred


def measure(method, images, cls_names, device, repeats: int) -> dict:
    """``{"ms": per image, "peak_mb", "rise_mb"}`` for ``method`` on one batch of ``images``."""
    run_once(method, images, cls_names, device)  # warm-up: caches, allocator, kernels
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            times.append(run_once(method, images, cls_names, device)[0])
    n = images.shape[0]
    return {"ms": 1e3 * statistics.median(times) / n, "peak_mb": mem.peak / 2**20,
            "rise_mb": (mem.peak - mem.start) / 2**20}
