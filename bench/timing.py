"""Median wall time of a step after warm-up, the peak memory one step allocates, and the page
faults it takes.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with every intra-op thread torch has.
GPU: CUDA events around each call, median over the calls. The contenders of a case are timed in
interleaved rounds (:func:`interleaved_times`), so that a drift of the machine's speed during
the case reaches all of them alike. In both cases the caller has already
run the step (the correctness check, which also triggers compilation and autotuning), and
:func:`median_time` warms up again before measuring, so neither compilation nor autotuning is
ever inside a measured call.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Least time spent in warm-up calls, and least number of them.
WARMUP_S = 0.025
WARMUP_CALLS = 2
# A measurement spans at least this many calls, so a slow step still gets a median of several.
MIN_CALLS = 3
# Rounds in which the contenders of one case are timed in turn (interleaved_times).
ROUNDS = 4


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int
    # Minor page faults per timed call (CPU), counted over the timed calls themselves, in the
    # allocator state the interleaved contenders leave: what the median includes.
    faults_per_call: float | None = None


def _warm_up(step: Callable[[], object], device: str) -> float:
    """Run ``step`` until WARMUP_S and WARMUP_CALLS are both reached; the mean seconds a call."""
    calls, start = 0, time.perf_counter()
    while calls < WARMUP_CALLS or time.perf_counter() - start < WARMUP_S:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        calls += 1
    return (time.perf_counter() - start) / calls


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _per_call_times(step: Callable[[], object], device: str, run_time: float,
                    per_call: float) -> tuple[list[float], int, int]:
    """Seconds per call of ``step`` over about ``run_time``: (one value per measured block of
    calls, the number of calls, the minor page faults they took: CPU only, 0 on a GPU; the
    timer's few calls to size its blocks are counted with them)."""
    if device == "cuda":
        calls = max(1, round(run_time / per_call))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(calls)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events], calls, 0
    timer = benchmark.Timer(stmt="step()", globals={"step": step},
                            num_threads=torch.get_num_threads())
    before = _minor_faults()
    m = timer.blocked_autorange(min_run_time=run_time)
    return list(m.times), len(m.times) * m.number_per_run, _minor_faults() - before


def _summary(times: list[float], calls: int, faults: int, device: str) -> Timing:
    times = sorted(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[2] - quartiles[0], calls,
                  None if device == "cuda" else faults / calls)


def median_time(step: Callable[[], object], device: str, min_time_s: float) -> Timing:
    """Median seconds per call of ``step`` over at least ``min_time_s`` and MIN_CALLS calls."""
    return interleaved_times([step], device, min_time_s, rounds=1)[0]


def interleaved_times(steps: Sequence[Callable[[], object]], device: str, min_time_s: float,
                      rounds: int = ROUNDS) -> list[Timing]:
    """:func:`median_time` of each of ``steps``, measured in ``rounds`` rounds that each time
    every step in turn for its share of ``min_time_s``: on a shared machine whose speed drifts
    (another tenant, the clock), every step sees the same phases, so their ratios hold even
    when the absolute times move."""
    per_call = [_warm_up(step, device) for step in steps]
    samples: list[list[float]] = [[] for _ in steps]
    calls = [0] * len(steps)
    faults = [0] * len(steps)
    for _ in range(rounds):
        for i, step in enumerate(steps):
            # MIN_CALLS calls over all rounds at least
            run_time = max(min_time_s / rounds, math.ceil(MIN_CALLS / rounds) * per_call[i])
            times, n, f = _per_call_times(step, device, run_time, per_call[i])
            samples[i] += times
            calls[i] += n
            faults[i] += f
    return [_summary(t, n, f, device) for t, n, f in zip(samples, calls, faults)]


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while active, until it is freed, and
    keeps the peak: what ``torch.cuda.max_memory_allocated`` measures on a GPU, for the CPU
    (storages that ops allocate; scratch a kernel frees before returning is not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.finalize] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen[key] = weakref.finalize(storage, self._free, key, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def peak_memory(step: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _LiveBytes() as tracker:
        step()
    return tracker.peak
