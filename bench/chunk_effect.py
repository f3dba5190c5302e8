"""python -m bench.chunk_effect: the CPU selective scan's training step at several chunk sizes.

The CPU kernels keep the state at every chunk start and the backward recomputes one chunk at a
time; the chunk is ``CHUNK_SIZE["cpu"]`` in rnnkernels/ops/selective_scan.py, which this tool sets
for each contender while it runs. For each state size N asked
for, at the selective_scan suite's training shape or the one ``--shape`` gives, it times the
training step
(``ops.selective_scan`` forward and ``torch.autograd.grad``) at the default chunk and at each
chunk asked for, in turns in one process (:func:`bench.timing.interleaved_times`), every
contender checked first against the float64 PyTorch loop, as the suite checks ours.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from rnnkernels.ops.selective_scan import CHUNK_SIZE, WIDE_STATE_CHUNK, chunk_size

from . import configs, env
from .projection_effect import time_checked
from .scans import SelectiveScanSuite, cpu_train_case


@contextlib.contextmanager
def chunk_forced(chunk: int | None) -> Iterator[None]:
    """The CPU chunk forced to ``chunk`` for every state size (None: the default, see
    rnnkernels.ops.selective_scan.chunk_size) while the block runs."""
    saved = CHUNK_SIZE["cpu"], WIDE_STATE_CHUNK["cpu"]
    if chunk is not None:
        CHUNK_SIZE["cpu"] = WIDE_STATE_CHUNK["cpu"] = chunk
    try:
        yield
    finally:
        CHUNK_SIZE["cpu"], WIDE_STATE_CHUNK["cpu"] = saved


def suite_shape() -> dict[str, int]:
    """batch, dim and L of the selective_scan suite's CPU training case."""
    train = configs.SELECTIVE_SCAN["cpu"].train
    return {k: train[k] for k in ("batch", "dim", "L")}


def measure(N: int, chunks: list[int], min_time_s: float,
            shape: dict[str, int] | None = None) -> list[tuple[str, float]]:
    """(contender, median seconds) of the training step with state size N at ``shape`` (batch,
    dim, L; default: the suite's) at the default chunk and at each of ``chunks``, each checked
    against float64 first."""
    train_step, expected = cpu_train_case({**(shape or suite_shape()), "N": N})
    names = list(SelectiveScanSuite.names_train)

    def step(chunk: int | None) -> Callable[[], list[Tensor]]:
        def run() -> list[Tensor]:
            with chunk_forced(chunk):
                return train_step()
        return run

    default = chunk_size("cpu", N)
    timed = {f"default ({default})": step(None),
             **{str(c): step(c) for c in chunks if c != default}}
    return time_checked(f"N = {N}, chunk", timed, expected, min_time_s, names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chunk_effect",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--states", default="16,32,64,128,256",
                   help="comma-separated state sizes N (default 16,32,64,128,256)")
    p.add_argument("--chunks", default="64,128,256",
                   help="comma-separated chunk sizes to force (default 64,128,256)")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds each contender is timed, over all rounds (default 2)")
    p.add_argument("--shape", default=None, metavar="BATCH,DIM,L",
                   help="batch, channels and length (default: the selective_scan suite's "
                   "training case)")
    args = p.parse_args(argv)
    states = [int(n) for n in args.states.split(",") if n.strip()]
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    shape = suite_shape()
    if args.shape is not None:
        parts = args.shape.split(",")
        sizes = [int(v) for v in parts] if all(v.strip().isdigit() for v in parts) else []
        if len(sizes) != 3 or min(sizes) < 1:
            p.error(f"--shape takes three positive sizes BATCH,DIM,L, got {args.shape!r}")
        shape = dict(zip(("batch", "dim", "L"), sizes))
    print(f"# The CPU selective scan's chunk\n\n{env.cpu_model()}, {torch.get_num_threads()} "
          f"threads, float32, torch {torch.__version__}, commit {env.commit()}\n")
    print(f"Training step (forward and backward) at batch {shape['batch']}, dim {shape['dim']}, "
          f"L {shape['L']}, time-varying B and C, D, z, delta_bias, softplus; every contender "
          "timed in turns in one process (`python -m bench.chunk_effect --help`).\n")
    print("| N | chunk | median | vs chunk 64 |")
    print("|---|---|---|---|", flush=True)
    for N in states:
        rows = measure(N, chunks, args.min_time, shape)
        base = dict(rows).get("64", rows[0][1])
        for name, seconds in rows:
            print(f"| {N} | {name} | {seconds * 1e3:.3g} ms | {base / seconds:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
