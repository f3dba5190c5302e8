"""python -m bench.step_effect: the CPU selective scan's training step with each of three of its
fixed-cost remedies undone: the Python autograd.Function instead of the C++ autograd node, plain
stores instead of non-temporal ones, lane buffers allocated on every call instead of kept; and
its two kernels alone, called straight through their ops, without the Python function's checks
and backend choice and without autograd: what the step costs beyond its kernels.

In plain eager mode ``ops.selective_scan`` records a C++ autograd node for the C++ ops
(csrc/selective_scan_autograd.cpp; ``CPP_AUTOGRAD_BACKENDS`` in rnnkernels/ops/selective_scan.py),
so that the step's autograd path has no Python in it; without the backend in that set it applies
the Python autograd.Function of rnnkernels/ops/_autograd.py instead. The CPU kernels store out and
the input gradients non-temporally from 1 MB each (``lanes::stream_output``; plain stores read
every line first and evict what the caches held, which the step's Python then misses);
``RNNKERNELS_CPU_STREAM=0`` forces plain stores. The kernels' threads keep the lane buffers they
free for their next call (``lanes::FreedBuffers``); ``rnnkernels.keep_cpu_lane_buffers``
turns that off. At the selective_scan suite's training shape and a small one, where the step's
fixed costs show, this tool times the step (forward and ``torch.autograd.grad``) by default,
with each remedy undone and as its kernels alone (below 1x: the share of the step's time the
kernels take), in turns in one process, in short rounds
(:func:`bench.timing.interleaved_times`), each checked first against the float64 PyTorch loop, as
the suite checks ours. With ``--between MB`` every call is preceded by writes to that many MB of
other memory, as a model's other layers make between two calls of one layer (the suite's
back-to-back calls find their output buffers still cached); the writes are timed alone in the
same rounds and their median subtracted.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from rnnkernels import keep_cpu_lane_buffers
from rnnkernels.ops.selective_scan import CPP_AUTOGRAD_BACKENDS, chunk_size

from . import configs, env
from .projection_effect import forced, time_checked
from .scans import SelectiveScanSuite, cpu_train_case, cpu_train_inputs

# A shape whose kernels take microseconds: the step is mostly its fixed costs.
SMALL_SHAPE = {"batch": 1, "dim": 64, "L": 64, "N": 16}
# Rounds of the interleaved timing: the contenders differ by a few percent at the suite's shape,
# less than this machine's speed drifts over the second that each of bench.timing's usual rounds
# takes.
ROUNDS = 40
STREAM_VARIABLE = "RNNKERNELS_CPU_STREAM"


@contextlib.contextmanager
def python_autograd() -> Iterator[None]:
    """The CPU op's plain eager training through the Python autograd.Function while the block
    runs."""
    CPP_AUTOGRAD_BACKENDS.discard("cpu")
    try:
        yield
    finally:
        CPP_AUTOGRAD_BACKENDS.add("cpu")


@contextlib.contextmanager
def fresh_lane_buffers() -> Iterator[None]:
    """The CPU kernels' lane buffers allocated and freed on every call while the block runs."""
    keep_cpu_lane_buffers(False)
    try:
        yield
    finally:
        keep_cpu_lane_buffers(True)


def kernels_alone(dims: dict[str, int]) -> Callable[[], list[Tensor]]:
    """cpu_train_case's step at ``dims`` as its two kernels alone: the forward op (saving its
    checkpoints) and the backward op, called through torch.ops with the arguments
    ``ops.selective_scan`` gives them, no autograd; out and every gradient, as the step."""
    inputs, grad_out = cpu_train_inputs(dims)
    args = [t.detach() for t in inputs]
    chunk = chunk_size("cpu", args[2].shape[1])
    ops = torch.ops.rnnkernels

    def step() -> list[Tensor]:
        out, _, checkpoints = ops.selective_scan_fwd(*args, True, None, chunk, True)
        grads = ops.selective_scan_bwd(grad_out, None, *args, True, None, checkpoints, chunk)
        return [out, *grads[:len(args)]]
    return step


def measure(dims: dict[str, int], min_time_s: float, between_mb: int = 0
            ) -> list[tuple[str, float]]:
    """(contender, median seconds) of the training step at ``dims`` (batch, dim, L, N) by
    default, with the Python Function, with plain stores and with fresh lane buffers, each
    checked against float64 first; with ``between_mb``, each call after writes to that many MB,
    whose own median is subtracted."""
    train_step, expected = cpu_train_case(dims)

    def with_python() -> list[Tensor]:
        with python_autograd():
            return train_step()

    def with_fresh_buffers() -> list[Tensor]:
        with fresh_lane_buffers():
            return train_step()

    timed: dict[str, Callable[[], list[Tensor]]] = {
        "default": forced(train_step, None, STREAM_VARIABLE),
        "Python Function": forced(with_python, None, STREAM_VARIABLE),
        "plain stores": forced(train_step, "0", STREAM_VARIABLE),
        "fresh lane buffers": forced(with_fresh_buffers, None, STREAM_VARIABLE),
        "kernels alone": forced(kernels_alone(dims), None, STREAM_VARIABLE)}
    unchecked: dict[str, Callable[[], object]] = {}
    if between_mb:
        other = torch.empty(between_mb << 18)

        def write_other() -> None:
            other.fill_(1.0)

        def after_writes(step: Callable[[], list[Tensor]]) -> Callable[[], list[Tensor]]:
            def run() -> list[Tensor]:
                write_other()
                return step()
            return run

        timed = {k: after_writes(f) for k, f in timed.items()}
        unchecked = {"writes": write_other}
    rows = time_checked(f"shape {dims}", timed, expected, min_time_s,
                        list(SelectiveScanSuite.names_train), ROUNDS, unchecked)
    alone = dict(rows).get("writes", 0.0)
    return [(name, seconds - alone) for name, seconds in rows if name not in unchecked]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_effect",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--min-time", type=float, default=4.0,
                   help="seconds each contender is timed, over all rounds (default 4)")
    p.add_argument("--between", type=int, default=0, metavar="MB",
                   help="MB of other memory written before every call, timed alone and "
                   "subtracted (default 0: back-to-back calls, as the suite's)")
    args = p.parse_args(argv)
    if args.between < 0:
        p.error(f"--between takes a size in MB, 0 or more, got {args.between}")
    shapes = [dict(configs.SELECTIVE_SCAN["cpu"].train), SMALL_SHAPE]
    print(f"# The selective scan's training step on the CPU, remedies undone\n\n{env.cpu_model()}, "
          f"{torch.get_num_threads()} threads, float32, torch {torch.__version__}, commit "
          f"{env.commit()}\n")
    print("Training step (forward and backward), time-varying B and C, D, z, delta_bias, "
          "softplus; every contender timed in turns in one process (`python -m "
          "bench.step_effect --help`). The default's speed-up over each contender.")
    if args.between:
        print(f"Every call after writes to {args.between} MB of other memory; the writes' own "
              "median, timed in the same rounds, subtracted.")
    print()
    print("| batch | dim | L | N | step | median | default vs it |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for dims in shapes:
        rows = measure(dims, args.min_time, args.between)
        base = dict(rows)["default"]
        for name, seconds in rows:
            print(f"| {dims['batch']} | {dims['dim']} | {dims['L']} | {dims['N']} | {name} | "
                  f"{seconds * 1e3:.3g} ms | {seconds / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
