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

``interleaved_ratio(slow, fast, args)``: how many times faster ``fast`` is than ``slow``,
measured so that a shared, noisy machine cannot fake it (see its docstring). A benchmark that
asserts a speed ratio takes it from here, never from two separate measurements.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
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


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` intra-op threads (None: leave the setting alone)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def interleaved_ratio(
    slow, fast, args, *, pairs: int = 11, min_sample_s: float = 0.1, threads: int | None = None
) -> dict:
    """The speed ratio slow / fast of ``slow(*args)`` and ``fast(*args)``, robust to load.

    One measurement of each side is at the mercy of whatever else the machine runs (a 2-core
    machine shared with other jobs once gave 13x and 31x for the same code). So:

    * the two sides run in interleaved pairs (slow, fast, fast, slow, slow, fast, ...): a burst
      of load hits both samples of a pair alike, and the alternating order keeps either side
      from always running on the warmer cache;
    * each sample repeats its call until it lasts ``min_sample_s`` (calibrated on one warm call),
      so a call of a millisecond is not one scheduler tick away from doubling;
    * the result is the median of the per-pair ratios, with their spread (min, quartiles, max).

    ``threads`` pins torch's intra-op threads for the measurement (1 on a shared CPU: threads
    competing with other processes measure the scheduler, not the code).

    Returns {"median", "min", "q1", "q3", "max", "pairs", "slow_s", "fast_s", "calls"}: the
    ratios, and the median seconds per call of each side.
    """

    def once(fn):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        return time.perf_counter() - t0

    def sample(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        sync()
        return (time.perf_counter() - t0) / n

    with torch_threads(threads):
        once(slow)  # warm-up: first-call costs (allocations, lazy inits) stay out
        once(fast)
        calls = {
            "slow": max(1, math.ceil(min_sample_s / once(slow))),
            "fast": max(1, math.ceil(min_sample_s / once(fast))),
        }
        slow_s, fast_s = [], []
        for i in range(pairs):
            if i % 2 == 0:
                slow_s.append(sample(slow, calls["slow"]))
                fast_s.append(sample(fast, calls["fast"]))
            else:
                fast_s.append(sample(fast, calls["fast"]))
                slow_s.append(sample(slow, calls["slow"]))
    ratios = sorted(s / f for s, f in zip(slow_s, fast_s))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if pairs > 1 else (ratios[0],) * 3
    return {
        "median": statistics.median(ratios),
        "min": ratios[0],
        "q1": q1,
        "q3": q3,
        "max": ratios[-1],
        "pairs": pairs,
        "slow_s": statistics.median(slow_s),
        "fast_s": statistics.median(fast_s),
        "calls": calls,
    }
