"""The cell options of the generic recurrence (peephole, zoneout, recurrent dropout, layer norm):
the C++ CPU kernels against the float64 references (forward and every gradient), the references
against the formulas, the ops (gradcheck, opcheck), the modules end to end, the Triton fallback
and bad values."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import rnnkernels
from rnnkernels.ops import recurrence as R
from rnnkernels.reference import gru_reference, lstm_reference, rnn_reference

CELLS = [R.LSTM, R.GRU, R.GRU_RESET_BEFORE, R.RNN_TANH, R.RNN_RELU]


def make(cell, T, B, I, H, dtype, proj=0, peephole=False, layer_norm=False):
    """Random layer inputs (leaves requiring grad) for one layer and direction."""
    G = R.NUM_GATES[cell]
    P = proj or H
    s = H ** -0.5

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    def gain(n):  # layer-norm gains around 1
        return (1 + 0.3 * torch.randn(n, dtype=torch.float64)).to(dtype).requires_grad_()

    lstm_ln = layer_norm and cell == R.LSTM
    return dict(x=t(T, B, I), h0=t(B, P, scale=0.5),
                c0=t(B, H, scale=0.5) if cell == R.LSTM else None,
                w_ih=t(G * H, I, scale=s), w_hh=t(G * H, P, scale=s), b_ih=t(G * H, scale=s),
                b_hh=t(G * H, scale=s), w_hr=t(P, H, scale=s) if proj else None,
                w_peep=t(3, H, scale=0.5) if peephole else None,
                ln_weight_ih=gain(G * H) if layer_norm else None,
                ln_weight_hh=gain(G * H) if layer_norm else None,
                ln_weight_c=gain(H) if lstm_ln else None,
                ln_bias_c=t(H, scale=0.3) if lstm_ln else None)


LN_KEYS = ("ln_weight_ih", "ln_weight_hh", "ln_weight_c", "ln_bias_c")


def run(a, cell, backend, lengths=None, reverse=False, zoneout=0.0, recurrent_dropout=0.0,
        training=False, seed=0):
    options = R.CellOptions(w_peep=a["w_peep"], zoneout=zoneout,
                            recurrent_dropout=recurrent_dropout, training=training,
                            **{k: a[k] for k in LN_KEYS})
    torch.manual_seed(seed)  # the same random masks on both backends
    return R.run_layer(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                       a["w_hr"], lengths, cell, reverse, backend, options)


def check(cell, shape, dtype, lengths=None, reverse=False, proj=0, peephole=False,
          layer_norm=False, **opts):
    """Kernel (backend cpu, in dtype) against the float64 reference: outputs and the gradients
    of every input, with random output gradients. opts: zoneout, recurrent_dropout, training."""
    a = make(cell, *shape, dtype, proj, peephole, layer_norm)
    ref_a = {k: v.detach().double().requires_grad_() if v is not None else None
             for k, v in a.items()}
    outs = [o for o in run(a, cell, "cpu", lengths, reverse, **opts) if o is not None]
    refs = [o for o in run(ref_a, cell, "reference", lengths, reverse, **opts) if o is not None]
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
    """The first ten arguments of recurrence_fwd (gx a leaf)."""
    gx = F.linear(a["x"], a["w_ih"], a["b_ih"]).detach().requires_grad_()
    return (gx, a["h0"], a["c0"], a["w_hh"], a["b_hh"], a["w_hr"], lengths, cell, reverse, save)


def _opcheck_fwd_bwd(a, cell, lengths, reverse, options):
    """opcheck of recurrence_fwd with the cell-option arguments ``options``, then of
    recurrence_bwd on its results with the same options."""
    fwd = _op_args(a, cell, lengths, reverse) + options
    torch.library.opcheck(torch.ops.rnnkernels.recurrence_fwd.default, fwd)
    y, h, c, hs, ws = torch.ops.rnnkernels.recurrence_fwd(*fwd)
    bwd = (torch.randn_like(y), torch.randn_like(h),
           torch.randn_like(c) if cell == R.LSTM else None, a["c0"], a["w_hh"], None, lengths,
           hs, ws, cell, reverse) + options
    bwd = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in bwd)
    torch.library.opcheck(torch.ops.rnnkernels.recurrence_bwd.default, bwd)


def _assert_draws_follow_seed(run):
    """run() (a training call drawing masks) repeats under the same seed and differs without."""
    torch.manual_seed(1)
    y1 = run()
    torch.manual_seed(1)
    y2 = run()
    y3 = run()
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    assert not torch.equal(y1, y3)


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
    _opcheck_fwd_bwd(a, R.LSTM, torch.tensor([3, 1]), False, (a["w_peep"],))


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


# ------------------------------------------------------------------ zoneout

def test_zoneout_reference_formula():
    """One step: each unit is d * previous + (1 - d) * the cell's new value."""
    for cell in (R.LSTM, R.GRU, R.RNN_TANH):
        a = make(cell, 1, 3, 4, 6, torch.float64)
        d = (torch.rand(1, 3, 6) < 0.5).double()
        dc = (torch.rand(1, 3, 6) < 0.5).double()
        if cell == R.LSTM:
            args = (a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
            _, h, c = lstm_reference(*args)
            _, hz, cz = lstm_reference(*args, zoneout_mask=d, zoneout_mask_c=dc)
            assert_close(cz, dc[0] * a["c0"] + (1 - dc[0]) * c, torch.float64)
            _, he, _ = lstm_reference(*args, zoneout=0.25)
        else:
            ref = gru_reference if cell == R.GRU else rnn_reference
            args = (a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
            _, h = ref(*args)
            _, hz = ref(*args, zoneout_mask=d)
            _, he = ref(*args, zoneout=0.25)
        assert_close(hz, d[0] * a["h0"] + (1 - d[0]) * h, torch.float64)
        assert_close(he, 0.25 * a["h0"] + 0.75 * h, torch.float64)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("training", [False, True])
def test_zoneout(cell, training):
    check(cell, SHAPES[0], torch.float64, zoneout=0.3, training=training)
    check(cell, SHAPES[1], torch.float32, zoneout=0.3, training=training)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_zoneout_lengths(cell, reverse):
    check(cell, (6, 4, 3, 9), torch.float64, lengths=torch.tensor([3, 6, 1, 5]), reverse=reverse,
          zoneout=0.4, training=True)


@pytest.mark.parametrize("training", [False, True])
def test_zoneout_projection_peephole(training):
    lengths = torch.tensor([2, 5, 4])
    check(R.LSTM, (5, 3, 4, 11), torch.float64, lengths=lengths, proj=6, zoneout=0.3,
          training=training)
    check(R.LSTM, (5, 3, 4, 11), torch.float64, lengths=lengths, reverse=True, peephole=True,
          zoneout=0.3, training=training)
    check(R.LSTM, (5, 3, 4, 11), torch.float32, proj=6, peephole=True, zoneout=0.3,
          training=training)


def test_zoneout_bfloat16():
    check(R.LSTM, (6, 3, 5, 16), torch.bfloat16, zoneout=0.3, training=True)


def _zoneout_args(cell, T, B, P, H, draws):
    """zoneout_mask, zoneout_mask_c, zoneout of the op: draws, or the evaluation probability."""
    if not draws:
        return (None, None, 0.3)
    mask = (torch.rand(T, B, P) < 0.3).double()
    return (mask, (torch.rand(T, B, H) < 0.3).double() if cell == R.LSTM else None, 0.3)


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU, R.GRU_RESET_BEFORE, R.RNN_RELU])
def test_zoneout_gradcheck(cell):
    proj = 3 if cell == R.LSTM else 0
    a = make(cell, 3, 2, 3, 4, torch.float64, proj=proj, peephole=cell == R.LSTM)
    for draws, lengths, reverse in ((True, None, False), (False, torch.tensor([3, 2]), True)):
        base = _op_args(a, cell, lengths, reverse)
        zo = _zoneout_args(cell, 3, 2, proj or 4, 4, draws)

        def f(gx, h0, c0, w_hh, b_hh, w_hr, w_peep, base=base, zo=zo):
            out = torch.ops.rnnkernels.recurrence_fwd(gx, h0, c0, w_hh, b_hh, w_hr, *base[6:],
                                                      w_peep, *zo)
            return out[:3] if cell == R.LSTM else out[:2]

        torch.autograd.gradcheck(f, (*base[:6], a["w_peep"]))


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU])
def test_zoneout_opcheck(cell):
    a = make(cell, 3, 2, 3, 5, torch.float32)
    zo = tuple(t.float() if isinstance(t, torch.Tensor) else t
               for t in _zoneout_args(cell, 3, 2, 5, 5, True))
    _opcheck_fwd_bwd(a, cell, torch.tensor([3, 1]), False, (None,) + zo)


