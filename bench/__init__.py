"""Benchmarks of galore-kernels; run them all with ``python -m bench`` (see ``bench/__main__.py``).

Modules mirror what they measure: ``roofline`` (peak matmul rate and copy
bandwidth of this device, and the FLOP/byte model of a GaLore step),
``bench_step`` (optimizer step throughput), ``bench_svd`` (projector refresh),
``bench_train`` (a small LLaMA trained end to end) and ``report`` (the results
file and its plots). This module holds the few helpers they share: naming the
device and timing a callable the same way everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time

import torch


def device_name(device: torch.device) -> str:
    """A human name for ``device``: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def device_slug(device: torch.device) -> str:
    """``device_name`` as a file-name fragment: lower case, runs of other characters become '-'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, *, warmup: int, repeats: int, before=None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    ``before(i)`` (untimed) runs ahead of call ``i``, e.g. to install the next
    gradient of a rotation. On CUDA each call is bracketed by CUDA events on the
    current stream and read after one final synchronize; on CPU by
    ``time.perf_counter``.
    """
    for i in range(warmup):
        if before is not None:
            before(i)
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = []
        for i in range(repeats):
            if before is not None:
                before(warmup + i)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for i in range(repeats):
        if before is not None:
            before(warmup + i)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns, device: torch.device, *, repeats: int, before=None) -> list[float]:
    """Median wall time of each of ``fns``, timed round-robin: round i calls each once, in order.

    Interleaving spreads a slow stretch of a shared machine over all of them, so
    their ratios stay fair. No warm-up here: warm each up before. ``before(j, i)``
    (untimed) runs ahead of call ``i`` of ``fns[j]``. Timed as ``median_seconds``.
    """
    samples = [[] for _ in fns]
    synchronize(device)
    for i in range(repeats):
        for j, fn in enumerate(fns):
            if before is not None:
                before(j, i)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                samples[j].append((start, end))
            else:
                start = time.perf_counter()
                fn()
                samples[j].append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        samples = [[start.elapsed_time(end) / 1e3 for start, end in events] for events in samples]
    return [statistics.median(times) for times in samples]


@contextlib.contextmanager
def cuda_synchronize_disabled():
    """``torch.cuda.synchronize`` is a no-op inside; restored on exit.

    galore-torch's ``GaLoreAdamW8bit.step`` calls it once per parameter, which
    raises on a machine without CUDA. On CPU there is nothing to wait for, so
    the no-op changes no result.
    """
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = original
