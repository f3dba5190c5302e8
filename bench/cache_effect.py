"""python -m bench.cache_effect: what the CPU ops' buffer cache buys, side by side in one run.

The CPU ops take their buffers of 1 MiB and more from a cache of freed buffers
(csrc/cpu/workspace_cache.h). This tool times the training steps of the LSTM and the GRU at the
recurrence suites' main shape and of the selective scan at its suite's: ours with the cache (the
default) and without it (``rnnkernels.set_cpu_cache_limit(0)``: every buffer from torch's
allocator, as before the cache), and torch.nn's module for the recurrences, in turns
(:func:`bench.timing.interleaved_times`), with the minor page faults per call, each case and
allocator state in a fresh process:

- default: glibc's dynamic thresholds (a freed buffer of up to 32 MiB raises the mmap threshold
  above its size, after which buffers of that size come from the heap; whether the heap gives
  their pages back to the kernel when they are freed depends on what else lies on it);
- returning: glibc's mmap threshold fixed at its initial 128 KiB (``MALLOC_MMAP_THRESHOLD_``),
  so that a buffer of 128 KiB and more that no free heap memory can hold is mapped when
  allocated and unmapped when freed, and a step pays a page fault per 4 KiB of it on every
  call. The float64 results the steps are checked against are computed in the parent process,
  whose heap they leave with free memory that could hold such buffers.

Every step's results are checked before it is timed: against float64 (torch.nn's module in
float64 for the recurrences, the PyTorch loop in float64 for the scan), and ours with and
without the cache bit for bit equal. The returning state needs glibc; elsewhere it is skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import rnnkernels
from rnnkernels import ops

from . import configs, env
from .check import compare, tolerance
from .loops import selective_scan_loop
from .recurrence import FAMILIES
from .scans import _train_step as scan_train_step
from .scans import selective_scan_inputs
from .timing import interleaved_times

# The allocator states, each the environment of a fresh process (glibc reads these at start).
STATES = {"default": {}, "returning": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}}
CASES = ("lstm", "gru", "selective_scan")

Step = Callable[[], list[Tensor]]


def _with_cache(step: Step, limit: int) -> Step:
    """``step`` with the cache's limit at ``limit`` (0: off, releasing what it held)."""
    def run() -> list[Tensor]:
        rnnkernels.set_cpu_cache_limit(limit)
        return step()
    return run


def _module_step(module: torch.nn.Module, x: Tensor, gy: Tensor) -> Step:
    def step() -> list[Tensor]:
        y, _ = module(x)
        return [y, *torch.autograd.grad(y, [x, *module.parameters()], gy)]
    return step


def recurrence_case(suite: str) -> tuple[dict[str, Step], Step]:
    """The training steps of ``suite`` at the cpu profile's shape, ours and torch.nn's, and the
    float64 step that gives the results they are checked against: the same weights and inputs in
    every process."""
    d = configs.RECURRENCE["cpu"].train
    family = FAMILIES[suite]
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = family.ours(d["I"], d["H"])
    theirs = family.torch(d["I"], d["H"])
    theirs.load_state_dict(ours.state_dict())
    f64 = family.torch(d["I"], d["H"]).double()
    f64.load_state_dict(ours.state_dict())
    x = torch.randn(d["T"], d["B"], d["I"], generator=gen, requires_grad=True)
    gy = torch.randn(d["T"], d["B"], d["H"], generator=gen)
    reference = _module_step(f64, x.detach().double().requires_grad_(), gy.double())
    return {"rnnkernels (cpu)": _module_step(ours, x, gy),
            family.torch.__name__: _module_step(theirs, x, gy)}, reference


def scan_case() -> tuple[dict[str, Step], Step]:
    """The selective scan's training step at the cpu profile's shape (a Mamba block's call:
    variable B and C, D, z, delta_bias, softplus) and the PyTorch loop's in float64."""
    dims = configs.SELECTIVE_SCAN["cpu"].train
    inputs, grad_out = selective_scan_inputs(dims, "cpu", torch.float32,
                                             torch.Generator().manual_seed(0), True)

    def ours(*a: Tensor) -> Tensor:
        return ops.selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True)

    f64 = [t.detach().double().requires_grad_() for t in inputs]
    reference = scan_train_step(lambda *a: selective_scan_loop(*a, delta_softplus=True), f64,
                                grad_out.double(), None)
    return {"rnnkernels (cpu)": scan_train_step(ours, inputs, grad_out, None)}, reference


