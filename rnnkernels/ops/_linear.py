"""x W^T + b for the recurrences' input projection, through oneDNN's matmul on the CPU.

On a float32 CPU tensor, ``F.linear`` and ``torch.mm`` call MKL's sgemm, which on AMD CPUs runs
its AVX2 kernels; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's
CPU backend calls for linear layers) runs AVX-512 there. The input projection (T*B rows times
G*H columns) and its input gradient are the largest matmuls of a recurrent layer's step, so they
go through oneDNN when it can take them and have at least MIN_ROWS rows (below that oneDNN
measured slower: its per-call cost outweighs its faster inner loop); the weight gradient, whose
reduction runs over all T*B rows, stays with MKL, which measured faster on it than oneDNN with
its transposed operands.

Only plain eager float32 on the CPU takes this path: under torch.compile, a torch.func
transform, forward-mode AD, autocast or a tensor subclass, ``F.linear`` runs as before. A
second-order gradient (``create_graph=True``) differentiates the backward's plain matmuls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import plain_eager

# Rows (T * B for a recurrence) from which oneDNN's matmul measured faster than MKL's on this
# project's CPU machine (AVX-512 AMD EPYC): at 1024 rows (B = 8, T = 128) the two were even.
MIN_ROWS = 1024


@functools.cache
def _onednn_matmul_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _Linear(torch.autograd.Function):
    """x (M, K) @ w (N, K)^T + b through oneDNN; its backward as ``F.linear``'s."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return _onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad = grad.contiguous()
        if torch.is_grad_enabled():  # create_graph: a backward that is differentiable itself
            dx = grad @ w if need_x else None
        else:
            dx = _onednn_linear(grad, w.t().contiguous(), None) if need_x else None
        dw = grad.t() @ x if need_w else None
        db = grad.sum(0) if need_b else None
        return dx, dw, db


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, torch.nn.Parameter)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)`` for x (..., K), w (N, K), b (N,); through oneDNN on the CPU where
    it can take the call (see the module's docstring)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
            or (b is not None and b.dtype != torch.float32) or x.dim() < 2 or x.numel() == 0
            or x.numel() < MIN_ROWS * x.shape[-1]
            or not (_plain(x) and _plain(w) and _plain(b))
            or not _onednn_matmul_available() or not plain_eager()
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, w, b)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = _Linear.apply(rows, w.contiguous(), b)
    return out.view(*x.shape[:-1], w.shape[0])
