"""BahdanauAttention against the formula written out position by position, and its masking."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from rnnkernels.nn import BahdanauAttention


@torch.no_grad()
def formula(att: BahdanauAttention, s: torch.Tensor, h: torch.Tensor,
            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """e_tj = v^T tanh(W s + U h_j), softmax over the unmasked j, c = sum_j alpha_j h_j."""
    W, U, v = att.W.weight, att.U.weight, att.v.weight[0]
    B, S, _ = h.shape
    context = torch.zeros(B, h.shape[2], dtype=h.dtype)
    weights = torch.zeros(B, S, dtype=h.dtype)
    for b in range(B):
        valid = [j for j in range(S) if mask is None or bool(mask[b, j])]
        e = {j: float(v @ torch.tanh(W @ s[b] + U @ h[b, j])) for j in valid}
        top = max(e.values())
        z = sum(math.exp(x - top) for x in e.values())
        for j in valid:
            weights[b, j] = math.exp(e[j] - top) / z
            context[b] += weights[b, j] * h[b, j]
    return context, weights


def setup(B=3, S=7, Q=5, K=6, A=4):
    att = BahdanauAttention(Q, K, A, dtype=torch.float64)
    s = torch.randn(B, Q, dtype=torch.float64)
    h = torch.randn(B, S, K, dtype=torch.float64)
    lengths = torch.tensor([S, 1, S - 2][:B])
    mask = torch.arange(S) < lengths.unsqueeze(1)
    return att, s, h, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B, S", [(1, 1), (3, 7), (2, 13)])
def test_matches_formula(masked, B, S):
    att, s, h, mask = setup(B=B, S=S)
    mask = mask if masked else None
    context, weights = att(s, h, mask)
    ref_c, ref_w = formula(att, s, h, mask)
    assert_close(weights, ref_w)
    assert_close(context, ref_c)


def test_empty_batch():
    """B = 0, as torch's layers take it: an empty context and empty weights."""
    att, s, h, mask = setup(B=0)
    for m in (mask, None):
        context, weights = att(s, h, m)
        assert context.shape == (0, 6) and weights.shape == (0, 7)


def test_mask_ignores_padding():
    att, s, h, mask = setup()
    context, weights = att(s, h, mask)
    assert bool((weights[~mask] == 0).all())
    assert_close(weights.sum(1), torch.ones(3, dtype=torch.float64))
    garbage = h.clone()
    garbage[~mask] = 1e3 * torch.randn_like(garbage[~mask])
    context2, _ = att(s, garbage, mask)
    assert_close(context2, context)
    # Row 1 has one valid position: all its attention goes there.
    assert_close(context[1], h[1, 0])


def test_projected_keys_and_non_contiguous_inputs():
    att, s, h, mask = setup()
    expected = att(s, h, mask)
    h_nc = h.transpose(0, 1).contiguous().transpose(0, 1)
    s_nc = s.t().contiguous().t()
    assert not h_nc.is_contiguous() and not s_nc.is_contiguous()
    got = att(s_nc, h_nc, mask, projected_keys=att.project_keys(h_nc))
    for a, b in zip(got, expected):
        assert_close(a, b)


def test_gradcheck():
    att, s, h, mask = setup(B=2, S=4, Q=3, K=3, A=2)
    mask = mask[:2]
    s.requires_grad_()
    h.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, h, *p: att(s, h, mask), (s, h, *att.parameters()))


@pytest.mark.parametrize("bad, exc, match", [
    (lambda a, s, h, m: a(s, h[0], m), ValueError, "keys must have 3 dimensions"),
    (lambda a, s, h, m: a(s, h[..., :2], m), ValueError, "keys must have shape"),
    (lambda a, s, h, m: a(s[:2], h, m), ValueError, "query must have shape"),
    (lambda a, s, h, m: a(s.float(), h, m), TypeError, "query must have dtype"),
    (lambda a, s, h, m: a(s, h.float(), m), TypeError, "keys must have the module's dtype"),
    (lambda a, s, h, m: a(s, h, m.long()), TypeError, "mask must have dtype torch.bool"),
    (lambda a, s, h, m: a(s, h, m[:, :3]), ValueError, "mask must have shape"),
    (lambda a, s, h, m: a(s, h, torch.zeros_like(m)), ValueError, "at least one position"),
    (lambda a, s, h, m: a(s, h[:, :0], m[:, :0]), ValueError, "source position"),
    (lambda a, s, h, m: a(s, h, m, projected_keys=h), ValueError, "projected_keys"),
    (lambda a, s, h, m: BahdanauAttention(0, 3), ValueError, "query_size"),
])
def test_bad_input(bad, exc, match):
    att, s, h, mask = setup()
    with pytest.raises(exc, match=match):
        bad(att, s, h, mask)
