"""The cell options of the generic recurrence (peephole): the C++ CPU kernels against the
float64 references (forward and every gradient), the references against the formulas, the ops
(gradcheck, opcheck), the modules end to end, the Triton fallback and bad values."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import rnnkernels
from rnnkernels.ops import recurrence as R
from rnnkernels.reference import lstm_reference


def make(cell, T, B, I, H, dtype, proj=0, peephole=False):
    """Random layer inputs (leaves requiring grad) for one layer and direction."""
    G = R.NUM_GATES[cell]
    P = proj or H
    s = H ** -0.5

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return dict(x=t(T, B, I), h0=t(B, P, scale=0.5),
                c0=t(B, H, scale=0.5) if cell == R.LSTM else None,
                w_ih=t(G * H, I, scale=s), w_hh=t(G * H, P, scale=s), b_ih=t(G * H, scale=s),
                b_hh=t(G * H, scale=s), w_hr=t(P, H, scale=s) if proj else None,
                w_peep=t(3, H, scale=0.5) if peephole else None)


def run(a, cell, backend, lengths=None, reverse=False):
    options = R.CellOptions(w_peep=a["w_peep"])
    return R.run_layer(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                       a["w_hr"], lengths, cell, reverse, backend, options)


def check(cell, shape, dtype, lengths=None, reverse=False, proj=0, **opts):
    """Kernel (backend cpu, in dtype) against the float64 reference: outputs and the gradients
    of every input, with random output gradients."""
    a = make(cell, *shape, dtype, proj, **opts)
    ref_a = {k: v.detach().double().requires_grad_() if v is not None else None
             for k, v in a.items()}
    outs = [o for o in run(a, cell, "cpu", lengths, reverse) if o is not None]
    refs = [o for o in run(ref_a, cell, "reference", lengths, reverse) if o is not None]
    for name, o, r in zip(("y", "h_n", "c_n"), outs, refs):
        assert o.dtype == dtype
        assert_close(o, r, dtype, msg=f"{name}")
    grads_out = [torch.randn_like(r) for r in refs]
    leaves = [k for k, v in a.items() if v is not None]
    got = torch.autograd.grad(outs, [a[k] for k in leaves], [g.to(dtype) for g in grads_out])
    want = torch.autograd.grad(refs, [ref_a[k] for k in leaves], grads_out)
    for k, g, w in zip(leaves, got, want):
        assert_close(g, w, dtype, msg=f"grad {k}", scale=4 if dtype != torch.float64 else 1)


SHAPES = [(1, 1, 3, 5), (7, 3, 5, 17), (5, 2, 4, 8)]  # T, B, I, H


# ------------------------------------------------------------------ peephole

def test_peephole_reference_formula():
    """One step of the peephole reference written out: i, f see c0, o sees c1."""
    a = make(R.LSTM, 1, 3, 4, 5, torch.float64, peephole=True)
    y, h, c = lstm_reference(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                             a["b_hh"], w_peep=a["w_peep"])
    pre = F.linear(a["x"][0], a["w_ih"], a["b_ih"]) + F.linear(a["h0"], a["w_hh"], a["b_hh"])
    pi, pf, pg, po = pre.chunk(4, 1)
    wi, wf, wo = a["w_peep"]
    c1 = (torch.sigmoid(pf + wf * a["c0"]) * a["c0"]
          + torch.sigmoid(pi + wi * a["c0"]) * torch.tanh(pg))
    h1 = torch.sigmoid(po + wo * c1) * torch.tanh(c1)
    assert_close(c, c1, torch.float64)
    assert_close(h, h1, torch.float64)
    assert_close(y[0], h1, torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_peephole(shape, dtype):
    check(R.LSTM, shape, dtype, peephole=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_peephole_lengths_projection(reverse):
    check(R.LSTM, (6, 4, 3, 9), torch.float64, lengths=torch.tensor([3, 6, 1, 5]),
          reverse=reverse, peephole=True)
    check(R.LSTM, (5, 3, 4, 11), torch.float64, lengths=torch.tensor([2, 5, 4]), reverse=reverse,
          proj=6, peephole=True)


def test_peephole_bfloat16():
    check(R.LSTM, (6, 3, 5, 16), torch.bfloat16, peephole=True)


def _op_args(a, cell, lengths, reverse, save=True):
    gx = F.linear(a["x"], a["w_ih"], a["b_ih"]).detach().requires_grad_()
    return (gx, a["h0"], a["c0"], a["w_hh"], a["b_hh"], a["w_hr"], lengths, cell, reverse, save)


def test_peephole_gradcheck():
    a = make(R.LSTM, 3, 2, 3, 4, torch.float64, proj=3, peephole=True)
    for lengths, reverse in ((None, False), (torch.tensor([3, 2]), True)):
        base = _op_args(a, R.LSTM, lengths, reverse)

        def f(gx, h0, c0, w_hh, b_hh, w_hr, w_peep, base=base):
            return torch.ops.rnnkernels.recurrence_fwd(gx, h0, c0, w_hh, b_hh, w_hr, *base[6:],
                                                       w_peep)[:3]

        torch.autograd.gradcheck(f, (*base[:6], a["w_peep"]))


def test_peephole_opcheck():
    a = make(R.LSTM, 3, 2, 3, 5, torch.float32, peephole=True)
    for lengths in (None, torch.tensor([3, 1])):
        fwd = _op_args(a, R.LSTM, lengths, False) + (a["w_peep"],)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_fwd.default, fwd)
        y, h, c, hs, ws = torch.ops.rnnkernels.recurrence_fwd(*fwd)
        bwd = (torch.randn_like(y), torch.randn_like(h), torch.randn_like(c), a["c0"], a["w_hh"],
               None, lengths, hs, ws, R.LSTM, False, a["w_peep"])
        bwd = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in bwd)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_bwd.default, bwd)


def test_peephole_functional():
    a = make(R.LSTM, 4, 3, 5, 6, torch.float64, peephole=True)
    hx = (a["h0"], a["c0"])
    args = (a["x"], hx, a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    y, (h, c) = rnnkernels.ops.lstm(*args, w_peep=a["w_peep"], reverse=True)
    with rnnkernels.use_backend("reference"):
        ry, (rh, rc) = rnnkernels.ops.lstm(*args, w_peep=a["w_peep"], reverse=True)
    for o, r in ((y, ry), (h, rh), (c, rc)):
        assert_close(o, r, torch.float64)
    with pytest.raises(ValueError, match="w_peep"):
        rnnkernels.ops.lstm(*args, w_peep=a["w_peep"][:2])


# ------------------------------------------------------------------ modules

def _module_vs_reference(module, x, **kwargs):
    """The module on the CPU kernels and on the reference: outputs and parameter gradients."""
    out = module(x, **kwargs)
    y = out[0].data if isinstance(out[0], torch.nn.utils.rnn.PackedSequence) else out[0]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(module.parameters()), g)
    with rnnkernels.use_backend("reference"):
        rout = module(x, **kwargs)
    ry = rout[0].data if isinstance(rout[0], torch.nn.utils.rnn.PackedSequence) else rout[0]
    rgrads = torch.autograd.grad(ry, list(module.parameters()), g)
    assert_close(y, ry, torch.float64)
    for (name, _), a, b in zip(module.named_parameters(), grads, rgrads):
        assert_close(a, b, torch.float64, msg=name)


def test_lstm_module_peephole():
    m = rnnkernels.nn.LSTM(4, 6, num_layers=2, bidirectional=True, peephole=True,
                           dtype=torch.float64)
    keys = set(m.state_dict())
    plain = set(torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True).state_dict())
    assert keys - plain == {"weight_peephole_l0", "weight_peephole_l0_reverse",
                            "weight_peephole_l1", "weight_peephole_l1_reverse"}
    assert m.weight_peephole_l1.shape == (3, 6)
    assert "peephole=True" in repr(m)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    _module_vs_reference(m, x)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]),
                                                     enforce_sorted=False)
    _module_vs_reference(m, packed)


def test_module_options_off_are_torch():
    for m in (rnnkernels.nn.LSTM(3, 4, peephole=False), rnnkernels.nn.GRU(3, 4),
              rnnkernels.nn.RNN(3, 4)):
        assert "peephole" not in repr(m)
    assert (list(rnnkernels.nn.LSTM(3, 4, num_layers=2).state_dict())
            == list(torch.nn.LSTM(3, 4, num_layers=2).state_dict()))


def test_bad_option_values():
    with pytest.raises(ValueError, match="peephole"):
        rnnkernels.nn.LSTM(3, 4, peephole=1)


# ------------------------------------------------------------------ Triton / CUDA fallback

def test_triton_falls_back_to_reference(monkeypatch):
    """The Triton kernel has no cell options: with one, the layer runs the reference (same
    device) and warns once, naming the option."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if rnnkernels._backend._available("recurrence", torch.device("cpu"),
                                      torch.float32)["triton"] is not None:
        pytest.skip("the Triton interpreter cannot run here")
    m = rnnkernels.nn.LSTM(3, 5, peephole=True)
    x = torch.randn(4, 2, 3)
    with pytest.warns(UserWarning, match="peephole"), rnnkernels.use_backend("triton"):
        rnnkernels._backend._warned.clear()
        y, _ = m(x)
    with rnnkernels.use_backend("reference"):
        ry, _ = m(x)
    torch.testing.assert_close(y, ry, atol=0, rtol=0)
