"""Reference of the selective scan (Mamba): plain PyTorch, one time step at a time.

The semantics are those of ``mamba_ssm``'s ``selective_scan_fn`` (real A only), plus an initial
state. Inputs of lower precision are computed in float32 and float64 inputs in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_channel(M: Tensor, dim: int) -> Tensor:
    """B or C as (batch, dim, N, L) or (dim, N): a grouped (batch, G, N, L) tensor has channel d
    reading group d // (dim // G); the variable (batch, N, L) form is one group."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    if M.dim() == 4:
        M = M.repeat_interleave(dim // M.shape[1], dim=1)
    return M


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False, *,
                             initial_state: Tensor | None = None
                             ) -> Tensor | tuple[Tensor, Tensor]:
    """x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t;  y_t = C_t . x_t + D u_t;  out = y silu(z).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N), (batch, N, L) or
    (batch, G, N, L); D, delta_bias: (dim,); initial_state: (batch, dim, N).
    delta becomes softplus(delta + delta_bias) with ``delta_softplus``. Returns out (batch, dim, L)
    in u's dtype, and with ``return_last_state`` also the last state (batch, dim, N) in the
    computation's dtype (float64 for float64 input, else float32).
    """
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    u_, delta_ = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(acc)[:, None]
    if delta_softplus:
        delta_ = F.softplus(delta_)
    A_, B_, C_ = A.to(acc), _per_channel(B.to(acc), dim), _per_channel(C.to(acc), dim)
    x = (initial_state.to(acc) if initial_state is not None
         else u_.new_zeros((batch, dim, A.shape[1])))
    ys = []
    for t in range(L):
        dt = delta_[:, :, t, None]
        B_t = B_ if B_.dim() == 2 else B_[..., t]
        C_t = C_ if C_.dim() == 2 else C_[..., t]
        x = torch.exp(dt * A_) * x + dt * B_t * u_[:, :, t, None]
        ys.append((x * C_t).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(u.dtype)
    return (out, x) if return_last_state else out
