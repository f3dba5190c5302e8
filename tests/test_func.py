"""Second-order gradients and torch.func over every op family: recurrence, selective scan,
linear scan, and the modules built on them.

- gradgradcheck in float64 on the C++ ops; the first-order backward stays the fused op, the
  second order goes through the differentiable path (reference recompute for the recurrence and
  the selective scan, linear scans for the linear scan).
- torch.func: grad, grad of grad, vjp, jacrev against the reference; vmap against a Python loop
  over the vmapped dimension (in_dims 0, 1, None); per-sample gradients of modules with
  functional_call.
- Triton twins under TRITON_INTERPRET=1 on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
from conftest import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import rnnkernels
from rnnkernels import _backend, _kernels
from rnnkernels.ops import recurrence as R
from rnnkernels.reference import linear_scan_reference, selective_scan_reference

F64 = torch.float64
CELLS = {"lstm": R.LSTM, "gru": R.GRU, "gru_reset_before": R.GRU_RESET_BEFORE,
         "rnn_tanh": R.RNN_TANH, "rnn_relu": R.RNN_RELU}


def _leaf(*shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()


def recurrence_inputs(cell, T=3, B=2, H=3, P=None, dtype=F64):
    """gx, h0, c0, w_hh, b_hh, w_hr of a recurrence (P: projection size, LSTM only)."""
    G = R.NUM_GATES[cell]
    S = P or H
    return (_leaf(T, B, G * H, dtype=dtype), _leaf(B, S, dtype=dtype),
            _leaf(B, H, dtype=dtype) if cell == R.LSTM else None,
            _leaf(G * H, S, scale=0.5, dtype=dtype), _leaf(G * H, dtype=dtype),
            _leaf(S, H, scale=0.5, dtype=dtype) if P else None)


def recurrence_fn(cell, lengths, reverse, backend="cpu"):
    def f(gx, h0, c0, w_hh, b_hh, w_hr):
        y, h, c = R.recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, backend)
        return (y, h, c) if cell == R.LSTM else (y, h)
    return f


def recurrence_ref(cell, lengths, reverse):
    def f(gx, h0, c0, w_hh, b_hh, w_hr):
        y, h, c = R.reference_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse)
        return (y, h, c) if cell == R.LSTM else (y, h)
    return f


def scan_inputs(batch=2, dim=4, L=5, N=3, groups=2, fixed_b=False, dtype=F64):
    """u, delta, A, B, C, D, z, delta_bias, initial_state of a selective scan."""
    B = _leaf(dim, N, dtype=dtype) if fixed_b else _leaf(batch, groups, N, L, dtype=dtype)
    return (_leaf(batch, dim, L, dtype=dtype), _leaf(batch, dim, L, scale=0.5, dtype=dtype),
            (-torch.rand(dim, N, dtype=dtype) - 0.2).requires_grad_(), B,
            _leaf(batch, groups, N, L, dtype=dtype), _leaf(dim, dtype=dtype),
            _leaf(batch, dim, L, dtype=dtype), _leaf(dim, scale=0.5, dtype=dtype),
            _leaf(batch, dim, N, dtype=dtype))


def scan_fn(scan):
    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return scan(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state)
    return f


def linear_inputs(batch=2, channels=3, T=5, dtype=F64):
    return ((torch.rand(batch, channels, T, dtype=dtype) * 1.6 - 0.8).requires_grad_(),
            _leaf(batch, channels, T, dtype=dtype), _leaf(batch, channels, dtype=dtype))


class OpCounter(TorchDispatchMode):
    """Counts the calls of rnnkernels ops by name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rnnkernels":
            name = func._opname
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _hvp_of_penalty(fn, inputs, weights_at):
    """Gradient of the gradient penalty |d(sum of outputs . r)/d(inputs)|^2 w.r.t. the inputs at
    ``weights_at``: a first-order backward with create_graph, then a second backward."""
    torch.manual_seed(1)
    outs = [o for o in _outputs(fn(*inputs)) if o is not None]
    loss = sum((o * torch.randn(o.shape, dtype=F64).to(o.dtype)).sum() for o in outs)
    diff = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, diff, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    return torch.autograd.grad(penalty, [inputs[i] for i in weights_at])


# ------------------------------------------------------------------ second order, float64

