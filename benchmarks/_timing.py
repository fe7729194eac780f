"""Timing and memory helpers shared by the benchmark scripts.

The machines these run on are shared and noisy, so nothing here trusts a single measurement:
the candidates of one comparison are timed in interleaved rounds (a slow spell hits all of them
alike) and each is summarized by its median.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = [
    "time_once",
    "interleaved_medians",
    "peak_allocated_bytes",
    "geomean",
    "machine_description",
]


def time_once(fn: Callable[[], object]) -> float:
    """Seconds taken by one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict[str, Callable[[], object]],
    pilot_s: dict[str, float],
    *,
    target_s: float,
    min_rounds: int = 3,
    max_rounds: int = 15,
    min_sample_s: float = 2e-3,
    rewarm_below_s: float = 0.02,
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each of ``calls``, timed in interleaved rounds.

    A sample of ``name`` is ``number`` back-to-back calls, ``number`` chosen from the pilot time
    so that a sample lasts at least ``min_sample_s`` (the timer's resolution and the loop's own
    cost then do not matter), or a tenth of the slowest call, up to 10 ms. Each round takes one
    sample of every call, in a fresh random order (seeded), so no call always follows the same
    one; the number of rounds is what fits in ``target_s``, clamped to
    ``[min_rounds, max_rounds]``. A call that takes less than ``rewarm_below_s`` is also made
    ``number`` times untimed before each of its samples: right after a candidate that churned
    through large buffers, the first few calls pay for cold caches and fresh pages (a dense
    768x768 forward + backward at batch 1 took 5 ms instead of 0.3 ms). The garbage collector
    is off while timing.

    Returns the medians and the number of rounds.
    """
    names = list(calls)
    if not names:
        return {}, 0
    # Cheap calls next to an expensive one get longer samples: fewer rounds fit, so each
    # sample must average more calls (at most 10 ms worth).
    sample_s = max(min_sample_s, min(0.1 * max(pilot_s.values()), 0.01))
    number = {n: max(1, math.ceil(sample_s / max(pilot_s[n], 1e-7))) for n in names}
    round_s = sum(number[n] * pilot_s[n] for n in names)
    rounds = min(max_rounds, max(min_rounds, int(target_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        order = random.Random(0)
        for _ in range(rounds):
            for name in order.sample(names, len(names)):
                fn, count = calls[name], number[name]
                for _ in range(count if pilot_s[name] < rewarm_below_s else 0):
                    fn()  # untimed: refill caches and allocator after the previous candidate
                start = time.perf_counter()
                for _ in range(count):
                    fn()
                samples[name].append((time.perf_counter() - start) / count)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: _median(s) for n, s in samples.items()}, rounds


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn()`` runs (CPU tensors).

    Replays the allocator events that ``torch.profiler`` records with ``profile_memory=True``
    (every allocation and free of the CPU allocator, with its size) in time order and returns
    the maximum of their running sum. Tensors that exist before the call (inputs, parameters)
    are not counted; the result that ``fn`` returns is, since it is kept alive until the end.
    """
    from torch._C._profiler import _EventType

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def geomean(values: Iterable[float]) -> float:
    """Geometric mean (nan for no values)."""
    logs = [math.log(v) for v in values]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs every start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def machine_description() -> str:
    """CPU model and the threads torch uses, e.g. 'AMD EPYC, 1 thread(s) of 2'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