def test_zoneout_functional_seed():
    """Training draws follow torch.manual_seed; evaluation is deterministic."""
    a = make(R.GRU, 5, 3, 4, 6, torch.float32)
    args = (a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    _assert_draws_follow_seed(lambda: rnnkernels.ops.gru(*args, zoneout=0.5)[0])
    e1, _ = rnnkernels.ops.gru(*args, zoneout=0.5, training=False)
    e2, _ = rnnkernels.ops.gru(*args, zoneout=0.5, training=False)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    with pytest.raises(ValueError, match="zoneout"):
        rnnkernels.ops.gru(*args, zoneout=1.0)


# ------------------------------------------------------------------ recurrent dropout

def test_recurrent_dropout_reference_formula():
    """One step: every recurrent matmul sees h0 * mask; the GRU's z * h0 sees h0 itself."""
    a = make(R.GRU, 1, 3, 4, 6, torch.float64)
    m = (torch.rand(3, 6) > 0.4).double() / 0.6
    for reset_after in (True, False):
        _, h = gru_reference(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                             reset_after, recurrent_dropout_mask=m)
        xr, xz, xn = F.linear(a["x"][0], a["w_ih"], a["b_ih"]).chunk(3, 1)
        hd = a["h0"] * m
        hr, hz, hn = F.linear(hd, a["w_hh"], a["b_hh"]).chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        w_n, b_n = a["w_hh"][12:], a["b_hh"][12:]
        n = torch.tanh(xn + (r * hn if reset_after else F.linear(r * hd, w_n, b_n)))
        assert_close(h, (1 - z) * n + z * a["h0"], torch.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_dropout(cell):
    check(cell, SHAPES[0], torch.float64, recurrent_dropout=0.3, training=True)
    check(cell, SHAPES[1], torch.float32, recurrent_dropout=0.3, training=True)
    check(cell, (6, 4, 3, 9), torch.float64, lengths=torch.tensor([3, 6, 1, 5]), reverse=True,
          recurrent_dropout=0.5, training=True)


def test_all_options_together():
    """Peephole, zoneout and recurrent dropout at once, with a projection and lengths."""
    for reverse in (False, True):
        check(R.LSTM, (5, 3, 4, 11), torch.float64, lengths=torch.tensor([2, 5, 4]),
              reverse=reverse, proj=6, peephole=True, zoneout=0.2, recurrent_dropout=0.3,
              training=True)
    check(R.GRU_RESET_BEFORE, (5, 3, 4, 7), torch.float32, zoneout=0.2, recurrent_dropout=0.3,
          training=True)


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU, R.GRU_RESET_BEFORE, R.RNN_TANH])
def test_recurrent_dropout_gradcheck(cell):
    proj = 3 if cell == R.LSTM else 0
    a = make(cell, 3, 2, 3, 4, torch.float64, proj=proj)
    mask = (torch.rand(2, proj or 4) > 0.3).double() / 0.7
    for lengths, reverse in ((None, False), (torch.tensor([3, 2]), True)):
        base = _op_args(a, cell, lengths, reverse)

        def f(gx, h0, c0, w_hh, b_hh, w_hr, base=base):
            out = torch.ops.rnnkernels.recurrence_fwd(gx, h0, c0, w_hh, b_hh, w_hr, *base[6:],
                                                      None, None, None, 0.0, mask)
            return out[:3] if cell == R.LSTM else out[:2]

        torch.autograd.gradcheck(f, base[:6])


