"""The benchmark's data model: a case (one shape, mode and dtype), its contenders, their results.

A suite turns a configuration into :class:`CaseSpec` objects (cheap, no tensors), and a spec into
a :class:`Prepared` case (inputs, the float64 expected results, the contenders). The runner
(:mod:`bench.runner`) checks each contender against the expected results, then times it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("forward", "train", "inference")
# Kinds of contender: ours, and the baselines a user would otherwise run.
KINDS = ("ours", "torch.nn", "loop", "mamba_ssm")

Step = Callable[[], list[Tensor]]


@dataclass(frozen=True)
class CaseSpec:
    """One measured configuration. ``shape`` is an ordered tuple of (name, size) pairs.

    ``mode``: "forward" (no autograd), "train" (forward + backward of every input and weight),
    "inference" (no autograd, batch 1). ``axes`` names the sweeps this point lies on (for the
    scaling plots); ``headline`` marks the cases the README table shows."""

    suite: str
    label: str
    mode: str
    shape: tuple[tuple[str, int], ...]
    device: str
    dtype: torch.dtype
    headline: bool = False
    axes: tuple[str, ...] = ()
    variant: str = ""
    loops: bool = True

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.shape)

    def describe(self) -> str:
        text = " ".join(f"{k}={v}" for k, v in self.shape)
        return f"{text} {self.variant}" if self.variant else text

    def key(self) -> tuple:
        return (self.suite, self.mode, self.variant, self.shape)


@dataclass(frozen=True)
class Target:
    """A speed-up the project aims for: time(slow) / time(fast) >= minimum, where ``fast`` and
    ``slow`` are (case label, contender name) pairs of one suite."""

    suite: str
    text: str
    fast: tuple[str, str]
    slow: tuple[str, str]
    minimum: float


@dataclass
class Contender:
    """One implementation of a case. ``build`` makes the timed step (inputs bound, weights
    copied); the step returns the case's results in the order of :attr:`Prepared.names`, or in a
    form ``canon`` maps to it (outside the timed region). ``unavailable`` says why it cannot run
    here (then ``build`` is None). ``expected``: the results it is checked against when they
    are not the case's (a contender that runs the case's work on another input form)."""

    name: str
    kind: str
    impl: str
    build: Callable[[], Step] | None = None
    unavailable: str | None = None
    canon: Callable[[list[Tensor]], list[Tensor]] | None = None
    expected: list[Tensor] | None = None


@dataclass
class Prepared:
    """A case ready to run: names and float64 expected values of its results, its contenders,
    and the work it represents (useful FLOPs, bytes that must move, sequential steps)."""

    names: list[str]
    expected: list[Tensor]
    contenders: list[Contender]
    flops: float | None = None
    bytes_moved: float | None = None
    steps: int | None = None


@dataclass
class Result:
    """The outcome of one contender on one case; ``status`` is "ok", "refused" (wrong result, no
    timing posted), "error" (it raised) or "skipped" (not available here)."""

    suite: str
    case: str
    mode: str
    shape: dict[str, int]
    variant: str
    headline: bool
    axes: list[str]
    dtype: str
    device: str
    contender: str
    kind: str
    impl: str
    status: str
    reason: str = ""
    median_s: float | None = None
    iqr_s: float | None = None
    runs: int | None = None
    peak_bytes: int | None = None
    faults_per_call: float | None = None
    err: float | None = None
    err_max: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    bw_fraction: float | None = None
    us_per_step: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_spec(cls, spec: CaseSpec, contender: Contender, status: str, reason: str = ""
                 ) -> Result:
        return cls(suite=spec.suite, case=spec.label, mode=spec.mode, shape=spec.dims,
                   variant=spec.variant, headline=spec.headline, axes=list(spec.axes),
                   dtype=dtype_name(spec.dtype), device=spec.device, contender=contender.name,
                   kind=contender.kind, impl=contender.impl, status=status, reason=reason)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sweep_specs(suite: str, device: str, dtype: torch.dtype, base: Mapping[str, int],
                sweeps: Mapping[str, Sequence[int]], couple: Mapping[str, Sequence[str]],
                loops: bool) -> list[CaseSpec]:
    """Training-step specs along each sweep axis through ``base`` (the base point itself is
    left to the caller, which makes it a headline case). ``couple`` lists the dims an axis sets
    together (sweeping the hidden size H also sets the input size I)."""
    specs = []
    for axis, values in sweeps.items():
        for value in values:
            dims = dict(base)
            for name in couple.get(axis, (axis,)):
                dims[name] = value
            specs.append(CaseSpec(suite, f"train {axis}={value}", "train", tuple(dims.items()),
                                  device, dtype, axes=(axis,), loops=loops))
    return specs


def merge_duplicates(specs: Sequence[CaseSpec]) -> list[CaseSpec]:
    """One spec per (suite, mode, variant, shape): a sweep point that equals a headline case is
    measured once, as the headline case, and keeps the sweep axes of both."""
    merged: dict[tuple, CaseSpec] = {}
    for spec in specs:
        seen = merged.get(spec.key())
        if seen is None:
            merged[spec.key()] = spec
            continue
        first, second = (seen, spec) if seen.headline or not spec.headline else (spec, seen)
        axes = tuple(dict.fromkeys(first.axes + second.axes))
        merged[spec.key()] = CaseSpec(first.suite, first.label, first.mode, first.shape,
                                      first.device, first.dtype, first.headline or second.headline,
                                      axes, first.variant, first.loops or second.loops)
    return list(merged.values())


def standard_specs(suite: str, device: str, dtype: torch.dtype, config,
                   couple: Mapping[str, Sequence[str]]) -> list[CaseSpec]:
    """The cases every suite has (see :mod:`bench.configs`): training step and forward at the
    training point, inference at batch 1, the extra cases, and the sweeps."""
    train = tuple(config.train.items())
    specs = [
        CaseSpec(suite, "train", "train", train, device, dtype, headline=True,
                 axes=tuple(config.sweeps)),
        CaseSpec(suite, "forward", "forward", train, device, dtype, headline=True),
        CaseSpec(suite, "inference", "inference", tuple(config.inference.items()), device, dtype,
                 headline=True),
    ]
    specs += [CaseSpec(suite, label, mode, tuple(dims.items()), device, dtype, headline=True)
              for label, mode, dims in config.extra]
    specs += sweep_specs(suite, device, dtype, config.train, config.sweeps, couple,
                         config.sweep_loops)
    return merge_duplicates(specs)
