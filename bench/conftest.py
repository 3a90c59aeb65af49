"""Shared benchmark machinery: the ``measure`` fixture.

``measure(fn, make_inputs, group=..., impl=..., flops=..., nbytes=...)``

* draws ``n_sets`` fresh random input sets from ``make_inputs()`` and rotates among them, so no
  cache (L2, allocator, CPU caches) sees the same tensors twice in a row;
* synchronises CUDA inside the timed function;
* measures peak memory of one call outside the timed loop (CUDA: ``max_memory_allocated`` above
  the baseline; CPU: peak RSS above the baseline, sampled every millisecond);
* puts TFLOP/s (from ``flops``, an analytic count per call) or GB/s (from ``nbytes``) computed
  from the median time, and peak memory in MiB, into ``extra_info``;
* groups results by ``group`` so each implementation sits beside its peers.
"""

from __future__ import annotations

import itertools
import os
import threading
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(fn, args) -> int:
    """Peak memory one call of fn(*args) adds above what is allocated before it."""
    if DEVICE == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args)
        sync()
        return torch.cuda.max_memory_allocated() - base
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn(*args)
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base


@pytest.fixture
def measure(benchmark):
    def _measure(
        fn,
        make_inputs,
        *,
        group: str,
        impl: str,
        flops: float | None = None,
        nbytes: float | None = None,
        n_sets: int = 3,
        rounds: int = 5,
        warmup: int = 1,
    ):
        sets = [make_inputs() for _ in range(n_sets)]
        for args in sets[:warmup]:
            fn(*args)
        sync()
        mem = peak_memory_bytes(fn, sets[-1])
        cycle = itertools.cycle(sets)

        def setup():
            return (next(cycle),), {}

        def target(args):
            fn(*args)
            sync()

        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        benchmark.extra_info["device"] = DEVICE
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return None
        median = benchmark.stats.stats.median
        if flops is not None:
            benchmark.extra_info["tflops"] = round(flops / median / 1e12, 4)
        if nbytes is not None:
            benchmark.extra_info["gbps"] = round(nbytes / median / 1e9, 3)
        benchmark.extra_info["peak_mem_mib"] = round(mem / 2**20, 2)
        return median

    return _measure
