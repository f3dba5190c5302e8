"""The one place a backend is chosen.

Order of preference: ``cuda`` (our CUDA kernels) > ``triton`` > ``cpu`` (our C++ kernels) >
``reference`` (plain PyTorch), by device and by what the input allows. ``RNNKERNELS_BACKEND``
or :func:`use_backend` forces one; a forced backend that cannot take an input falls back with a
warning, once per reason.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch

from . import _kernels

BACKENDS = ("cuda", "triton", "cpu", "reference")

_forced: str | None = None
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn once per distinct message for the life of the process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _check_name(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op (None: choose automatically)."""
    global _forced
    _forced = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager that forces a backend inside its block."""
    global _forced
    previous = _forced
    _forced = _check_name(name)
    try:
        yield
    finally:
        _forced = previous


# RNNKERNELS_BACKEND is read on every call (a script may set it after the import), from the
# mapping behind os.environ (which os.environ's writes keep current): os.environ.get raises and
# catches a KeyError inside when the variable is unset, the usual case, and in a decoding loop,
# whose layer call runs right after a kernel has swept the caches, that took about 6 us of a
# token's 90 (an in-process timing of the GRU at hidden 256 on the AMD EPYC Zen 2).
# os.environ.get where os.environ has no such mapping.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("RNNKERNELS_BACKEND") if _ENV_DATA is not None else None


def _env_backend() -> str | None:
    if _ENV_DATA is None:
        return os.environ.get("RNNKERNELS_BACKEND") or None
    value = _ENV_DATA.get(_ENV_KEY)
    return os.environ.decodevalue(value) or None if value else None


def forced_backend() -> str | None:
    if _forced is not None:
        return _forced
    return _check_name(_env_backend())


def _available(family: str, device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """Each backend mapped to None if it can take the input, else the reason it cannot."""
    return _reasons(family, device.type, dtype, _kernels.triton_interpreted())


@functools.cache
def _reasons(family: str, device_type: str, dtype: torch.dtype,
             interpreted: bool) -> dict[str, str | None]:
    """:func:`_available` for a device type (what can run there is fixed once the ops are
    loaded; the Triton interpreter is read from the environment on every call). Cached: a
    module's forward asks once per layer and direction, and the answer took microseconds."""
    reasons: dict[str, str | None] = {"reference": None}
    if device_type == "cpu":
        cpu_dtypes = _kernels.CPU_DTYPES[family]
        reasons["cpu"] = None if dtype in cpu_dtypes else (
            f"the C++ CPU kernel of {family} takes {_kernels.dtype_names(cpu_dtypes)}, not {dtype}")
        reasons["triton"] = (_kernels.triton_unsupported(family, dtype)
                             if interpreted
                             else "Triton kernels need a GPU tensor")
        reasons["cuda"] = "CUDA kernels need a CUDA tensor"
    elif device_type == "cuda":
        reasons["cpu"] = "the C++ CPU kernels need a CPU tensor"
        reasons["triton"] = _kernels.triton_unsupported(family, dtype)
        reasons["cuda"] = _kernels.cuda_unsupported(family, dtype)
    else:
        for name in ("cpu", "triton", "cuda"):
            reasons[name] = f"no kernel for device {device_type}"
    return reasons


def choose(family: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``family`` for an input on ``device`` with ``dtype``."""
    forced = forced_backend()
    # Whether the Triton interpreter is on matters only where a forced backend may run Triton
    # on a CPU tensor (unforced, a CPU tensor never goes to Triton); an environment read costs
    # about a microsecond, and a decoding loop asks once per token.
    interpreted = forced is not None and device.type == "cpu" and _kernels.triton_interpreted()
    name, warning = _decide(family, device.type, dtype, forced, interpreted)
    if warning is not None:
        warn_once(warning)
    return name


# _decide's answers by its arguments.
_decisions: dict[tuple, tuple[str, str | None]] = {}


@torch.compiler.assume_constant_result
def _decide(*key) -> tuple[str, str | None]:
    """:func:`_choice` of ``key``, cached (a module's forward asks once per call). A constant
    to torch.compile, which calls it instead of tracing it: torch 2.11's Dynamo traced into
    importlib's find_spec (_kernels.triton_unsupported), which it refuses, so fullgraph
    compilation of a layer failed there. A dict, not functools.cache: Dynamo warned on every
    compilation that it traced through the cache's wrapper."""
    choice = _decisions.get(key)
    if choice is None:
        choice = _decisions[key] = _choice(*key)
    return choice


def _choice(family: str, device_type: str, dtype: torch.dtype, forced: str | None,
            interpreted: bool) -> tuple[str, str | None]:
    """:func:`choose`'s backend and the warning it gives, if any, for everything the choice
    depends on."""
    reasons = _reasons(family, device_type, dtype, interpreted)
    if forced is not None:
        if reasons[forced] is None:
            return forced, None
        fallback = next(b for b in BACKENDS if reasons[b] is None)
        return fallback, (f"rnnkernels: backend {forced!r} cannot run {family} "
                          f"({reasons[forced]}); using {fallback!r}")
    order = ("cpu", "reference") if device_type == "cpu" else ("cuda", "triton", "reference")
    for name in order:
        if reasons[name] is None:
            if name == "reference" and device_type in ("cpu", "cuda"):
                why = reasons[order[-2]]
                return name, (f"rnnkernels: no fast kernel for {family} on {device_type} "
                              f"({why}); using the PyTorch reference")
            return name, None
    return "reference", None
