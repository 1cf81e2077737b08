"""Timing primitives: one timed call, interleaved repetitions and their statistics, CUDA peak memory."""
import ctypes
import ctypes.util
import math
import os
import resource
import statistics
import time
from pathlib import Path

import torch

WARMUP = 2
MIN_REPS = 3


def time_call(fn, cuda):
    """(milliseconds taken by one ``fn()``, minor page faults during it: 0 on CUDA)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()  # noqa: F841 -- freed after the clock stops, like below
        end.record()
        end.synchronize()
        return start.elapsed_time(end), 0
    faults, start = minor_faults(), time.perf_counter()
    result = fn()  # noqa: F841 -- kept alive so that freeing the output and its graph is not timed
    return (time.perf_counter() - start) * 1e3, minor_faults() - faults


def minor_faults():
    """Minor page faults of this process so far: first touches of memory the allocator got afresh from
    the kernel (about 1-2 us each on the 2-core CPU, a 4 KiB page at a time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(calls, budget_s, max_reps, cuda, warmup=WARMUP, min_reps=MIN_REPS):
    """``{name: [(ms, faults), ...]}`` for ``calls = {name: (fn, reset)}``.

    After WARMUP calls each, every implementation gets enough repetitions for about
    ``budget_s`` seconds of timed calls (at least MIN_REPS, at most ``max_reps``),
    run round-robin so that drift (clock boost, other load) hits all of them alike.
    ``reset()`` runs untimed before every call.
    """
    reps = {}
    for name, (fn, reset) in calls.items():
        warmup_ms = []
        for _ in range(warmup):
            reset()
            warmup_ms.append(time_call(fn, cuda)[0])
        # The fastest warm-up call estimates the cost: one preempted call must not cut the repetitions.
        estimate = min(warmup_ms, default=0.0)
        reps[name] = max(min_reps, min(max_reps, math.ceil(budget_s * 1e3 / max(estimate, 1e-3))))
    times = {name: [] for name in calls}
    for round_ in range(max(reps.values())):
        for name, (fn, reset) in calls.items():
            if round_ < reps[name]:
                reset()
                times[name].append(time_call(fn, cuda))
    return times


def measure(calls, budget_s, max_reps, cuda, baseline, **counts):
    """Time ``calls`` with ``interleaved`` (``counts``: its warmup and min_reps); returns (stats, seconds taken,
    other_load).

    stats: per name, the raw times, median/min/max, the minor page faults of its median
    call, and its ratio to ``baseline``: the median over the rounds both ran of its time
    over the baseline's in the same round. Paired so that a disturbance late in the
    timings, when only the faster implementations still have rounds to run, does not
    count for them alone (bench/results/cpu-20261124-151319.json, in commit 760f5e3, gave
    the FRoD layer 1.44x where its undisturbed runs give about 2.1x: the base's median
    there is 88.5 ms, its fastest call 46.9 ms). other_load: the cores other processes
    kept busy meanwhile.
    """
    started, others = time.perf_counter(), other_cpu_seconds()
    times = interleaved(calls, budget_s, max_reps, cuda, **counts)
    elapsed = time.perf_counter() - started
    other_load = max(0.0, (other_cpu_seconds() - others) / elapsed)
    base = [t for t, _ in times[baseline]]
    stats = {}
    for name, calls_ in times.items():
        ms = [t for t, _ in calls_]
        median = statistics.median(ms)
        ratio = statistics.median(t / b for t, b in zip(ms, base))
        stats[name] = {"median_ms": median, "min_ms": min(ms), "max_ms": max(ms), "ratio": ratio,
                       "reps": len(ms), "times_ms": [round(t, 5) for t in ms],
                       "page_faults": statistics.median(f for _, f in calls_)}
    return stats, elapsed, other_load


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Make glibc's malloc keep and reuse what the process frees; returns the settings, or None without glibc.

    By default glibc hands memory back to the kernel: a free that leaves more than a
    threshold unused at the top of the heap trims it (the threshold adapts to earlier
    frees), and blocks over 32 MiB are mapped and unmapped each time. The next call
    then faults every page in again, 1-2 us per 4 KiB page on the 2-core CPU. Whether
    a timed call hits that depends on the sizes and order of everything freed before
    it, so it came and went between runs of one implementation (the OFT layer's training
    step at T=2048, 1024 x 1024 faulted in all of its outputs in some runs, none in
    others), and peft's dense temporaries over 32 MiB were faulted in on every call.
    Kept memory is reused instead, for every implementation alike: the timings then
    measure the kernels, not the allocator's trimming. Results files record each
    implementation's faults per call.
    """
    libc = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(libc).mallopt if libc else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return None
    settings = {"M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1), "M_MMAP_MAX": (M_MMAP_MAX, 0)}
    applied = [mallopt(option, value) for option, value in settings.values()]  # both, even if one fails
    return {name: value for name, (_, value) in settings.items()} if all(applied) else None


def other_cpu_seconds():
    """CPU seconds spent so far by everything on this machine but this process (0 where /proc/stat is missing).

    Other work matters more than it seems: one busy core stalls our 2-thread GEMMs for whole
    scheduler slices, so the cases it overlaps can come out 10x slower.
    """
    stat = Path("/proc/stat")
    if not stat.exists():
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.read_text().split(maxsplit=9)[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - time.process_time()


def peak_mem_mib(fn, reset, device):
    """Peak CUDA memory of one ``fn()`` above what was allocated before it (inputs, parameters)."""
    reset()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
