"""Runs the planned cases: every contender is checked against the expected results first, and
only a contender that passes is measured (peak memory, then median time)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from rnnkernels import _backend

from . import check, configs
from .core import CaseSpec, Contender, Prepared, Result, Target
from .suites import SUITES
from .timing import Timing, interleaved_times, median_time, peak_memory


@dataclass
class Plan:
    """The cases to run, the targets they answer, and the suites that cannot run at all."""

    cases: list[tuple[object, CaseSpec]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def plan(suites: Sequence[str], device: str, dtype: torch.dtype, quick: bool) -> Plan:
    """Build the plan without touching the device (so ``--list`` works anywhere)."""
    profile = configs.profile_name(device, quick)
    out = Plan()
    for name in suites:
        suite = SUITES[name]
        reason = suite.unavailable()
        if reason is not None:
            out.errors.append(f"{name}: {reason}")
            continue
        out.cases += [(suite, spec) for spec in suite.specs(device, dtype, profile)]
        out.targets += suite.targets(device, dtype, profile)
    return out


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _release(device: str) -> None:
    # Reference counting frees a case's tensors (nothing here makes cycles); a full
    # gc.collect() would cost half a second per call with torch's module graph in the heap.
    if device == "cuda":
        torch.cuda.empty_cache()


def _first_call(step) -> tuple[str | None, list]:
    """Call ``step`` once; also return the warning rnnkernels gives when the forced backend
    could not take the input and another ran instead (its time must not be posted as ours)."""
    _backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = step()
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("rnnkernels:")]
    return (fallbacks[0] if fallbacks else None), got


def _check(spec: CaseSpec, prepared: Prepared, contender: Contender
           ) -> tuple[Result, Callable[[], object] | None]:
    """Build ``contender`` and check its results: (its result, ok with its error and peak
    memory filled in, and its step to time), or (a skipped / refused / error result, None)."""
    if contender.unavailable is not None:
        return Result.for_spec(spec, contender, "skipped", contender.unavailable), None
    try:
        step = contender.build()
        fallback, got = _first_call(step)
        if fallback is not None and contender.kind == "ours":
            return Result.for_spec(spec, contender, "skipped", f"fell back: {fallback}"), None
        if contender.canon is not None:
            got = contender.canon(got)
        expected = prepared.expected if contender.expected is None else contender.expected
        verdict = check.compare(prepared.names, got, expected,
                                check.tolerance(spec.device, spec.dtype))
        del got
        if not verdict.ok:
            result = Result.for_spec(spec, contender, "refused", verdict.reason)
            result.err, result.err_max = verdict.err, verdict.err_max
            return result, None
        peak = peak_memory(step, spec.device)
    except Exception as error:  # noqa: BLE001  (any failure is reported; the run goes on)
        return Result.for_spec(spec, contender, "error", _error_text(error)), None
    result = Result.for_spec(spec, contender, "ok")
    result.err, result.err_max = verdict.err, verdict.err_max
    result.peak_bytes = peak
    return result, step


def _timed(result: Result, prepared: Prepared, timing: Timing, copy_bandwidth: float) -> None:
    result.median_s, result.iqr_s, result.runs = timing.median_s, timing.iqr_s, timing.runs
    result.faults_per_call = timing.faults_per_call
    if prepared.flops is not None:
        result.tflops = prepared.flops / timing.median_s / 1e12
    if prepared.steps is not None:
        result.us_per_step = timing.median_s / prepared.steps * 1e6
    if prepared.bytes_moved is not None:
        rate = prepared.bytes_moved / timing.median_s
        result.gbps = rate / 1e9
        result.bw_fraction = rate / copy_bandwidth


def run_case(spec: CaseSpec, prepared: Prepared, contenders: Sequence[Contender],
             min_time_s: float, copy_bandwidth: float) -> list[Result]:
    """Check every contender, then time the ones whose results are right, in interleaved
    rounds (:func:`bench.timing.interleaved_times`)."""
    checked = [_check(spec, prepared, c) for c in contenders]
    ok = [(result, step) for result, step in checked if step is not None]
    try:
        timings = interleaved_times([step for _, step in ok], spec.device, min_time_s)
    except Exception:  # noqa: BLE001  (timed one by one below, to name the one that failed)
        timings = None
    for i, (result, step) in enumerate(ok):
        try:
            timing = timings[i] if timings else median_time(step, spec.device, min_time_s)
        except Exception as error:  # noqa: BLE001
            result.status, result.reason = "error", _error_text(error)
            result.err = result.err_max = result.peak_bytes = result.faults_per_call = None
            continue
        _timed(result, prepared, timing, copy_bandwidth)
    return [result for result, _ in checked]


def run_contender(spec: CaseSpec, prepared: Prepared, contender: Contender, min_time_s: float,
                  copy_bandwidth: float) -> Result:
    """Check one contender, and time it when its results are right."""
    return run_case(spec, prepared, [contender], min_time_s, copy_bandwidth)[0]


def _summary(results: Sequence[Result]) -> str:
    parts = []
    for r in results:
        if r.status == "ok":
            parts.append(f"{r.contender} {r.median_s * 1e3:.3g} ms")
        elif r.status != "skipped":
            parts.append(f"{r.contender} {r.status.upper()} ({r.reason})")
    return "; ".join(parts)


def run(the_plan: Plan, min_time_s: float, copy_bandwidth: float, progress: bool = True
        ) -> list[Result]:
    """Run every case of the plan; the results carry their speed-ups over each baseline."""
    results: list[Result] = []
    total = len(the_plan.cases)
    bar = tqdm(the_plan.cases, unit="case", file=sys.stderr, dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    for i, (suite, spec) in enumerate(bar, 1):
        bar.set_description(f"{spec.suite} {spec.label}")
        try:
            prepared = suite.prepare(spec)
            _release(spec.device)  # the expected values' float64 scratch
        except Exception as error:  # noqa: BLE001  (reported as the case's error)
            setup = Contender("(case setup)", "ours", "")
            case_results = [Result.for_spec(spec, setup, "error", _error_text(error))]
        else:
            case_results = run_case(spec, prepared, prepared.contenders, min_time_s,
                                    copy_bandwidth)
            del prepared
            _release(spec.device)
        add_speedups(case_results)
        results += case_results
        if progress:
            tqdm.write(f"[{i}/{total}] {spec.suite} {spec.label} ({spec.describe()}): "
                       f"{_summary(case_results)}", file=sys.stderr)
    return results


def add_speedups(case_results: Sequence[Result]) -> None:
    """Speed-up of every timed result over every timed baseline of the same case."""
    baselines = [r for r in case_results if r.status == "ok" and r.kind != "ours"]
    for r in case_results:
        if r.status != "ok":
            continue
        r.speedups = {b.contender: b.median_s / r.median_s for b in baselines if b is not r}


def failures(results: Sequence[Result], the_plan: Plan) -> list[str]:
    """One line per suite that could not run and per contender refused or raised."""
    return list(the_plan.errors) + [f"{r.suite} {r.case}: {r.contender} {r.status}: {r.reason}"
                                    for r in results if r.status in ("refused", "error")]