@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradgradcheck_recurrence(name, reverse):
    cell = CELLS[name]
    inputs = recurrence_inputs(cell, P=2 if cell == R.LSTM else None)
    lengths = torch.tensor([3, 2])
    assert torch.autograd.gradgradcheck(recurrence_fn(cell, lengths, reverse), inputs)


def test_gradgradcheck_lstm_without_projection():
    inputs = recurrence_inputs(R.LSTM, T=2, B=1)
    assert torch.autograd.gradgradcheck(recurrence_fn(R.LSTM, None, False), inputs)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradgradcheck_with_cell_options(mode):
    """Second order through the cell options: peephole (LSTM), zoneout (eval: the expectation),
    drawn zoneout and recurrent-dropout masks, layer normalisation; every parameter, the
    options' gains included."""
    T, B, I, H = 3, 2, 3, 4
    G = 4 if mode == "LSTM" else 3
    torch.manual_seed(0)
    x, h0, c0 = _leaf(T, B, I), _leaf(B, H, scale=0.5), _leaf(B, H, scale=0.5)
    w_ih, w_hh, b_ih, b_hh = _leaf(G * H, I), _leaf(G * H, H), _leaf(G * H), _leaf(G * H)
    ln_ih, ln_hh = (1 + _leaf(G * H, scale=0.1)).detach().requires_grad_(), _leaf(G * H)
    ln_c, lnb_c, w_peep = _leaf(H), _leaf(H, scale=0.1), _leaf(3, H, scale=0.3)

    def f(*args):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, lnb_c, w_peep = args
        torch.manual_seed(3)  # the same masks at every evaluation
        if mode == "LSTM":
            y, (h, c) = rnnkernels.ops.lstm(
                x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_peep=w_peep, zoneout=0.3,
                recurrent_dropout=0.25, ln_weight_ih=ln_ih, ln_weight_hh=ln_hh,
                ln_weight_c=ln_c, ln_bias_c=lnb_c)
            return y, h, c
        return rnnkernels.ops.gru(x, h0, w_ih, w_hh, b_ih, b_hh, zoneout=0.3,
                                  recurrent_dropout=0.25, ln_weight_ih=ln_ih, ln_weight_hh=ln_hh)

    inputs = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, lnb_c, w_peep]
    if mode == "GRU":
        for k in (2, 9, 10, 11):
            inputs[k] = inputs[k].detach()
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("fixed_b", [False, True])
def test_gradgradcheck_selective_scan(fixed_b):
    inputs = scan_inputs(L=4, fixed_b=fixed_b)
    assert torch.autograd.gradgradcheck(scan_fn(rnnkernels.ops.selective_scan), inputs)


@pytest.mark.parametrize("with_initial", [False, True])
def test_gradgradcheck_linear_scan(with_initial):
    a, b, h0 = linear_inputs()
    assert torch.autograd.gradgradcheck(rnnkernels.ops.linear_scan,
                                        (a, b, h0 if with_initial else None))


def test_penalty_gradient_matches_reference():
    """Gradient penalty through each family: the op's second order equals the reference's."""
    gx, _, _, w_hh, b_hh, _ = recurrence_inputs(R.RNN_TANH)
    cases = [
        (recurrence_fn(R.LSTM, torch.tensor([3, 1]), True),
         recurrence_ref(R.LSTM, torch.tensor([3, 1]), True), recurrence_inputs(R.LSTM, P=2),
         (0, 3, 4, 5)),
        (recurrence_fn(R.GRU_RESET_BEFORE, None, False),
         recurrence_ref(R.GRU_RESET_BEFORE, None, False), recurrence_inputs(R.GRU_RESET_BEFORE),
         (0, 1, 3)),
        # h0 depends on gx: the partial derivatives must not count that path twice
        (lambda gx, w, b: recurrence_fn(R.RNN_TANH, None, False)(gx, gx[0].tanh(), None, w, b,
                                                                  None),
         lambda gx, w, b: recurrence_ref(R.RNN_TANH, None, False)(gx, gx[0].tanh(), None, w, b,
                                                                   None),
         (gx, w_hh, b_hh), (0, 1, 2)),
        (scan_fn(rnnkernels.ops.selective_scan), scan_fn(selective_scan_reference),
         scan_inputs(), (2, 3, 5, 7)),
        (rnnkernels.ops.linear_scan, linear_scan_reference, linear_inputs(), (0, 1, 2)),
    ]
    for fn, ref, inputs, at in cases:
        for got, want in zip(_hvp_of_penalty(fn, inputs, at), _hvp_of_penalty(ref, inputs, at)):
            assert_close(got, want)


