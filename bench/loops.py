"""The naive baselines: what a user writes without fused kernels, one time step per iteration.

They double as the definition of correct for the scans: run in float64 (chunked over channels,
which are independent, so that the large GPU cases fit in memory) they give the expected results
every contender is checked against. The scan loops compute in float32 for low-precision inputs,
as mamba_ssm's own reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cell_loop(cell: nn.Module, x: Tensor, state: Tensor | tuple[Tensor, Tensor]
              ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """Run an ``nn.LSTMCell`` / ``GRUCell`` / ``RNNCell`` over x: (T, B, I), one step per call.

    Returns y: (T, B, H) and the final state (h or (h, c))."""
    ys = []
    for x_t in x.unbind(0):
        state = cell(x_t, state)
        ys.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(ys), state


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor | None = None, z: Tensor | None = None,
                        delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """mamba_ssm's selective scan, step by step (states of all steps materialised first).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) (variable, one group);
    D, delta_bias: (dim,). x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t; y_t = C_t . x_t;
    out = (y + D u) * silu(z). Returns out: (batch, dim, L) in u's dtype."""
    cdt = _compute_dtype(u.dtype)
    u_c, delta_c = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    dA = torch.exp(torch.einsum("bdl,dn->bldn", delta_c, A.to(cdt)))
    dBu = torch.einsum("bdl,bnl,bdl->bldn", delta_c, B.to(cdt), u_c)
    C_steps = C.to(cdt).unbind(2)
    x = u_c.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), C_steps):
        x = dA_t * x + dBu_t
        ys.append(torch.einsum("bdn,bn->bd", x, C_t))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u_c * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    return out.to(u.dtype)


def linear_scan_loop(a: Tensor, b: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t over a, b: (batch, channels, T); h_{-1} = initial_state
    (batch, channels) or zeros. Returns h: (batch, channels, T) in b's dtype."""
    cdt = _compute_dtype(b.dtype)
    h = (initial_state.to(cdt) if initial_state is not None
         else b.new_zeros(b.shape[:2], dtype=cdt))
    hs = []
    for a_t, b_t in zip(a.to(cdt).unbind(2), b.to(cdt).unbind(2)):
        h = a_t * h + b_t
        hs.append(h)
    return torch.stack(hs, dim=2).to(b.dtype)


def chunked_float64(fn: Callable[..., Tensor], inputs: Sequence[Tensor | None],
                    channel_dims: Sequence[int | None], grad_out: Tensor | None, chunk: int
                    ) -> list[Tensor]:
    """Float64 results of ``fn(*inputs)`` (output channels on dim 1) and, when ``grad_out`` is
    given, the gradients of every input, computed ``chunk`` channels at a time.

    ``channel_dims[i]`` is the dim of input i that indexes the channels, or None for an input
    shared by all channels (its gradient is summed over the chunks). Returns [out, *grads]
    (a grad is None where the input is None)."""
    channels = grad_out.shape[1] if grad_out is not None else next(
        t.shape[d] for t, d in zip(inputs, channel_dims) if t is not None and d is not None)
    outs: list[Tensor] = []
    grads: list[Tensor | None] = [None if t is None else torch.zeros_like(t, dtype=torch.float64)
                                  for t in inputs]
    for start in range(0, channels, chunk):
        stop = min(start + chunk, channels)
        leaves = []
        for t, d in zip(inputs, channel_dims):
            if t is None:
                leaves.append(None)
                continue
            part = t if d is None else t.narrow(d, start, stop - start)
            leaves.append(part.detach().to(torch.float64).requires_grad_(grad_out is not None))
        with torch.set_grad_enabled(grad_out is not None):
            out = fn(*leaves)
        outs.append(out.detach())
        if grad_out is None:
            continue
        live = [leaf for leaf in leaves if leaf is not None]
        parts = iter(torch.autograd.grad(out, live, grad_out[:, start:stop].to(torch.float64),
                                         allow_unused=True))
        for i, (leaf, d) in enumerate(zip(leaves, channel_dims)):
            if leaf is None:
                continue
            part = next(parts)
            if part is None:
                continue
            if d is None:
                grads[i] += part
            else:
                grads[i].narrow(d, start, stop - start).copy_(part)
    out = torch.cat(outs, dim=1)
    return [out] + (list(grads) if grad_out is not None else [])
