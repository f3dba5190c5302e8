"""Suites selective_scan and linear_scan: memory-bound scans against the PyTorch loop.

selective_scan: ``rnnkernels.ops.selective_scan`` on each backend of ours the device allows, the
step-by-step PyTorch loop, and ``mamba_ssm.selective_scan_fn`` when it is importable (GPU),
called as a Mamba block calls it: variable B and C (batch, N, L), D, z, delta_bias, softplus.
linear_scan: ``rnnkernels.ops.linear_scan`` (h_t = a_t h_{t-1} + b_t) against the PyTorch loop.
Expected results: the same loops in float64 (:mod:`bench.loops`). The metric is the achieved
bandwidth: the bytes that must move (every input read once, every output written once) over
the median time.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
from torch import Tensor

import rnnkernels
from rnnkernels import ops

from . import configs, mamba
from .core import CaseSpec, Contender, Prepared, Step, Target, standard_specs
from .loops import chunked_float64, linear_scan_loop, selective_scan_loop
from .recurrence import forcing, our_backends, seed_of, unavailable_reason

# Speed-up of the selective scan's training step over the PyTorch loop on the CPU (issue 5).
SELECTIVE_SCAN_CPU_TARGET = 100.0
# Bytes of float64 working memory the expected-value computation may use per channel chunk.
REFERENCE_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 16 << 30}


def _missing(name: str) -> str | None:
    if hasattr(ops, name):
        return None
    return (f"rnnkernels.ops.{name} does not exist in this checkout, so there is nothing of ours "
            "to benchmark in this suite")


def _train_step(fn, inputs: list[Tensor | None], grad_out: Tensor | None, backend: str | None
                ) -> Step:
    """The timed step: ``fn(*inputs)``, and when ``grad_out`` is given its backward into every
    input (None inputs excepted)."""
    context = (lambda: rnnkernels.use_backend(backend)) if backend else contextlib.nullcontext
    live = [t for t in inputs if t is not None]
    if grad_out is None:
        def step() -> list[Tensor]:
            with torch.no_grad(), context():
                return [fn(*inputs)]
        return step

    def step() -> list[Tensor]:
        with context():
            out = fn(*inputs)
            return [out, *torch.autograd.grad(out, live, grad_out)]
    return step


def selective_scan_inputs(dims: dict[str, int], device: str, dtype: torch.dtype,
                          gen: torch.Generator, train: bool
                          ) -> tuple[list[Tensor | None], Tensor | None]:
    """Random inputs of ``selective_scan_fn`` (u, delta, A, B, C, D, z, delta_bias) at dims
    (batch, dim, L, N), requiring grad when ``train``, and a random output gradient then."""
    batch, dim, L, N = dims["batch"], dims["dim"], dims["L"], dims["N"]

    def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = dtype) -> Tensor:
        values = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return values.to(dtype).to(device)

    # Mamba's conventions: A, D and delta_bias are float32 parameters, A = -(1..N) scaled
    # (S4D-real), delta_bias the inverse softplus of a step in [1e-3, 1e-1].
    f32 = torch.float32
    steps = torch.exp(torch.rand(dim, generator=gen, dtype=torch.float64)
                      * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    A = (-torch.arange(1, N + 1, dtype=torch.float64)
         * (0.5 + torch.rand(dim, N, generator=gen, dtype=torch.float64))).to(f32).to(device)
    inputs: list[Tensor | None] = [
        randn(batch, dim, L),                       # u
        randn(batch, dim, L, scale=0.5),            # delta (before bias and softplus)
        A,
        randn(batch, N, L),                         # B
        randn(batch, N, L),                         # C
        randn(dim, dtype=f32),                      # D
        randn(batch, dim, L),                       # z
        torch.log(torch.expm1(steps)).to(f32).to(device),  # delta_bias
    ]
    for t in inputs:
        t.requires_grad_(train)
    return inputs, (randn(batch, dim, L) if train else None)


def cpu_train_inputs(dims: dict[str, int]) -> tuple[list[Tensor], Tensor]:
    """The inputs and output gradient of :func:`cpu_train_case`'s step at dims (seeded: the
    same tensors on every call)."""
    gen = torch.Generator().manual_seed(0)
    return selective_scan_inputs(dims, "cpu", torch.float32, gen, True)


def cpu_train_case(dims: dict[str, int]) -> tuple[Step, list[Tensor]]:
    """The CPU float32 training step of ``ops.selective_scan`` with softplus at dims (batch,
    dim, L, N), the suite's inputs (time-varying B and C, D, z, delta_bias), and its expected
    results (out and every gradient, by the float64 PyTorch loop): for the tools that time
    variants of our op (bench.chunk_effect, bench.step_effect)."""
    inputs, grad_out = cpu_train_inputs(dims)

    def loop(*args: Tensor) -> Tensor:
        return selective_scan_loop(*args, delta_softplus=True)

    def ours(*args: Tensor) -> Tensor:
        return ops.selective_scan(*args, delta_softplus=True)

    expected = chunked_float64(loop, inputs, SelectiveScanSuite.channel_dims, grad_out, 64)
    return _train_step(ours, inputs, grad_out,
                       forcing("selective_scan", "cpu", "cpu", torch.float32)), expected


class _ScanSuite:
    """What the two scan suites share: specs from their config, backends of ours, the loop."""

    name = ""
    op_name = ""
    family = ""
    config: ClassVar[dict[str, configs.SuiteConfig]] = {}

    def unavailable(self) -> str | None:
        return _missing(self.op_name)

    def specs(self, device: str, dtype: torch.dtype, profile: str) -> list[CaseSpec]:
        return standard_specs(self.name, device, dtype, self.config[profile], {})

    def targets(self, device: str, dtype: torch.dtype, profile: str) -> list[Target]:
        return []

    def _ours(self, spec: CaseSpec, fn, inputs, grad_out) -> list[Contender]:
        out = []
        for backend in our_backends(spec.device):
            name = f"rnnkernels ({backend})"
            reason = unavailable_reason(self.family, backend, spec.device, spec.dtype)
            if reason is not None:
                out.append(Contender(name, "ours", backend, unavailable=reason))
                continue
            out.append(Contender(name, "ours", backend,
                                 lambda b=backend: _train_step(
                                     fn, inputs, grad_out,
                                     forcing(self.family, b, spec.device, spec.dtype))))
        return out

    @staticmethod
    def _chunk(spec: CaseSpec, bytes_per_channel: int) -> int:
        return max(1, REFERENCE_CHUNK_BYTES[spec.device] // max(1, bytes_per_channel))


class SelectiveScanSuite(_ScanSuite):
    name = "selective_scan"
    op_name = "selective_scan"
    family = "selective_scan"
    config = configs.SELECTIVE_SCAN
    # Channel dim of each input (u, delta, A, B, C, D, z, delta_bias); None: shared by channels.
    channel_dims = (1, 1, 0, None, None, 0, 1, 0)
    names_train = ("out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")

    def targets(self, device: str, dtype: torch.dtype, profile: str) -> list[Target]:
        if profile != "cpu" or dtype != torch.float32:
            return []
        return [Target(self.name, f"selective scan training step >= {SELECTIVE_SCAN_CPU_TARGET:g}x "
                       "the PyTorch loop", ("train", "rnnkernels (cpu)"), ("train", "PyTorch loop"),
                       SELECTIVE_SCAN_CPU_TARGET)]

    def prepare(self, spec: CaseSpec) -> Prepared:
        d = spec.dims
        batch, dim, L, N = d["batch"], d["dim"], d["L"], d["N"]
        dev, dt = spec.device, spec.dtype
        train = spec.mode == "train"
        gen = torch.Generator().manual_seed(seed_of(spec))
        inputs, grad_out = selective_scan_inputs(d, dev, dt, gen, train)

        def loop(*args: Tensor) -> Tensor:
            return selective_scan_loop(*args, delta_softplus=True)

        def ours(*args: Tensor) -> Tensor:
            return ops.selective_scan(*args, delta_softplus=True)

        work = batch * L * N * 8 * 6
        expected = chunked_float64(loop, inputs, self.channel_dims, grad_out,
                                   self._chunk(spec, work))
        contenders = self._ours(spec, ours, inputs, grad_out)
        contenders.append(Contender("PyTorch loop", "loop", "PyTorch ops",
                                    lambda: _train_step(loop, inputs, grad_out, None)))
        contenders.append(self._mamba(spec, inputs, grad_out))

        s = dt.itemsize
        n, m, params = batch * dim * L, batch * N * L, (dim * N + 2 * dim) * 4
        forward_bytes = (4 * n + 2 * m) * s + params          # read u, delta, z, B, C; write out
        backward_bytes = (7 * n + 4 * m) * s + 2 * params     # read u, delta, z, B, C, dout;
        #                                                       write du, ddelta, dz, dB, dC
        return Prepared(list(self.names_train) if train else ["out"], expected, contenders,
                        bytes_moved=forward_bytes + (backward_bytes if train else 0))

    def _mamba(self, spec: CaseSpec, inputs, grad_out) -> Contender:
        name = "mamba_ssm"
        if spec.device != "cuda":
            return Contender(name, "mamba_ssm", "CUDA", unavailable="mamba_ssm runs on CUDA only")
        fn, note = mamba.load()
        if fn is None:
            return Contender(name, "mamba_ssm", "CUDA", unavailable=note)

        def scan(*args: Tensor) -> Tensor:
            return fn(*args, delta_softplus=True)
        return Contender(name, "mamba_ssm", "CUDA",
                         lambda: _train_step(scan, inputs, grad_out, None))


class LinearScanSuite(_ScanSuite):
    name = "linear_scan"
    op_name = "linear_scan"
    family = "linear_scan"
    config = configs.LINEAR_SCAN

    def prepare(self, spec: CaseSpec) -> Prepared:
        d = spec.dims
        batch, C, T = d["batch"], d["C"], d["T"]
        dev, dt = spec.device, spec.dtype
        train = spec.mode == "train"
        gen = torch.Generator().manual_seed(seed_of(spec))

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float64)

        # Decays in (0, 1) like a forget gate's, mostly near 0.9.
        inputs: list[Tensor | None] = [
            torch.sigmoid(randn(batch, C, T) + 2.0).to(dt).to(dev),
            randn(batch, C, T).to(dt).to(dev),
            randn(batch, C).to(dt).to(dev),
        ]
        for t in inputs:
            t.requires_grad_(train)
        grad_out = randn(batch, C, T).to(dt).to(dev) if train else None

        expected = chunked_float64(linear_scan_loop, inputs, (1, 1, 1), grad_out,
                                   self._chunk(spec, batch * T * 8 * 8))
        contenders = self._ours(spec, ops.linear_scan, inputs, grad_out)
        contenders.append(Contender("PyTorch loop", "loop", "PyTorch ops",
                                    lambda: _train_step(linear_scan_loop, inputs, grad_out, None)))
        n, s = batch * C * T, dt.itemsize
        # Forward: read a, b, write h. Backward: read dh, a, h; write da, db.
        bytes_moved = (3 * n + (5 * n if train else 0)) * s + batch * C * s
        names = ["h", "da", "db", "dh0"] if train else ["h"]
        return Prepared(names, expected, contenders, bytes_moved=bytes_moved)
