"""Triton kernels of the linear scan h_t = a_t * h_{t-1} + b_t over (batch, channels, T).

One program owns BLOCK_R rows (batch x channels flattened) and walks time in tiles of BLOCK_T
steps: a tile is loaded once (contiguous along T), scanned in registers with
``tl.associative_scan`` over the pairs (a, b), joined to the state carried in from the previous
tile, and stored once. The backward is the same scan in reverse over (a_{t+1}, grad_h_t). Memory
traffic is the minimum: a, b read and h written once; grad_h, a, h read and grad_a, grad_b
written once. The state is carried in float32.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .. import _validate
from . import launchable

BLOCK_R = 16
BLOCK_T = 64


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _linear_scan_fwd_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, rows, T, HAS_H0: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rows
    cols = tl.arange(0, BLOCK_T)
    if HAS_H0:
        carry = tl.load(h0_ptr + r, mask=r_mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        mask = r_mask[:, None] & (t < T)[None, :]
        offs = r[:, None].to(tl.int64) * T + t[None, :]  # rows * T may pass 2^31
        # Past T: a = 1, b = 0 keep the state, so the tile's last column is the carry.
        a = tl.load(a_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        prod, acc = tl.associative_scan((a, b), 1, _combine)
        h = prod * carry[:, None] + acc
        tl.store(h_ptr + offs, h, mask=mask)
        carry = tl.sum(tl.where(cols[None, :] == BLOCK_T - 1, h, 0.0), 1)


@triton.jit
def _linear_scan_bwd_kernel(gh_ptr, a_ptr, h_ptr, h0_ptr, ga_ptr, gb_ptr, gh0_ptr, rows, T,
                            HAS_H0: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rows
    cols = tl.arange(0, BLOCK_T)
    carry = tl.zeros((BLOCK_R,), dtype=tl.float32)  # dL/dh at the first step of the next tile
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(n_tiles):
        t = (n_tiles - 1 - i) * BLOCK_T + cols
        mask = r_mask[:, None] & (t < T)[None, :]
        offs = r[:, None].to(tl.int64) * T + t[None, :]  # rows * T may pass 2^31
        g = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a_next = tl.load(a_ptr + offs + 1, mask=r_mask[:, None] & (t + 1 < T)[None, :],
                         other=0.0).to(tl.float32)
        prod, acc = tl.associative_scan((a_next, g), 1, _combine, reverse=True)
        dh = acc + prod * carry[:, None]
        h_prev = tl.load(h_ptr + offs - 1, mask=mask & (t > 0)[None, :], other=0.0)
        if HAS_H0:
            h0 = tl.load(h0_ptr + r, mask=r_mask, other=0.0)
            h_prev = tl.where((t == 0)[None, :], h0[:, None], h_prev)
        tl.store(gb_ptr + offs, dh, mask=mask)
        tl.store(ga_ptr + offs, dh * h_prev.to(tl.float32), mask=mask)
        carry = tl.sum(tl.where(cols[None, :] == 0, dh, 0.0), 1)
    if HAS_H0:
        a0 = tl.load(a_ptr + r.to(tl.int64) * T, mask=r_mask, other=0.0).to(tl.float32)
        tl.store(gh0_ptr + r, a0 * carry, mask=r_mask)


@triton_op("rnnkernels::linear_scan_fwd_triton", mutates_args=())
def linear_scan_fwd_triton(a: Tensor, b: Tensor, initial_state: Tensor | None) -> Tensor:
    """h (batch, channels, T) from a, b (batch, channels, T) and h0 (batch, channels)."""
    _validate.linear_scan_op("linear_scan_fwd_triton", a, {"b": b}, initial_state)
    a, b = a.contiguous(), b.contiguous()
    h = torch.empty_like(a)
    rows, steps = a.shape[0] * a.shape[1], a.shape[2]
    has_h0 = initial_state is not None
    h0 = initial_state.contiguous() if has_h0 else a
    launchable(_linear_scan_fwd_kernel)[(triton.cdiv(rows, BLOCK_R),)](
        a, b, h0, h, rows, steps, HAS_H0=has_h0, BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T)
    return h


@triton_op("rnnkernels::linear_scan_bwd_triton", mutates_args=())
def linear_scan_bwd_triton(grad_h: Tensor, a: Tensor, h: Tensor, initial_state: Tensor | None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_b, grad_initial_state); the last is empty (0,) without an initial state."""
    _validate.linear_scan_op("linear_scan_bwd_triton", a, {"grad_h": grad_h, "h": h},
                             initial_state)
    grad_h, a, h = grad_h.contiguous(), a.contiguous(), h.contiguous()
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(a)
    rows, steps = a.shape[0] * a.shape[1], a.shape[2]
    has_h0 = initial_state is not None
    h0 = initial_state.contiguous() if has_h0 else a
    grad_h0 = torch.empty_like(h0) if has_h0 else a.new_empty((0,))
    launchable(_linear_scan_bwd_kernel)[(triton.cdiv(rows, BLOCK_R),)](
        grad_h, a, h, h0, grad_a, grad_b, grad_h0 if has_h0 else a, rows, steps, HAS_H0=has_h0,
        BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T)
    return grad_a, grad_b, grad_h0
