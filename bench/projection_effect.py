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
from .timing import ROUNDS, interleaved_times

FORMS = ("units", "blocks")
VARIABLE = "RNNKERNELS_CPU_PROJECTION"

Step = Callable[[], list[Tensor]]


def forced(step: Step, value: str | None, variable: str = VARIABLE) -> Step:
    """``step`` with the environment variable ``variable`` (read by the op on every call) set to
    ``value`` while it runs (None: unset, the default rule), restored after."""
    def run() -> list[Tensor]:
        previous = os.environ.pop(variable, None)
        if value is not None:
            os.environ[variable] = value
        try:
            return step()
        finally:
            os.environ.pop(variable, None)
            if previous is not None:
                os.environ[variable] = previous
    return run


def checked_times(label: str, steps: dict[str, Step], forms: dict[str, Step],
                  default: Step, expected: list[Tensor], min_time_s: float
                  ) -> list[tuple[str, float]]:
    """(contender, median seconds) of ours in the default form (named by the forms whose results
    it equals bit for bit), in each of ``forms`` and of ``steps`` (torch.nn's), each checked
    against ``expected`` first (a wrong one raises), timed in turns."""
    results = {form: f() for form, f in forms.items()}
    taken = [form for form, got in results.items()
             if all(torch.equal(a, b) for a, b in zip(default(), got))]
    timed = {f"rnnkernels (cpu), default ({' = '.join(taken) or '?'})": default,
             **{f"rnnkernels (cpu), {form}": f for form, f in forms.items()}, **steps}
    return time_checked(label, timed, expected, min_time_s)


def time_checked(label: str, timed: dict[str, Step], expected: list[Tensor], min_time_s: float,
                 names: list[str] | None = None, rounds: int = ROUNDS,
                 unchecked: dict[str, Callable[[], object]] | None = None
                 ) -> list[tuple[str, float]]:
    """(contender, median seconds) of each of ``timed``, checked against ``expected`` (float32
    tolerance; a wrong one raises, naming ``label`` and the contender) and then timed in turns,
    in ``rounds`` rounds, with the steps of ``unchecked`` (no result to check: work timed beside
    the contenders, listed after them). ``names``: the results' names in a failure's message
    (default: by position)."""
    names = names or [f"result {i}" for i in range(len(expected))]
    for name, f in timed.items():
        verdict = compare(names, f(), expected, tolerance("cpu", torch.float32))
        if not verdict.ok:
            raise RuntimeError(f"{label}: {name} is wrong: {verdict.reason}")
    steps = {**timed, **(unchecked or {})}
    timings = interleaved_times(list(steps.values()), "cpu", min_time_s, rounds)
    return [(name, t.median_s) for name, t in zip(steps, timings)]


def _module_step(module: torch.nn.Module, x: Tensor) -> Step:
    def step() -> list[Tensor]:
        with torch.inference_mode():
            y, h = module(x)
        return [y, *(h if isinstance(h, tuple) else (h,))]
    return step


def measure(suite: str, hidden: int, inputs: int, min_time_s: float) -> list[tuple[str, float]]:
    """(contender, median seconds) of ``suite``'s batch-1 inference at the cpu profile's shape
    with ``hidden`` units and ``inputs`` inputs, each result checked against float64 first."""
    d = configs.RECURRENCE["cpu"].inference
    family = FAMILIES[suite]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = family.ours(inputs, hidden).eval()
        x = torch.randn(d["T"], d["B"], inputs)
    theirs = family.torch(inputs, hidden).eval()
    theirs.load_state_dict(ours.state_dict())
    f64 = family.torch(inputs, hidden).double().eval()
    f64.load_state_dict(ours.state_dict())
    expected = _module_step(f64, x.double())()
    step = _module_step(ours, x)
    return checked_times(f"{suite}, hidden {hidden}, inputs {inputs}",
                         {family.torch.__name__: _module_step(theirs, x)},
                         {form: forced(step, form) for form in FORMS}, forced(step, None),
                         expected, min_time_s)


def effect_main(argv: list[str] | None, prog: str, description: str, title: str,
                shape: dict[str, int], what: str,
                measure_one: Callable[[str, int, int, float], list[tuple[str, float]]]) -> int:
    """The command line and table of this tool and of its kin (bench.matmul_effect): per cell and
    hidden size (``--case``, ``--hidden``, default ``shape``'s H; ``--input``, default the hidden
    size), the rows ``measure_one`` returns, the last torch.nn's, with each row's ratio to it."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--case", default=",".join(FAMILIES),
                   help=f"comma-separated among {', '.join(FAMILIES)}")
    p.add_argument("--hidden", default=str(shape["H"]),
                   help="comma-separated hidden sizes (default: the recurrence suites' shape)")
    p.add_argument("--input", type=int, default=None,
                   help="input size (default: each hidden size)")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds each contender is timed, over all rounds (default 2)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    unknown = [c for c in cases if c not in FAMILIES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(FAMILIES)}")
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    print(f"# {title}\n\n{env.cpu_model()}, {torch.get_num_threads()} threads, float32, torch "
          f"{torch.__version__}, commit {env.commit()}\n")
    print(f"T = {shape['T']}, B = {shape['B']}; {what}; every contender timed in turns in one "
          f"process (`{prog} --help`).\n")
    print("| case | I | H | contender | median | vs torch.nn |")
    print("|---|---|---|---|---|---|", flush=True)
    for suite in cases:
        for h in hidden:
            inputs = args.input or h
            rows = measure_one(suite, h, inputs, args.min_time)
            theirs = rows[-1][1]
            for name, seconds in rows:
                print(f"| {suite} | {inputs} | {h} | {name} | {seconds * 1e3:.3g} ms | "
                      f"{theirs / seconds:.2f}x |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return effect_main(argv, "python -m bench.projection_effect", __doc__.split("\n\n")[0],
                       "Batch-1 inference's input projection: units against blocks",
                       configs.RECURRENCE["cpu"].inference, "inference", measure)


if __name__ == "__main__":
    raise SystemExit(main())
