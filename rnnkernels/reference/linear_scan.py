"""Reference of the first-order linear scan: plain PyTorch, one time step at a time."""

from __future__ import annotations

import torch
from torch import Tensor


def linear_scan_reference(a: Tensor, b: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t, h_{-1} = initial_state (zeros when None).

    a, b: (batch, channels, T); initial_state: (batch, channels). Returns h (batch, channels, T)
    in a's dtype, computed in float64 for float64 input and in float32 otherwise.
    """
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a_, b_ = a.to(acc), b.to(acc)
    h = initial_state.to(acc) if initial_state is not None else a_.new_zeros(a.shape[:2])
    hs = []
    for t in range(a.shape[2]):
        h = a_[:, :, t] * h + b_[:, :, t]
        hs.append(h)
    return torch.stack(hs, dim=2).to(a.dtype)