def test_first_order_runs_the_fused_backward():
    """create_graph=False and torch.func.grad run the fused backward op; create_graph=True the
    differentiable path (no backward op for the recurrence / selective scan; forward-op scans
    for the linear scan)."""
    lengths = torch.tensor([3, 2])
    cases = [
        (recurrence_fn(R.LSTM, lengths, False), recurrence_inputs(R.LSTM), "recurrence_bwd"),
        (scan_fn(rnnkernels.ops.selective_scan), scan_inputs(), "selective_scan_bwd"),
        (rnnkernels.ops.linear_scan, linear_inputs(), "linear_scan_bwd"),
    ]
    for fn, inputs, bwd in cases:
        for create_graph in (False, True):
            loss = sum(o.sum() for o in _outputs(fn(*inputs)))
            with OpCounter() as counter:
                torch.autograd.grad(loss, [t for t in inputs if t is not None],
                                    create_graph=create_graph)
            assert counter.calls.get(bwd, 0) == (0 if create_graph else 1), (bwd, counter.calls)
        # one torch.func.grad runs its backward with grad mode on, but needs no graph
        detached = [t if t is None else t.detach() for t in inputs]
        with OpCounter() as counter:
            tf.grad(lambda first, *rest, f=fn: sum(o.sum() for o in _outputs(f(first, *rest))))(
                *detached)
        assert counter.calls.get(bwd, 0) == 1, (bwd, counter.calls)


# ------------------------------------------------------------------ modules

@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_module_penalty_matches_reference_backend(mode):
    """Gradient penalty (WGAN-GP style, d|dL/dx|^2/dparams) through a 2-layer bidirectional
    module, fused backend vs the reference backend."""
    kwargs = {"proj_size": 2} if mode == "LSTM" else {}
    module = getattr(rnnkernels.nn, mode)(3, 4, num_layers=2, bidirectional=True, dtype=F64,
                                          **kwargs)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    lengths = torch.tensor([4, 2])

    def penalty_grads():
        y, _ = module(x, lengths=lengths)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), list(module.parameters()))

    got = penalty_grads()
    with _backend.use_backend("reference"):
        want = penalty_grads()
    for g, w in zip(got, want):
        assert_close(g, w)


