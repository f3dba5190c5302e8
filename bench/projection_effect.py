"""python -m bench.projection_effect: batch-1 inference's two input projections, side by side.

Inference on a sequence of one row in float32 computes the input projection inside the
persistent recurrence's team (``FusedInput`` in csrc/cpu/recurrence.cpp), in one of two forms:
``units``, small pieces interleaved with each step's recurrent product, or ``blocks``, one panel
GEMM per 32 steps. By default each thread takes blocks where its ``W_hh`` slice fits 7/8 of its
L2 but not together with its ``W_ih`` slice, units elsewhere; ``RNNKERNELS_CPU_PROJECTION``
forces either, and the op reads it on every call. This tool times, for each cell at the
recurrence suites' inference shape and at each hidden size asked for, ours in the default form,
ours forced to each form and torch.nn's module, in turns in one process
(:func:`bench.timing.interleaved_times`), so that a machine whose speed drifts gives every
contender the same phases. Every result is checked against torch.nn's module in float64 before
it is timed; the ``default`` row names the form it took (its outputs equal that form's bit for
bit).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import configs, env
from .check import compare, tolerance
from .recurrence import FAMILIES
from .timing import interleaved_times

FORMS = ("units", "blocks")
VARIABLE = "RNNKERNELS_CPU_PROJECTION"

Step = Callable[[], list[Tensor]]


def _forced(step: Step, form: str | None) -> Step:
    """``step`` with the projection's form forced to ``form`` (None: the default rule)."""
    def run() -> list[Tensor]:
        previous = os.environ.pop(VARIABLE, None)
        if form is not None:
            os.environ[VARIABLE] = form
        try:
            return step()
        finally:
            os.environ.pop(VARIABLE, None)
            if previous is not None:
                os.environ[VARIABLE] = previous
    return run


def _module_step(module: torch.nn.Module, x: Tensor) -> Step:
    def step() -> list[Tensor]:
        with torch.inference_mode():
            y, h = module(x)
        return [y, *(h if isinstance(h, tuple) else (h,))]
    return step


def measure(suite: str, hidden: int, min_time_s: float) -> list[tuple[str, float]]:
    """(contender, median seconds) of ``suite``'s batch-1 inference at the cpu profile's shape
    with ``hidden`` units (and as many inputs), each result checked against float64 first."""
    d = configs.RECURRENCE["cpu"].inference
    family = FAMILIES[suite]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = family.ours(hidden, hidden).eval()
        x = torch.randn(d["T"], d["B"], hidden)
    theirs = family.torch(hidden, hidden).eval()
    theirs.load_state_dict(ours.state_dict())
    f64 = family.torch(hidden, hidden).double().eval()
    f64.load_state_dict(ours.state_dict())
    expected = _module_step(f64, x.double())()
    step = _module_step(ours, x)
    forms = {form: _forced(step, form) for form in FORMS}
    results = {form: f() for form, f in forms.items()}
    default = _forced(step, None)
    taken = [form for form in FORMS if all(torch.equal(a, b)
                                           for a, b in zip(default(), results[form]))]
    timed = {f"rnnkernels (cpu), default ({' = '.join(taken) or '?'})": default,
             **{f"rnnkernels (cpu), {form}": f for form, f in forms.items()},
             family.torch.__name__: _module_step(theirs, x)}
    names = [f"result {i}" for i in range(len(expected))]
    for name, f in timed.items():
        verdict = compare(names, f(), expected, tolerance("cpu", torch.float32))
        if not verdict.ok:
            raise RuntimeError(f"{suite}, hidden {hidden}: {name} is wrong: {verdict.reason}")
    timings = interleaved_times(list(timed.values()), "cpu", min_time_s)
    return [(name, t.median_s) for name, t in zip(timed, timings)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.projection_effect",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default=",".join(FAMILIES),
                   help=f"comma-separated among {', '.join(FAMILIES)}")
    p.add_argument("--hidden", default=str(configs.RECURRENCE["cpu"].inference["H"]),
                   help="comma-separated hidden sizes (input size the same; default: the "
                        "recurrence suites' inference shape)")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds each contender is timed, over all rounds (default 2)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    unknown = [c for c in cases if c not in FAMILIES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(FAMILIES)}")
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    d = configs.RECURRENCE["cpu"].inference
    print(f"# Batch-1 inference's input projection: units against blocks\n\n{env.cpu_model()}, "
          f"{torch.get_num_threads()} threads, float32, torch {torch.__version__}, commit "
          f"{env.commit()}\n")
    print(f"T = {d['T']}, B = {d['B']}, I = H; every contender timed in turns in one process "
          "(`python -m bench.projection_effect --help`).\n")
    print("| case | H | contender | median | vs torch.nn |")
    print("|---|---|---|---|---|", flush=True)
    for suite in cases:
        for h in hidden:
            rows = measure(suite, h, args.min_time)
            theirs = rows[-1][1]
            for name, seconds in rows:
                print(f"| {suite} | {h} | {name} | {seconds * 1e3:.3g} ms | "
                      f"{theirs / seconds:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
