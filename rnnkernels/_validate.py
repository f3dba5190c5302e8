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
    # The cheap comparisons first: a training step validates about ten tensors per op call.
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None or ndim is not None:
        got = t.shape
        if shape is not None:
            ndim = len(shape)
        if len(got) != ndim:
            expected = _fmt(shape) if shape is not None else f"{ndim} dimensions"
            raise ValueError(f"{name} must have {ndim} dimensions {expected}, "
                             f"got shape {tuple(got)}")
        if shape is not None:
            for size, want in zip(got, shape):
                if size != want and isinstance(want, int):
                    raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(got)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on device {like.device} (the input's), "
                             f"got {t.device}")
        if dtype is None and t.dtype != like.dtype and t.is_floating_point():
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


# ------------------------------------------------------------------ op arguments
# The Triton ops are public beside the Python API (torch.ops.rnnkernels.*_triton), as the C++
# ops are (whose checks are csrc/recurrence_checks.h and the scans' own), and their kernels index
# every tensor by the sizes of a few of them: each refuses arguments of other sizes here, before
# it launches. ``op`` names the op in the messages.

def op_tensor(op: str, name: str, t: object, shape: Sequence[int], like: Tensor) -> Tensor:
    """An op's floating argument of exactly ``shape`` on ``like``'s device (dtype free)."""
    tensor(f"{op}: {name}", t, shape=shape, floating=True)
    if t.device != like.device:
        raise ValueError(f"{op}: {name} must be on device {like.device}, got {t.device}")
    return t


def op_optional(op: str, name: str, t: object, shape: Sequence[int], like: Tensor) -> None:
    if t is not None:
        op_tensor(op, name, t, shape, like)


def _gate_rows(op: str, name: str, t: object, ndim: int, dim: int, gates: int) -> int:
    """The H of dimension ``dim`` (size G*H) of t: refuses t of another rank than ``ndim`` or a
    size not a positive multiple of the cell's G gates."""
    tensor(f"{op}: {name}", t, ndim=ndim, floating=True)
    size = t.shape[dim]
    if size == 0 or size % gates:
        raise ValueError(f"{op}: {name} must have G*H = a positive multiple of G = {gates} (the "
                         f"cell's gates) in dimension {dim}, got shape {tuple(t.shape)}")
    return size // gates


def _recurrence_common(op: str, sizes: tuple[int, int, int, int, int], lstm: bool, like: Tensor,
                       c0, w_hh, w_hr, lengths) -> None:
    T, B, H, P, G = sizes
    if w_hr is not None and not lstm:
        raise ValueError(f"{op}: w_hr (the projection) is an LSTM option")
    if w_hr is None and P != H:
        raise ValueError(f"{op}: the state has {P} units but the cell {H}; a narrower state "
                         "needs w_hr (P, H)")
    if lstm and c0 is None:
        raise ValueError(f"{op}: the LSTM needs c0 (B, H)")
    if lstm:
        op_tensor(op, "c0", c0, (B, H), like)
    op_tensor(op, "w_hh", w_hh, (G * H, P), like)
    op_optional(op, "w_hr", w_hr, (P, H), like)
    if lengths is not None:
        tensor(f"{op}: lengths", lengths, shape=(B,), dtype=torch.int64)
        if lengths.device != like.device:
            raise ValueError(f"{op}: lengths must be on device {like.device}, got "
                             f"{lengths.device}")


def recurrence_fwd_op(op: str, gx, h0, c0, w_hh, b_hh, w_hr, lengths, *, gates: int,
                      lstm: bool) -> None:
    """recurrence_fwd's arguments: gx (T, B, G*H) and h0 (B, P) set the sizes of the rest."""
    H = _gate_rows(op, "gx", gx, 3, 2, gates)
    T, B = gx.shape[0], gx.shape[1]
    tensor(f"{op}: h0", h0, shape=(B, "P"), floating=True)
    P = h0.shape[1]
    op_tensor(op, "h0", h0, (B, P), gx)
    op_optional(op, "b_hh", b_hh, (gates * H,), gx)
    _recurrence_common(op, (T, B, H, P, gates), lstm, gx, c0, w_hh, w_hr, lengths)


def recurrence_bwd_op(op: str, grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, lengths, hs, ws, *,
                      gates: int, lstm: bool, workspace_units: int) -> None:
    """recurrence_bwd's arguments: ws (T, B, K*H), w_hh (G*H, P) and hs (T+1, B, P) set the
    sizes; K = ``workspace_units`` of the cell."""
    H = _gate_rows(op, "w_hh", w_hh, 2, 0, gates)
    P = w_hh.shape[1]
    tensor(f"{op}: ws", ws, ndim=3, floating=True)
    T, B = ws.shape[0], ws.shape[1]
    _recurrence_common(op, (T, B, H, P, gates), lstm, ws, c0, w_hh, w_hr, lengths)
    op_tensor(op, "ws", ws, (T, B, workspace_units * H), ws)
    op_tensor(op, "hs", hs, (T + 1, B, P), ws)
    if hs.dtype != ws.dtype:
        raise TypeError(f"{op}: hs and ws must have one dtype, got {hs.dtype} and {ws.dtype}")
    op_optional(op, "grad_y", grad_y, (T, B, P), ws)
    op_optional(op, "grad_h_n", grad_h_n, (B, P), ws)
    if lstm:
        op_optional(op, "grad_c_n", grad_c_n, (B, H), ws)


def selective_scan_op(op: str, u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """selective_scan_fwd's arguments (and the backward's same ones): u (batch, dim, L) and A
    (dim, N) set the sizes; B, C (dim, N), (batch, N, L) or (batch, G, N, L), G dividing dim."""
    tensor(f"{op}: u", u, ndim=3, floating=True)
    batch, dim, L = u.shape
    op_tensor(op, "delta", delta, (batch, dim, L), u)
    tensor(f"{op}: A", A, shape=(dim, "N"), floating=True)
    N = A.shape[1]
    op_tensor(op, "A", A, (dim, N), u)
    groups = [M.shape[1] for M in (B, C) if isinstance(M, Tensor) and M.dim() == 4]
    G = groups[0] if groups else 1
    if any(g != G for g in groups) or G == 0 or dim % G:
        raise ValueError(f"{op}: B and C must have one group count G dividing dim = {dim}, got "
                         f"shapes {tuple(B.shape)} and {tuple(C.shape)}")
    for name, M in (("B", B), ("C", C)):
        tensor(f"{op}: {name}", M, floating=True)
        variable = (batch, G, N, L) if M.dim() == 4 or G > 1 else (batch, N, L)
        op_tensor(op, name, M, variable if M.dim() > 2 else (dim, N), u)
    op_optional(op, "D", D, (dim,), u)
    op_optional(op, "z", z, (batch, dim, L), u)
    op_optional(op, "delta_bias", delta_bias, (dim,), u)
    op_optional(op, "initial_state", initial_state, (batch, dim, N), u)


def linear_scan_op(op: str, a, shaped_like_a: dict[str, object], initial_state) -> None:
    """linear_scan's arguments: a (batch, channels, T); the tensors of ``shaped_like_a`` (name:
    tensor: b, or the backward's grad_h and h) a's shape; initial_state (batch, channels)."""
    tensor(f"{op}: a", a, ndim=3, floating=True)
    for name, t in shaped_like_a.items():
        op_tensor(op, name, t, tuple(a.shape), a)
    op_optional(op, "initial_state", initial_state, tuple(a.shape[:2]), a)