def test_second_order_support_keeps_no_input_projection():
    """The forward saves x / w_ih / b_ih (kept by the projection's backward anyway) instead of
    gx (T, B, 4H) for the differentiable backward, in the module and the functional path."""
    T, B, I, H = 5, 3, 2, 4
    lstm = rnnkernels.nn.LSTM(I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    h0, c0 = torch.zeros(B, H, dtype=F64), torch.zeros(B, H, dtype=F64)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        lstm(x)
        rnnkernels.ops.lstm(x, (h0, c0), lstm.weight_ih_l0, lstm.weight_hh_l0)
    assert (T, B, I) in shapes and (T, B, 4 * H) not in shapes, shapes


def test_mamba_hessian_vector_product_matches_reference_backend():
    mamba = rnnkernels.nn.Mamba(4, d_state=3, d_conv=2, expand=1, dtype=F64)
    x = torch.randn(2, 5, 4, dtype=F64)
    params = dict(mamba.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(p):
        return tf.functional_call(mamba, p, (x,)).pow(2).sum()

    def hvp():  # reverse over reverse
        return tf.vjp(tf.grad(loss), params)[1](v)[0]

    got = hvp()
    with _backend.use_backend("reference"):
        want = hvp()
    for k in params:
        assert_close(got[k], want[k], msg=k)


def test_module_per_sample_gradients_with_vmap():
    """vmap(grad(functional_call)) over single sequences equals a loop of backward passes."""
    lstm = rnnkernels.nn.LSTM(3, 4, proj_size=2, dtype=F64)
    params = {k: p.detach() for k, p in lstm.named_parameters()}
    xs = torch.randn(5, 4, 3, dtype=F64)

    def loss(p, x):
        y, _ = tf.functional_call(lstm, p, (x.unsqueeze(1),))
        return y.pow(2).sum()

    got = tf.vmap(tf.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        want = torch.autograd.grad(loss(dict(lstm.named_parameters()), xs[i]),
                                   list(lstm.parameters()))
        for k, w in zip(params, want):
            assert_close(got[k][i], w, msg=k)


# ------------------------------------------------------------------ torch.func on the ops

@pytest.mark.parametrize("name", ["lstm", "gru_reset_before", "rnn_relu"])
def test_func_grad_vjp_jacrev_recurrence(name):
    cell = CELLS[name]
    inputs = [t.detach() if t is not None else None for t in recurrence_inputs(cell)]
    lengths = torch.tensor([3, 1])
    fn, ref = recurrence_fn(cell, lengths, True), recurrence_ref(cell, lengths, True)

    def scalar(f):
        return lambda gx, w_hh: sum(o.pow(2).sum() for o in f(gx, inputs[1], inputs[2], w_hh,
                                                              inputs[4], inputs[5]))

    got = tf.grad(scalar(fn), argnums=(0, 1))(inputs[0], inputs[3])
    want = tf.grad(scalar(ref), argnums=(0, 1))(inputs[0], inputs[3])
    for g, w in zip(got, want):
        assert_close(g, w)
    # grad of grad: the derivative of the w_hh gradient's sum w.r.t. w_hh
    second = [tf.grad(lambda w, f=f: tf.grad(scalar(f), argnums=1)(inputs[0], w).sum())(
        inputs[3]) for f in (fn, ref)]
    assert_close(second[0], second[1])

    def three(f):
        return lambda gx, h0, w_hh: f(gx, h0, inputs[2], w_hh, inputs[4], inputs[5])

    out, vjp_fn = tf.vjp(three(fn), inputs[0], inputs[1], inputs[3])
    cot = tuple(torch.randn_like(o) for o in out)
    for g, w in zip(vjp_fn(cot), tf.vjp(three(ref), inputs[0], inputs[1], inputs[3])[1](cot)):
        assert_close(g, w)
    assert_close(tf.jacrev(lambda w: fn(inputs[0], inputs[1], inputs[2], w, inputs[4],
                                        inputs[5])[0])(inputs[3]),
                 tf.jacrev(lambda w: ref(inputs[0], inputs[1], inputs[2], w, inputs[4],
                                         inputs[5])[0])(inputs[3]))


def test_func_scans():
    """grad, Hessian (jacrev of grad) of the selective scan; Jacobian and Hessian (jacrev of
    jacrev) of the linear scan, against the references."""
    u, delta, A, B, C, D, z, db, h0 = (t.detach() for t in scan_inputs(L=4))

    def sel(scan):
        return lambda u, A, C: scan(u, delta, A, B, C, D, z, db, True)

    got = tf.grad(lambda *a: sel(rnnkernels.ops.selective_scan)(*a).pow(2).sum(),
                  argnums=(0, 1, 2))(u, A, C)
    want = tf.grad(lambda *a: sel(selective_scan_reference)(*a).pow(2).sum(),
                   argnums=(0, 1, 2))(u, A, C)
    for g, w in zip(got, want):
        assert_close(g, w)
    hess = [tf.jacrev(tf.grad(lambda A, s=s: sel(s)(u, A, C).pow(2).sum()))(A)
            for s in (rnnkernels.ops.selective_scan, selective_scan_reference)]
    assert_close(hess[0], hess[1])
    a, b, h = (t.detach() for t in linear_inputs())
    jac = [tf.jacrev(lambda a, s=s: s(a, b, h))(a)
           for s in (rnnkernels.ops.linear_scan, linear_scan_reference)]
    assert_close(jac[0], jac[1])
    hess = [tf.jacrev(tf.jacrev(lambda a, s=s: s(a, b, h).pow(2).sum()))(a)
            for s in (rnnkernels.ops.linear_scan, linear_scan_reference)]
    assert_close(hess[0], hess[1])


def test_forward_mode_is_refused():
    """Forward-mode AD would drop the tangent silently: every op refuses it by name."""
    a, b, _ = (t.detach() for t in linear_inputs())
    gx, h0, c0, w_hh, b_hh, _ = (t if t is None else t.detach()
                                 for t in recurrence_inputs(R.LSTM))
    u, delta, A, B, C, D, z, db, h = (t.detach() for t in scan_inputs())
    cases = [
        (lambda a: rnnkernels.ops.linear_scan(a, b), a, "linear_scan_fwd"),
        (lambda w: recurrence_fn(R.LSTM, None, False)(gx, h0, c0, w, b_hh, None)[0], w_hh,
         "recurrence_fwd"),
        (lambda u: scan_fn(rnnkernels.ops.selective_scan)(u, delta, A, B, C, D, z, db, h)[0], u,
         "selective_scan_fwd"),
    ]
    for fn, primal, op in cases:
        with pytest.raises(NotImplementedError, match=f"{op} has no forward-mode derivative"):
            tf.jvp(fn, (primal,), (torch.ones_like(primal),))


# ------------------------------------------------------------------ vmap

def _loop(fn, in_dims, args, size):
    """fn over each index of the vmapped dimension, stacked at 0 (the reference of vmap)."""
    runs = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
            for i in range(size)]
    if isinstance(runs[0], torch.Tensor):
        return torch.stack(runs)
    return tuple(torch.stack(o) for o in zip(*runs))


def _check_vmap(fn, in_dims, args, size):
    got, want = tf.vmap(fn, in_dims=in_dims)(*args), _loop(fn, in_dims, args, size)
    for g, w in zip(_outputs(got), _outputs(want)):
        assert_close(g, w)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("weights", ["shared", "per_sample"])
def test_vmap_recurrence(name, weights):
    cell = CELLS[name]
    V = 3
    gx, h0, c0, w_hh, b_hh, w_hr = (None if t is None else t.detach()
                                    for t in recurrence_inputs(cell, P=2 if name == "lstm"
                                                               else None))
    lengths = torch.tensor([[3, 1], [2, 2], [1, 3]])
    gxs = torch.stack([gx, gx.flip(0), 2 * gx], dim=1)   # vmapped at dim 1
    h0s = torch.stack([h0, -h0, h0])
    w_hhs = torch.stack([w_hh, 0.5 * w_hh, -w_hh]) if weights == "per_sample" else w_hh
    wd = 0 if weights == "per_sample" else None

    def fn(gx, h0, w_hh, lengths):
        return recurrence_fn(cell, lengths, False)(gx, h0, c0, w_hh, b_hh, w_hr)

    _check_vmap(fn, (1, 0, wd, 0), (gxs, h0s, w_hhs, lengths), V)
    _check_vmap(fn, (1, None, wd, None), (gxs, h0, w_hhs, None), V)

    def loss(gx, w_hh):
        return sum(o.pow(2).sum() for o in fn(gx, h0, w_hh, None))

    _check_vmap(tf.grad(loss, argnums=(0, 1)), (1, wd), (gxs, w_hhs), V)


def test_vmap_then_backward():
    """Plain autograd through a vmapped call (folded into one kernel call) equals the loop's."""
    gx, h0, c0, w_hh, b_hh, _ = recurrence_inputs(R.GRU)
    gxs = torch.stack([gx, 2 * gx], dim=1).detach().requires_grad_()
    fn = recurrence_fn(R.GRU, None, True)

    def run(gx_batched):
        return tf.vmap(lambda g: fn(g, h0, c0, w_hh, b_hh, None)[0], in_dims=1)(gx_batched)

    def looped(gx_batched):
        return torch.stack([fn(gx_batched[:, i], h0, c0, w_hh, b_hh, None)[0]
                            for i in range(2)])

    with OpCounter() as counter:
        got = torch.autograd.grad(run(gxs).pow(2).sum(), (gxs, h0, w_hh, b_hh))
    assert counter.calls == {"recurrence_fwd": 1, "recurrence_bwd": 1}
    want = torch.autograd.grad(looped(gxs).pow(2).sum(), (gxs, h0, w_hh, b_hh))
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("fixed_b", [False, True])
def test_vmap_selective_scan(fixed_b):
    V = 2
    u, delta, A, B, C, D, z, db, h0 = (t.detach() for t in scan_inputs(L=4, fixed_b=fixed_b))
    scan = scan_fn(rnnkernels.ops.selective_scan)
    us = torch.stack([u, -u], dim=2)        # vmapped at dim 2
    As = torch.stack([A, 2 * A])
    Bs = torch.stack([B, B.flip(-1)])
    _check_vmap(scan, (2, None, None, 0, None, None, None, None, 0),
                (us, delta, A, Bs, C, D, z, db, torch.stack([h0, h0.flip(1)])), V)
    _check_vmap(scan, (2, None, 0, None, None, None, None, None, None),
                (us, delta, As, B, C, D, z, db, h0), V)

    def loss(u, A):
        out, last = scan(u, delta, A, B, C, D, z, db, h0)
        return out.pow(2).sum() + last.sum()

    _check_vmap(tf.grad(loss, argnums=(0, 1)), (2, 0), (us, As), V)


def test_vmap_linear_scan():
    a, b, h0 = (t.detach() for t in linear_inputs())
    a2, b2 = torch.stack([a, a.flip(2)], dim=1), torch.stack([b, -b])
    _check_vmap(rnnkernels.ops.linear_scan, (1, 0, None), (a2, b2, h0), 2)
    _check_vmap(tf.grad(lambda a, b: rnnkernels.ops.linear_scan(a, b, h0).pow(2).sum(),
                        argnums=(0, 1)), (1, 0), (a2, b2), 2)


# ------------------------------------------------------------------ Triton twins

triton_interpreted = pytest.mark.skipif(
    not _kernels.triton_interpreted()
    or _kernels.triton_unsupported("recurrence", torch.float32) is not None,
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


@triton_interpreted
def test_triton_recurrence_second_order_and_vmap():
    """The Triton recurrence, float32: penalty gradient against the float64 reference; vmap
    and per-sample gradients (vmap of the fused Triton backward) with per-sample weights
    against a loop."""
    lengths = torch.tensor([3, 1])
    inputs = recurrence_inputs(R.LSTM, dtype=torch.float32)
    ref_inputs = [t if t is None else t.detach().double().requires_grad_() for t in inputs]
    want = _hvp_of_penalty(recurrence_ref(R.LSTM, lengths, False), ref_inputs, (0, 3))
    with _backend.use_backend("triton"), OpCounter() as counter:
        got = _hvp_of_penalty(recurrence_fn(R.LSTM, lengths, False, "triton"), inputs, (0, 3))
        gx, h0, c0, w_hh, b_hh, _ = (t if t is None else t.detach() for t in inputs)
        lstm = recurrence_fn(R.LSTM, None, False, "triton")
        batch = (torch.stack([gx, -gx], 1), torch.stack([w_hh, -w_hh]))
        _check_vmap(lambda gx, w_hh: lstm(gx, h0, c0, w_hh, b_hh, None), (1, 0), batch, 2)
        _check_vmap(tf.grad(lambda gx, w_hh: lstm(gx, h0, c0, w_hh, b_hh, None)[0].sum(),
                            argnums=(0, 1)), (1, 0), batch, 2)
    assert set(counter.calls) == {"recurrence_fwd_triton", "recurrence_bwd_triton"}
    for g, w in zip(got, want):
        assert_close(g, w, scale=10)


@triton_interpreted
def test_triton_scans_second_order_and_vmap():
    """The Triton scans, float32: penalty gradient against the float64 reference; per-sample
    gradients (vmap of the fused Triton backward) against a loop."""
    lin = linear_inputs(dtype=torch.float32)
    sel = scan_inputs(L=3, dtype=torch.float32)
    scan = scan_fn(rnnkernels.ops.selective_scan)
    want_lin = _hvp_of_penalty(linear_scan_reference,
                               [t.detach().double().requires_grad_() for t in lin], (0,))
    want_sel = _hvp_of_penalty(scan_fn(selective_scan_reference),
                               [t.detach().double().requires_grad_() for t in sel], (2,))
    with _backend.use_backend("triton"), OpCounter() as counter:
        got_lin = _hvp_of_penalty(rnnkernels.ops.linear_scan, lin, (0,))
        got_sel = _hvp_of_penalty(scan, sel, (2,))
        u, delta, A, B, C, D, z, db, h0 = (t.detach() for t in sel)
        _check_vmap(tf.grad(lambda u, A: scan(u, delta, A, B, C, D, z, db, h0)[0].sum(),
                            argnums=(0, 1)), (0, None), (torch.stack([u, -u]), A), 2)
    assert set(counter.calls) == {"linear_scan_fwd_triton", "linear_scan_bwd_triton",
                                  "selective_scan_fwd_triton", "selective_scan_bwd_triton"}
    assert_close(got_lin[0], want_lin[0], scale=10)
    assert_close(got_sel[0], want_sel[0], scale=10)
