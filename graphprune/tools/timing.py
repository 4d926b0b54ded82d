"""Timing for bench, speed and demo: interleaved rounds (medians), progress lines, the allocator
settings and the machine description recorded with every result."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

_ALLOCATOR = "default"         # what keep_freed_memory() set the allocator to


class Progress:
    """A one-line stderr progress bar."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.done, self.label, self.t0 = max(total, 1), 0, label, time.time()
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {time.time() - self.t0:5.0f}s "
                         f"{what[:40]:<40}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def interleaved(fns: dict, repeats: int, progress: Progress | None = None) -> dict:
    """{name: median seconds}: one warm-up each, then `repeats` rounds, each timing every fn once
    (under torch.inference_mode)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
            if progress:
                progress.step("timing")
    return {k: statistics.median(v) for k, v in times.items()}


def keep_freed_memory() -> str:
    """Have glibc keep freed blocks up to 32 MiB in the heap instead of returning them to the OS.
    By default a large activation is a fresh mmap that page-faults on first touch, every call: a
    cost per byte that is noisy and lands mostly on the unpruned model's big tensors (what
    tcmalloc / jemalloc avoid; PyTorch's CPU tuning guide recommends them). Timing runs only:
    the process keeps more memory. Returns what the allocator is now, for the record."""
    global _ALLOCATOR
    if platform.libc_ver()[0] == "glibc" and _ALLOCATOR == "default":
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30):
            _ALLOCATOR = "glibc, mmap threshold 32 MiB, trim threshold 1 GiB"
    return _ALLOCATOR


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "processor": platform.processor(),
            "allocator": _ALLOCATOR}