def test_recurrent_dropout_opcheck():
    a = make(R.GRU_RESET_BEFORE, 3, 2, 3, 5, torch.float32)
    mask = (torch.rand(2, 5) > 0.3).float() / 0.7
    _opcheck_fwd_bwd(a, R.GRU_RESET_BEFORE, torch.tensor([3, 1]), True,
                     (None, None, None, 0.0, mask))


def test_recurrent_dropout_functional_seed_and_eval():
    """Training draws follow torch.manual_seed; outside training the layer is the plain one."""
    a = make(R.LSTM, 5, 3, 4, 6, torch.float32)
    args = (a["x"], (a["h0"], a["c0"]), a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    _assert_draws_follow_seed(lambda: rnnkernels.ops.lstm(*args, recurrent_dropout=0.5)[0])
    e, _ = rnnkernels.ops.lstm(*args, recurrent_dropout=0.5, training=False)
    plain, _ = rnnkernels.ops.lstm(*args)
    torch.testing.assert_close(e, plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        rnnkernels.ops.lstm(*args, recurrent_dropout=-0.5)


# ------------------------------------------------------------------ layer norm

def _ln(v, gain, bias=None):
    mean = v.mean(-1, keepdim=True)
    var = v.var(-1, unbiased=False, keepdim=True)
    out = (v - mean) / torch.sqrt(var + 1e-5) * gain
    return out if bias is None else out + bias


def test_layer_norm_reference_formula():
    """One step of both layer-normalised cells written out with explicit means and variances."""
    a = make(R.LSTM, 1, 3, 4, 5, torch.float64, layer_norm=True)
    _, h, c = lstm_reference(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                             a["b_hh"], **{k: a[k] for k in LN_KEYS})
    pre = (_ln(a["x"][0] @ a["w_ih"].t(), a["ln_weight_ih"]) + a["b_ih"]
           + _ln(a["h0"] @ a["w_hh"].t(), a["ln_weight_hh"]) + a["b_hh"])
    i, f, g, o = pre.chunk(4, 1)
    c1 = torch.sigmoid(f) * a["c0"] + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(_ln(c1, a["ln_weight_c"], a["ln_bias_c"]))
    assert_close(c, c1, torch.float64)
    assert_close(h, h1, torch.float64)

    a = make(R.GRU, 1, 3, 4, 5, torch.float64, layer_norm=True)
    _, h = gru_reference(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                         ln_weight_ih=a["ln_weight_ih"], ln_weight_hh=a["ln_weight_hh"])
    xr, xz, xn = (_ln(a["x"][0] @ a["w_ih"].t(), a["ln_weight_ih"]) + a["b_ih"]).chunk(3, 1)
    hr, hz, hn = (_ln(a["h0"] @ a["w_hh"].t(), a["ln_weight_hh"]) + a["b_hh"]).chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    assert_close(h, (1 - z) * n + z * a["h0"], torch.float64)


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU])
def test_layer_norm(cell):
    check(cell, SHAPES[0], torch.float64, layer_norm=True)
    check(cell, SHAPES[1], torch.float32, layer_norm=True)
    check(cell, (6, 4, 3, 9), torch.float64, lengths=torch.tensor([3, 6, 1, 5]), reverse=True,
          layer_norm=True)
    check(cell, (6, 3, 5, 16), torch.bfloat16, layer_norm=True)


