"""Small runs of every GPU kernel of rnnkernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m bench.sanitize_cuda
    python -m bench.sanitize_cuda --dry-run     the plan and what this build has (no GPU needed)

Each run goes forward and backward through the public op, forced onto one backend (our CUDA
kernels, and the Triton kernels unless --backends says otherwise), on sizes that find
out-of-bounds accesses: odd and non-power-of-two sizes, batch 1, length 1, a length past one
chunk, per-row lengths, reverse, the LSTM projection, every dtype the kernel takes. A kernel that
is not compiled into this build is skipped and said so; so is a run whose backend fell back (it
warned), since it did not exercise the kernel. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so
that every tensor is its own allocation and memcheck sees accesses past its end.

Exit status: 0 when every run that ran passed, 1 when one raised, 3 when no run could run.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import rnnkernels
from rnnkernels import _backend, _kernels, ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Run:
    family: str
    backend: str
    dtype: torch.dtype
    what: str
    fn: RunFn


RunFn = Callable[[torch.dtype, str], None]


def _forward_backward(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    grads = [torch.randn_like(o) for o in outputs]
    torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    if outputs[0].is_cuda:
        torch.cuda.synchronize()


def _maker(dtype: torch.dtype, device: str) -> Callable[..., torch.Tensor]:
    """leaf(*shape, scale=1, dtype=dtype): a random tensor that requires grad."""
    def leaf(*shape: int, scale: float = 1.0, dtype: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()
    return leaf


def _recurrence(cell: str, T: int, B: int, I: int, H: int, *, proj: int = 0,
                lengths: list[int] | None = None, reverse: bool = False, variant: str = ""
                ) -> RunFn:
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]

    def fn(dtype: torch.dtype, device: str) -> None:
        leaf = _maker(dtype, device)
        P = proj or H
        x, h0 = leaf(T, B, I), leaf(B, P)
        w_ih, w_hh = leaf(G * H, I, scale=0.2), leaf(G * H, P, scale=0.2)
        b_ih, b_hh = leaf(G * H), leaf(G * H)
        lens = torch.tensor(lengths) if lengths is not None else None
        inputs = [x, w_ih, w_hh, b_ih, b_hh, h0]
        if cell == "lstm":
            c0 = leaf(B, H)
            w_hr = leaf(P, H, scale=0.2) if proj else None
            inputs += [c0] + ([w_hr] if proj else [])
            y, (h, c) = ops.lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lens,
                                 reverse=reverse)
            outputs = [y, h, c]
        elif cell == "gru":
            y, h = ops.gru(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after=variant != "reset-before",
                           lengths=lens, reverse=reverse)
            outputs = [y, h]
        else:
            y, h = ops.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity=variant or "tanh",
                           lengths=lens, reverse=reverse)
            outputs = [y, h]
        _forward_backward(outputs, inputs)
    return fn


def _selective_scan(batch: int, dim: int, L: int, N: int, bc: str, *, groups: int = 1,
                    extras: bool = True, initial: bool = False) -> RunFn:
    def fn(dtype: torch.dtype, device: str) -> None:
        leaf, f32 = _maker(dtype, device), torch.float32
        u, delta = leaf(batch, dim, L), leaf(batch, dim, L, scale=0.5)
        A = (-torch.rand(dim, N, device=device) * N - 0.5).requires_grad_()
        bc_shape = {"fixed": (dim, N), "grouped": (batch, groups, N, L)}.get(bc, (batch, N, L))
        B, C = leaf(*bc_shape), leaf(*bc_shape)
        inputs = [u, delta, A, B, C]
        kwargs: dict = {}
        if extras:
            kwargs = {"D": leaf(dim, dtype=f32), "z": leaf(batch, dim, L),
                      "delta_bias": leaf(dim, scale=0.1, dtype=f32), "delta_softplus": True}
            inputs += [kwargs["D"], kwargs["z"], kwargs["delta_bias"]]
        if initial:
            kwargs["initial_state"] = leaf(batch, dim, N, dtype=f32)
            inputs.append(kwargs["initial_state"])
        out, last = ops.selective_scan(u, delta, A, B, C, return_last_state=True, **kwargs)
        _forward_backward([out, last], inputs)
    return fn


def _linear_scan(batch: int, C: int, T: int, initial: bool) -> RunFn:
    def fn(dtype: torch.dtype, device: str) -> None:
        leaf = _maker(dtype, device)
        a = torch.sigmoid(torch.randn(batch, C, T, device=device) + 2).to(dtype).requires_grad_()
        b = leaf(batch, C, T)
        h0 = leaf(batch, C) if initial else None
        h = ops.linear_scan(a, b, h0)
        _forward_backward([h], [a, b] + ([h0] if initial else []))
    return fn


def cases() -> Iterator[tuple[str, str, RunFn]]:
    """(family, description, run) for every small run, whether or not this build can run it."""
    shapes = [{"T": 5, "B": 3, "I": 17, "H": 33}, {"T": 1, "B": 1, "I": 8, "H": 64}]
    for cell, variant in (("lstm", ""), ("gru", ""), ("gru", "reset-before"), ("rnn", "tanh"),
                          ("rnn", "relu")):
        name = f"{cell} {variant}".strip()
        for s in shapes:
            yield ("recurrence", f"{name} T={s['T']} B={s['B']} I={s['I']} H={s['H']}",
                   _recurrence(cell, **s, variant=variant))
        yield ("recurrence", f"{name} lengths + reverse T=7 B=4 I=16 H=20",
               _recurrence(cell, 7, 4, 16, 20, lengths=[7, 2, 1, 5], reverse=True,
                           variant=variant))
    yield ("recurrence", "lstm projection P=11 T=6 B=2 I=9 H=24",
           _recurrence("lstm", 6, 2, 9, 24, proj=11))
    yield ("selective_scan", "variable B/C batch=2 dim=5 L=37 N=16",
           _selective_scan(2, 5, 37, 16, "variable"))
    yield ("selective_scan", "fixed B/C, no D/z/bias batch=1 dim=3 L=1 N=16",
           _selective_scan(1, 3, 1, 16, "fixed", extras=False))
    yield ("selective_scan", "grouped B/C G=2 batch=2 dim=6 L=300 N=8, initial state",
           _selective_scan(2, 6, 300, 8, "grouped", groups=2, initial=True))
    yield ("linear_scan", "batch=2 C=5 T=37", _linear_scan(2, 5, 37, False))
    yield ("linear_scan", "batch=1 C=3 T=1, initial state", _linear_scan(1, 3, 1, True))
    yield ("linear_scan", "batch=2 C=7 T=1000, initial state", _linear_scan(2, 7, 1000, True))


OPS = {"recurrence": "lstm", "selective_scan": "selective_scan", "linear_scan": "linear_scan"}


def unavailable(family: str, backend: str, dtype: torch.dtype) -> str | None:
    if not hasattr(ops, OPS[family]):
        return f"rnnkernels.ops.{OPS[family]} is not in this checkout"
    if backend == "cuda":
        return _kernels.cuda_unsupported(family, dtype)
    return _kernels.triton_unsupported(family, dtype)


def runs(backends: list[str]) -> Iterator[tuple[Run, str | None]]:
    for family, what, fn in cases():
        for backend in backends:
            for dtype in DTYPES:
                yield Run(family, backend, dtype, what, fn), unavailable(family, backend, dtype)


def execute(run: Run, device: str = "cuda") -> str | None:
    """Run it forced onto its backend; the fallback warning when the backend did not take it."""
    _backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught, rnnkernels.use_backend(run.backend):
        warnings.simplefilter("always")
        torch.manual_seed(0)
        run.fn(run.dtype, device)
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("rnnkernels:")]
    return fallbacks[0] if fallbacks else None


def dry_run(backends: list[str]) -> int:
    """Run every case once on the CPU (float32, our CPU backend) to check this script's calls,
    then list the GPU runs this build would make. Returns the number of failures."""
    failures = 0
    for family, what, fn in cases():
        if not hasattr(ops, OPS[family]):
            print(f"[dry-run skip] {family} {what}: rnnkernels.ops.{OPS[family]} is missing")
            continue
        try:
            fallback = execute(Run(family, "cpu", torch.float32, what, fn), device="cpu")
        except Exception as error:  # noqa: BLE001  (every failure is reported)
            print(f"[dry-run FAIL] {family} {what}: {type(error).__name__}: {error}")
            failures += 1
            continue
        note = f" (on {fallback})" if fallback else ""
        print(f"[dry-run ok on cpu] {family} {what}{note}")
    for run, reason in runs(backends):
        dtype = str(run.dtype).replace("torch.", "")
        state = "would run" if reason is None else f"would skip ({reason})"
        print(f"[{state}] {run.family}/{run.backend} {dtype} {run.what}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="run the cases on the CPU to check this script, list the GPU runs")
    p.add_argument("--backends", default="cuda,triton",
                   help="comma-separated among cuda, triton (default both)")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if any(b not in ("cuda", "triton") for b in backends):
        p.error(f"--backends takes cuda and/or triton, got {args.backends!r}")
    if args.dry_run:
        return 1 if dry_run(backends) else 0
    if not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device (use --dry-run to check the plan)", file=sys.stderr)
        return 2
    counts = {"ok": 0, "skip": 0, "FAIL": 0}
    not_built: dict[str, str] = {}
    for run, reason in runs(backends):
        dtype = str(run.dtype).replace("torch.", "")
        name = f"{run.family}/{run.backend} {dtype} {run.what}"
        if reason is not None:
            not_built.setdefault(f"{run.family}/{run.backend} {dtype}", reason)
            counts["skip"] += 1
            continue
        try:
            fallback = execute(run)
        except Exception as error:  # noqa: BLE001  (every failure is reported; the rest still run)
            print(f"[FAIL] {name}: {type(error).__name__}: {error}", flush=True)
            counts["FAIL"] += 1
            continue
        if fallback is not None:
            print(f"[skip] {name}: fell back ({fallback})", flush=True)
            counts["skip"] += 1
        else:
            print(f"[ok] {name}", flush=True)
            counts["ok"] += 1
    for key, reason in not_built.items():
        print(f"[skip] {key}: not in this build ({reason})")
    print(f"sanitize_cuda: {counts['ok']} ran, {counts['FAIL']} failed, {counts['skip']} skipped")
    if counts["FAIL"]:
        return 1
    if counts["ok"] == 0:
        print("sanitize_cuda: no kernel ran, so the sanitizer checked nothing", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
