"""A padded batch (lengths below T) on the CPU kernels projects only the (step, row) pairs within
their row's length (rnnkernels.ops.recurrence.padded_steps): outputs, final states and every
gradient, first and second order, against the float64 reference layer, and the projection's
matmul on exactly those rows."""

import pytest
import torch
from conftest import assert_close

from rnnkernels.ops import recurrence as R

T, B, I, H = 6, 5, 7, 9
LENGTHS = torch.tensor([6, 2, 4, 1, 3])  # 16 of the 30 (step, row) pairs
CELLS = [R.LSTM, R.GRU, R.GRU_RESET_BEFORE, R.RNN_TANH]


def layer_args(cell, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = R.NUM_GATES[cell]

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype) \
            .requires_grad_()

    return dict(x=t(T, B, I), h0=t(B, H, s=0.5), c0=t(B, H, s=0.5) if cell == R.LSTM else None,
                w_ih=t(G * H, I, s=H ** -0.5), w_hh=t(G * H, H, s=H ** -0.5),
                b_ih=t(G * H, s=0.3), b_hh=t(G * H, s=0.3))


def run(a, cell, reverse, backend):
    args = (a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None, LENGTHS,
            cell, reverse)
    if backend == "reference":
        return R.reference_layer(*args)
    return R.run_layer(*args, backend)


def test_selection():
    x = torch.zeros(T, B, I)
    assert R.padded_steps(x, None, "cpu") is None
    assert R.padded_steps(x, torch.full((B,), T), "cpu") is None
    assert R.padded_steps(x, LENGTHS, "reference") is None
    share = R.PADDED_STEPS_MAX_SHARE
    nearly_full = torch.full((B,), T)
    nearly_full[0] = T - 1  # 29 of 30
    assert 29 >= share * T * B and R.padded_steps(x, nearly_full, "cpu") is None
    within, past = R.padded_steps(x, LENGTHS, "cpu")
    mask = (torch.arange(T).unsqueeze(1) < LENGTHS).flatten()
    assert torch.equal(within, mask.nonzero().squeeze(1))
    assert torch.equal(past, (~mask).nonzero().squeeze(1))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(cell, reverse, dtype, monkeypatch):
    rows = []
    real = R.linear

    def counted(x, w, b=None):
        rows.append(x.numel() // x.shape[-1])
        return real(x, w, b)

    monkeypatch.setattr(R, "linear", counted)
    ours = layer_args(cell, dtype)
    ref = {k: v.detach().double().requires_grad_() if v is not None else None
           for k, v in ours.items()}
    out, expected = run(ours, cell, reverse, "cpu"), run(ref, cell, reverse, "reference")
    assert rows[0] == int(LENGTHS.sum()), "the projection ran on the padding"
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in expected
             if o is not None]
    leaves = [k for k, v in ours.items() if v is not None]
    got = torch.autograd.grad([o for o in out if o is not None], [ours[k] for k in leaves],
                              [gr.to(dtype) for gr in grads])
    want = torch.autograd.grad([o for o in expected if o is not None], [ref[k] for k in leaves],
                               grads)
    for o, e in zip(out, expected):
        if e is not None:
            assert_close(o, e, dtype)
    for name, a, e in zip(leaves, got, want):
        assert_close(a, e, dtype, msg=f"gradient of {name}")


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU])
def test_second_order(cell):
    ours = layer_args(cell, torch.float64, seed=2)
    ref = {k: v.detach().clone().requires_grad_() if v is not None else None
           for k, v in ours.items()}

    def grad_norm(a, backend):
        y, h, _ = run(a, cell, False, backend)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + h.sum()
        gx, gw = torch.autograd.grad(loss, [a["x"], a["w_ih"]], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(),
                                   [a["w_ih"], a["w_hh"], a["x"]])

    for a, e in zip(grad_norm(ours, "cpu"), grad_norm(ref, "reference")):
        assert_close(a, e, torch.float64)