def test_layer_norm_with_every_option():
    for reverse in (False, True):
        check(R.LSTM, (5, 3, 4, 11), torch.float64, lengths=torch.tensor([2, 5, 4]),
              reverse=reverse, proj=6, peephole=True, layer_norm=True, zoneout=0.2,
              recurrent_dropout=0.3, training=True)
    check(R.GRU, (5, 3, 4, 7), torch.float32, layer_norm=True, zoneout=0.2,
          recurrent_dropout=0.3, training=True)


def _ln_args(a):
    return tuple(a[k] for k in ("ln_weight_hh", "ln_weight_c", "ln_bias_c"))


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU])
def test_layer_norm_gradcheck(cell):
    proj = 3 if cell == R.LSTM else 0
    a = make(cell, 3, 2, 3, 4, torch.float64, proj=proj, peephole=cell == R.LSTM,
             layer_norm=True)
    for lengths, reverse in ((None, False), (torch.tensor([3, 2]), True)):
        base = _op_args(a, cell, lengths, reverse)
        params = [t for t in (a["w_peep"], *_ln_args(a)) if t is not None]

        def f(gx, h0, c0, w_hh, b_hh, w_hr, *p, base=base):
            peep, ln = (p[0], p[1:]) if cell == R.LSTM else (None, (p[0], None, None))
            out = torch.ops.rnnkernels.recurrence_fwd(gx, h0, c0, w_hh, b_hh, w_hr, *base[6:],
                                                      peep, None, None, 0.3, None, *ln)
            return out[:3] if cell == R.LSTM else out[:2]

        torch.autograd.gradcheck(f, (*base[:6], *params))


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU])
def test_layer_norm_opcheck(cell):
    a = make(cell, 3, 2, 3, 5, torch.float32, layer_norm=True)
    _opcheck_fwd_bwd(a, cell, torch.tensor([3, 1]), False,
                     (None, None, None, 0.0, None) + _ln_args(a))