def case_steps(case: str) -> tuple[dict[str, Step], Step]:
    return scan_case() if case == "selective_scan" else recurrence_case(case)


def measure(case: str, min_time_s: float, expected: list[Tensor]
            ) -> list[tuple[str, float, float]]:
    """(contender, median seconds, faults per call) of ``case``'s steps, after checking them
    against ``expected`` (float64)."""
    steps, _ = case_steps(case)
    ours = steps.pop("rnnkernels (cpu)")
    limit = rnnkernels.set_cpu_cache_limit(0)  # the process's limit, restored at the end
    try:
        timed = {"rnnkernels (cpu), cached": _with_cache(ours, limit),
                 "rnnkernels (cpu), no cache": _with_cache(ours, 0), **steps}
        results = {name: [t.detach() for t in step()] for name, step in timed.items()}
        names = [f"result {i}" for i in range(len(expected))]
        for name, got in results.items():
            verdict = compare(names, got, expected, tolerance("cpu", torch.float32))
            if not verdict.ok:
                raise RuntimeError(f"{case}: {name} is wrong: {verdict.reason}")
        for a, b in zip(*(results[f"rnnkernels (cpu), {m}"] for m in ("cached", "no cache"))):
            if not torch.equal(a, b):
                raise RuntimeError(f"{case}: ours with and without the cache differ")
        timings = interleaved_times(list(timed.values()), "cpu", min_time_s)
    finally:
        rnnkernels.set_cpu_cache_limit(limit)
    return [(name, t.median_s, t.faults_per_call or 0.0) for name, t in zip(timed, timings)]


def run_child(cmd: list[str], environment: dict[str, str]) -> None:
    subprocess.run(cmd, env=environment, check=True)


def print_rows(state: str, cases: list[str], min_time_s: float, expected_dir: Path) -> None:
    """The table rows of ``cases`` in this process's allocator state, checked against the
    expected results the parent saved in ``expected_dir``."""
    for case in cases:
        expected = torch.load(expected_dir / f"{case}.pt")
        rows = measure(case, min_time_s, expected)
        uncached = dict((n, s) for n, s, _ in rows)["rnnkernels (cpu), no cache"]
        for name, seconds, faults in rows:
            print(f"| {case} | {state} | {name} | {seconds * 1e3:.3g} ms | {faults:.0f} | "
                  f"{uncached / seconds:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cache_effect",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default=",".join(CASES),
                   help=f"comma-separated among {', '.join(CASES)}")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds each contender is timed, over all rounds (default 2)")
    # a child's part: its allocator state's rows, against the parent's expected results
    p.add_argument("--rows", choices=sorted(STATES), help=argparse.SUPPRESS)
    p.add_argument("--expected", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(CASES)}")
    if args.rows:
        if args.expected is None:
            p.error("--rows needs --expected")
        print_rows(args.rows, cases, args.min_time, args.expected)
        return 0
    print(f"# What the CPU buffer cache buys\n\n{env.cpu_model()}, {torch.get_num_threads()} "
          f"threads, float32, torch {torch.__version__}, commit {env.commit()}\n")
    print("Training steps; `faults`: minor page faults per call; each allocator state in a fresh "
          "process (`python -m bench.cache_effect --help`).\n")
    print("| case | allocator | contender | median | faults | vs no cache |")
    print("|---|---|---|---|---|---|", flush=True)
    glibc = platform.libc_ver()[0] == "glibc"
    with tempfile.TemporaryDirectory() as tmp:
        # The float64 results here: their computation leaves free heap memory behind, which in
        # a timed process would hold buffers that glibc would otherwise map afresh.
        for case in cases:
            torch.save(case_steps(case)[1](), Path(tmp) / f"{case}.pt")
        for state, variables in STATES.items():
            if variables and not glibc:
                print(f"\nNot glibc: the {state} state was not run.")
                continue
            for case in cases:  # each in its own process: no case's heap left to the next
                run_child([sys.executable, "-m", "bench.cache_effect", "--rows", state, "--case",
                           case, "--min-time", str(args.min_time), "--expected", tmp],
                          {**os.environ, **variables})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
