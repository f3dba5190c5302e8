"""x W^T + b for the recurrences' input projection, through our packed panels or oneDNN's matmul
on the CPU.

On a float32 CPU tensor, ``F.linear`` and ``torch.mm`` call MKL's sgemm, which on AMD CPUs runs
its AVX2 kernels; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's
CPU backend calls for linear layers) runs AVX-512 there. The input projection (T*B rows times
G*H columns) and its input gradient are the largest matmuls of a recurrent layer's step, so they
go through oneDNN when it can take them and have at least :func:`min_rows` rows (below that
oneDNN's per-call cost outweighs its faster inner loop). Where the C++ kernels prefer oneDNN for
float32 matmuls (``torch.ops.rnnkernels.onednn_matmul_preferred``, csrc/cpu/onednn_matmul.h: AMD
Zen 5 and later, whose full-width AVX-512 units run oneDNN at twice MKL's AVX2 rate, or
``RNNKERNELS_ONEDNN_MATMUL=1``), the weight gradient goes through oneDNN too
(``torch.ops.rnnkernels.mm_tn``, the C++ weight gradients' matmul), and the projection from 64
rows on; elsewhere (Zen 4, where the two measured even up to 1024
rows, and Intel CPUs, where MKL runs AVX-512 itself) the weight gradient stays with MKL.

Where the C++ kernels prefer our own packed panels for float32 matmuls
(``torch.ops.rnnkernels.panel_matmul_preferred``, csrc/cpu/panel_matmul.h: builds without
AVX-512, where MKL and oneDNN ran these products 1.2-1.5x slower than the panels, or
``RNNKERNELS_PANEL_MATMUL=1``), the projection and its input gradient go through
``torch.ops.rnnkernels.matmul`` instead, from :data:`MIN_ROWS` rows on (below, packing the weight
on every call cost more than it saved), and the weight gradient's ``mm_tn`` through the panels
too.

Only plain eager float32 on the CPU takes this path: under torch.compile, a torch.func
transform, forward-mode AD, autocast or a tensor subclass, ``F.linear`` runs as before. A
second-order gradient (``create_graph=True``) differentiates the backward's plain matmuls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import needs_grad, plain_eager

# Rows (T * B for a recurrence) from which oneDNN's matmul measured faster than MKL's: on AMD
# Zen 4 (AVX-512 in two halves) at 1024 rows (B = 8, T = 128) the two were even; on Zen 5
# (full-width AVX-512, where oneDNN is preferred) oneDNN was faster from 64 rows on for 256 to
# 1024 columns, about twice as fast from 256 rows.
MIN_ROWS = 1024
MIN_ROWS_PREFERRED = 64


def onednn_preferred() -> bool:
    """Whether the C++ kernels send float32 CPU matmuls to oneDNN on this machine (asked on
    every call: ``RNNKERNELS_ONEDNN_MATMUL`` may change)."""
    return bool(torch.ops.rnnkernels.onednn_matmul_preferred())


def panel_preferred() -> bool:
    """Whether float32 CPU matmuls go through our packed panels on this machine (asked on every
    call: ``RNNKERNELS_PANEL_MATMUL`` may change); before oneDNN where both are."""
    return bool(torch.ops.rnnkernels.panel_matmul_preferred())


def min_rows() -> int:
    """Rows from which the input projection goes through the panels or oneDNN."""
    return MIN_ROWS_PREFERRED if onednn_preferred() and not panel_preferred() else MIN_ROWS


@functools.cache
def _onednn_matmul_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _panel_matmul(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.rnnkernels.matmul(a, b, bias)


def _project(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x W^T + b through the panels where preferred, else oneDNN."""
    if panel_preferred():
        return _panel_matmul(x, w.t(), b)
    return _onednn_linear(x, w, b)


@torch.library.register_fake("rnnkernels::mm_tn")
def _mm_tn_fake(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[1], b.shape[1]))


@torch.library.register_fake("rnnkernels::matmul")
def _matmul_fake(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


class _Linear(torch.autograd.Function):
    """x (M, K) @ w (N, K)^T + b through the panels or oneDNN; its backward as ``F.linear``'s."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return _project(x, w, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad = grad.contiguous()
        if torch.is_grad_enabled():  # create_graph: a backward that is differentiable itself
            dx = grad @ w if need_x else None
            dw = grad.t() @ x if need_w else None
        else:
            # grad w = grad (w^T)^T, w^T a view: oneDNN reads a transposed weight in place (a copy
            # cost more), the panels pack either layout
            dx = _project(grad, w.t(), None) if need_x else None
            # grad^T x: through the panels or oneDNN where preferred (oneDNN with x^T formed by
            # our tile transposes: it would copy it with a strided ATen copy), else MKL.
            dw = torch.ops.rnnkernels.mm_tn(grad, x) if need_w else None
        db = grad.sum(0) if need_b else None
        return dx, dw, db


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, torch.nn.Parameter)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)`` for x (..., K), w (N, K), b (N,); through the panels or oneDNN on
    the CPU where they can take the call (see the module's docstring)."""
    # plain_eager first: under tracing (torch.compile, torch.export) a test of the sizes would
    # become a guard on dynamic shapes.
    if (not plain_eager() or x.device.type != "cpu" or x.dtype != torch.float32
            or w.dtype != torch.float32 or (b is not None and b.dtype != torch.float32)
            or x.dim() < 2 or x.numel() == 0 or x.numel() < MIN_ROWS_PREFERRED * x.shape[-1]
            or not (_plain(x) and _plain(w) and _plain(b))
            or not (panel_preferred() or _onednn_matmul_available())
            or torch.is_autocast_enabled("cpu")
            or x.numel() < min_rows() * x.shape[-1]):
        return F.linear(x, w, b)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if needs_grad(x, w, b):
        out = _Linear.apply(rows, w.contiguous(), b)
    else:  # inference: no autograd.Function round trip (about 15 us a call)
        out = _project(rows, w.contiguous(), b)
    return out.view(*x.shape[:-1], w.shape[0])