def test_layer_norm_functional_checks():
    a = make(R.GRU, 4, 2, 3, 5, torch.float64, layer_norm=True)
    args = (a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    y, _ = rnnkernels.ops.gru(*args, ln_weight_ih=a["ln_weight_ih"],
                              ln_weight_hh=a["ln_weight_hh"])
    ry, _ = gru_reference(*args, ln_weight_ih=a["ln_weight_ih"], ln_weight_hh=a["ln_weight_hh"])
    assert_close(y, ry, torch.float64)
    with pytest.raises(ValueError, match="together"):
        rnnkernels.ops.gru(*args, ln_weight_hh=a["ln_weight_hh"])
    with pytest.raises(ValueError, match="reset_after"):
        rnnkernels.ops.gru(*args, reset_after=False, ln_weight_ih=a["ln_weight_ih"],
                           ln_weight_hh=a["ln_weight_hh"])
    with pytest.raises(ValueError, match="ln_weight_hh"):
        rnnkernels.ops.gru(*args, ln_weight_ih=a["ln_weight_ih"],
                           ln_weight_hh=a["ln_weight_hh"][:-1])


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_layer_norm(mode):
    kw = {"proj_size": 2, "peephole": True} if mode == "LSTM" else {}
    m = getattr(rnnkernels.nn, mode)(4, 5, num_layers=2, bidirectional=True, layer_norm=True,
                                     zoneout=0.1, dtype=torch.float64, **kw)
    assert "layer_norm=True" in repr(m)
    G = 4 if mode == "LSTM" else 3
    assert torch.equal(m.layer_norm_weight_hh_l1_reverse, torch.ones(G * 5, dtype=torch.float64))
    extra = {f"layer_norm_weight_{k}_l{layer}{suffix}" for k in ("ih", "hh")
             for layer in (0, 1) for suffix in ("", "_reverse")}
    if mode == "LSTM":
        assert torch.equal(m.layer_norm_bias_c_l0, torch.zeros(5, dtype=torch.float64))
        extra |= {f"layer_norm_{k}_c_l{layer}{suffix}" for k in ("weight", "bias")
                  for layer in (0, 1) for suffix in ("", "_reverse")}
        extra |= {f"weight_peephole_l{layer}{suffix}" for layer in (0, 1)
                  for suffix in ("", "_reverse")}
    plain = set(getattr(torch.nn, mode)(4, 5, 2, bidirectional=True,
                                        proj_size=kw.get("proj_size", 0)).state_dict()
                ) if mode == "LSTM" else set(torch.nn.GRU(4, 5, 2, bidirectional=True).state_dict())
    assert set(m.state_dict()) - plain == extra
    with torch.no_grad():  # away from the initial values, so that every gradient is exercised
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    _packed_vs_reference_in_both_modes(m, x)


# ------------------------------------------------------------------ modules

def _module_vs_reference(module, x, seed=0):
    """The module on the CPU kernels and on the reference (same random draws): outputs and
    parameter gradients."""
    def output():
        torch.manual_seed(seed)
        out = module(x)[0]
        return out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out

    y = output()
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(module.parameters()), g)
    with rnnkernels.use_backend("reference"):
        ry = output()
    rgrads = torch.autograd.grad(ry, list(module.parameters()), g)
    assert_close(y, ry, torch.float64)
    for (name, _), a, b in zip(module.named_parameters(), grads, rgrads):
        assert_close(a, b, torch.float64, msg=name)


