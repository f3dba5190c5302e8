"""The one place argument checks live. Every check raises before any kernel runs and names the
argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _fmt(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def tensor(name: str, t: object, *, shape: Sequence[int | str] | None = None,
           ndim: int | None = None, like: Tensor | None = None, floating: bool = False,
           dtype: torch.dtype | None = None) -> Tensor:
    """Check that ``t`` is a tensor with the given rank / shape, and with ``like``'s dtype and
    device. In ``shape`` an entry that is a string is a name for a free size."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        expected = _fmt(shape) if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have {ndim} dimensions {expected}, "
                         f"got shape {tuple(t.shape)}")
    if shape is not None:
        for got, want in zip(t.shape, shape):
            if isinstance(want, int) and got != want:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on device {like.device} (the input's), "
                             f"got {t.device}")
        if dtype is None and t.is_floating_point() and t.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} (the input's), got {t.dtype}")
    return t


def optional(name: str, t: object, **kwargs) -> Tensor | None:
    return None if t is None else tensor(name, t, **kwargs)


def nonempty(name: str, t: Tensor, dims: Sequence[tuple[int, str]]) -> None:
    for dim, what in dims:
        if t.shape[dim] == 0:
            raise ValueError(f"{name} must have at least one {what} (dimension {dim}), got shape "
                             f"{tuple(t.shape)}")


def lengths(name: str, t: object, batch: int, steps: int) -> Tensor:
    """Valid lengths per batch row: integers in [1, steps], shape (batch,)."""
    t = tensor(name, t, shape=(batch,))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    # Under torch.compile the values are data: only the eager call checks them.
    eager = not torch.compiler.is_compiling()
    if t.numel() and eager and (int(t.min()) < 1 or int(t.max()) > steps):
        raise ValueError(f"{name} must lie in [1, {steps}] (the sequence length), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t


def choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def probability(name: str, p: object) -> float:
    """A dropout-like probability: a number in [0, 1)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    return float(p)
