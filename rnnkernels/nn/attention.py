"""Additive (Bahdanau) attention over a sequence of encoder states."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate


class BahdanauAttention(nn.Module):
    """Additive attention of Bahdanau, Cho & Bengio (2014), batch-first:

        e_tj = v^T tanh(W s_{t-1} + U h_j),   alpha_tj = softmax_j(e_tj),   c_t = sum_j alpha_tj h_j

    with the query s_{t-1} (the decoder's previous state), the keys h_j (the encoder's states,
    also the values) and padded source positions excluded from the softmax by ``mask``.
    ``U h_j`` does not depend on the decoder step: compute it once per source with
    :meth:`project_keys` and pass it as ``projected_keys`` to every step.

    forward(query (B, Q), keys (B, S, K), mask (B, S) bool or None, *, projected_keys (B, S, A)
    or None) -> (context (B, K), weights (B, S)).
    """

    def __init__(self, query_size: int, key_size: int, attention_size: int | None = None, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        attention_size = key_size if attention_size is None else attention_size
        for name, value in (("query_size", query_size), ("key_size", key_size),
                            ("attention_size", attention_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.query_size, self.key_size, self.attention_size = query_size, key_size, attention_size
        self.W = nn.Linear(query_size, attention_size, bias=False, **factory)
        self.U = nn.Linear(key_size, attention_size, bias=False, **factory)
        self.v = nn.Linear(attention_size, 1, bias=False, **factory)

    def extra_repr(self) -> str:
        return f"query_size={self.query_size}, key_size={self.key_size}, " \
               f"attention_size={self.attention_size}"

    def _check_keys(self, keys: object) -> Tensor:
        keys = _validate.tensor("keys", keys, shape=("B", "S", self.key_size), floating=True)
        _validate.nonempty("keys", keys, [(1, "source position")])
        w = self.U.weight
        if keys.dtype != w.dtype or keys.device != w.device:
            raise TypeError(f"keys must have the module's dtype {w.dtype} and device {w.device}, "
                            f"got {keys.dtype} on {keys.device}")
        return keys

    def project_keys(self, keys: Tensor) -> Tensor:
        """U h_j for every source position: keys (B, S, K) -> (B, S, attention_size)."""
        return self.U(self._check_keys(keys))

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor | None = None, *,
                projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """query (B, Q), keys (B, S, K), mask (B, S) bool with True at real (non-padded)
        positions -> context (B, K), attention weights (B, S) (zero at masked positions)."""
        keys = self._check_keys(keys)
        B, S, _ = keys.shape
        _validate.tensor("query", query, shape=(B, self.query_size), like=keys)
        if projected_keys is None:
            projected_keys = self.U(keys)
        else:
            _validate.tensor("projected_keys", projected_keys, shape=(B, S, self.attention_size),
                             like=keys)
        scores = self.v(torch.tanh(self.W(query).unsqueeze(1) + projected_keys)).squeeze(-1)
        if mask is not None:
            _validate.tensor("mask", mask, shape=(B, S), dtype=torch.bool)
            if mask.device != keys.device:
                raise ValueError(f"mask must be on device {keys.device} (the keys'), got "
                                 f"{mask.device}")
            if not bool(mask.any(dim=1).all()):
                raise ValueError("mask must leave at least one position of every row unmasked "
                                 "(True); a row with none has no attention distribution")
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        context = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return context, weights