def _packed_vs_reference_in_both_modes(module, x):
    """:func:`_module_vs_reference` on x (T, 3, I) packed with unsorted lengths (T, 2, 4), in
    training and in evaluation mode."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([x.shape[0], 2, 4]),
                                                     enforce_sorted=False)
    for training in (True, False):
        module.train(training)
        _module_vs_reference(module, packed)


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


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_module_zoneout_recurrent_dropout(mode):
    kw = {"proj_size": 3} if mode == "LSTM" else {}
    m = getattr(rnnkernels.nn, mode)(4, 5, num_layers=2, bidirectional=True, zoneout=0.25,
                                     recurrent_dropout=0.4, dtype=torch.float64, **kw)
    assert "zoneout=0.25" in repr(m) and "recurrent_dropout=0.4" in repr(m)
    assert set(m.state_dict()) == set(getattr(torch.nn, mode)(4, 5, 2, bidirectional=True,
                                                              **kw).state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    _packed_vs_reference_in_both_modes(m, x)
    m.train()
    torch.manual_seed(5)
    y1 = m(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(m(x)[0], y1, atol=0, rtol=0)


def test_module_options_off_are_torch():
    for m in (rnnkernels.nn.LSTM(3, 4, peephole=False), rnnkernels.nn.GRU(3, 4),
              rnnkernels.nn.RNN(3, 4)):
        assert all(k not in repr(m) for k in ("peephole", "zoneout", "recurrent_dropout",
                                              "layer_norm"))
    assert (list(rnnkernels.nn.LSTM(3, 4, num_layers=2).state_dict())
            == list(torch.nn.LSTM(3, 4, num_layers=2).state_dict()))


def test_bad_option_values():
    with pytest.raises(ValueError, match="peephole"):
        rnnkernels.nn.LSTM(3, 4, peephole=1)
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="zoneout"):
            rnnkernels.nn.GRU(3, 4, zoneout=bad)
        with pytest.raises(ValueError, match="recurrent_dropout"):
            rnnkernels.nn.RNN(3, 4, recurrent_dropout=bad)
    with pytest.raises(ValueError, match="layer_norm"):
        rnnkernels.nn.GRU(3, 4, reset_after=False, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm"):
        rnnkernels.nn.LSTM(3, 4, layer_norm="yes")


def test_torch_compile_fullgraph_with_options():
    """Every option traces with fullgraph (fake kernels of the extended ops); in training the
    aot_eager graph draws the same masks as eager for a seed."""
    m = rnnkernels.nn.LSTM(4, 6, batch_first=True, peephole=True, zoneout=0.2,
                           recurrent_dropout=0.3, layer_norm=True)
    x = torch.randn(3, 5, 4, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    y, _ = compiled(x)
    torch.manual_seed(1)
    y_eager, _ = m(x)
    torch.testing.assert_close(y, y_eager)
    g = torch.autograd.grad(y.square().sum(), [x, m.layer_norm_weight_c_l0])
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, m.layer_norm_weight_c_l0])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ Triton / CUDA fallback

@pytest.mark.parametrize("module,option", [
    (lambda: rnnkernels.nn.LSTM(3, 5, peephole=True), "peephole"),
    (lambda: rnnkernels.nn.GRU(3, 5, zoneout=0.3).eval(), "zoneout"),
    (lambda: rnnkernels.nn.RNN(3, 5, recurrent_dropout=0.3), "recurrent_dropout"),
    (lambda: rnnkernels.nn.LSTM(3, 5, layer_norm=True), "layer_norm"),
])
def test_triton_falls_back_to_reference(monkeypatch, module, option):
    """The Triton kernel has no cell options: with one, the layer runs the reference (same
    device, same draws) and warns once, naming the option."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if rnnkernels._backend._available("recurrence", torch.device("cpu"),
                                      torch.float32)["triton"] is not None:
        pytest.skip("the Triton interpreter cannot run here")
    m = module()
    x = torch.randn(4, 2, 3)
    rnnkernels._backend._warned.clear()
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match=option), rnnkernels.use_backend("triton"):
        y, _ = m(x)
    torch.manual_seed(2)
    with rnnkernels.use_backend("reference"):
        ry, _ = m(x)
    torch.testing.assert_close(y, ry, atol=0, rtol=0)
