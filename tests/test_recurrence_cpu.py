"""The C++ CPU kernels of the generic recurrence against the float64 references: outputs, final
states and every gradient, for every cell, dtype, direction, projection and length mask."""

import pytest
import torch
from conftest import assert_close, tol

import rnnkernels
from rnnkernels.ops import recurrence as R
from rnnkernels.ops.recurrence import reference_layer

CELLS = [R.LSTM, R.GRU, R.GRU_RESET_BEFORE, R.RNN_TANH, R.RNN_RELU]
SHAPES = [  # T, B, I, H
    (1, 1, 3, 5),
    (7, 3, 5, 17),
    (5, 33, 8, 16),
    (4, 2, 6, 33),
]


def make_layer(cell, T, B, I, H, dtype, proj=0, bias=True, requires_grad=True):
    G = R.NUM_GATES[cell]
    P = proj or H
    scale = H ** -0.5
    def t(*shape, s=1.0):
        v = (torch.randn(*shape, dtype=torch.float64) * s).to(dtype)
        return v.requires_grad_(requires_grad)
    args = dict(
        x=t(T, B, I), h0=t(B, P, s=0.5), c0=t(B, H, s=0.5) if cell == R.LSTM else None,
        w_ih=t(G * H, I, s=scale), w_hh=t(G * H, P, s=scale),
        b_ih=t(G * H, s=scale) if bias else None, b_hh=t(G * H, s=scale) if bias else None,
        w_hr=t(P, H, s=scale) if proj else None)
    return args


def run(args, cell, lengths=None, reverse=False, backend=None):
    a = dict(args)
    if backend == "reference":
        y, h, c = reference_layer(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                  a["b_hh"], a["w_hr"], lengths, cell, reverse)
    else:
        gx = torch.nn.functional.linear(a["x"], a["w_ih"], a["b_ih"])
        y, h, c = R.recurrence(gx, a["h0"], a["c0"], a["w_hh"], a["b_hh"], a["w_hr"], lengths,
                               cell, reverse, "cpu")
        c = c if cell == R.LSTM else None
    return y, h, c


def check_against_reference(cell, shape, dtype, proj=0, lengths=None, reverse=False, bias=True):
    T, B, I, H = shape
    args = make_layer(cell, T, B, I, H, dtype, proj, bias)
    ref_args = {k: (v.detach().double().requires_grad_() if v is not None else None)
                for k, v in args.items()}
    outs = run(args, cell, lengths, reverse)
    ref = run(ref_args, cell, lengths, reverse, backend="reference")
    for name, o, r in zip(("y", "h_n", "c_n"), outs, ref):
        if r is not None:
            assert o.dtype == dtype
            assert_close(o, r, dtype, msg=f"{name} of cell {cell}")
    # every gradient, with random output gradients (never all ones / zeros)
    grads_out = [torch.randn_like(r) for r in ref if r is not None]
    leaves = [k for k, v in args.items() if v is not None]
    g = torch.autograd.grad([o for o in outs if o is not None], [args[k] for k in leaves],
                            [go.to(dtype) for go in grads_out])
    rg = torch.autograd.grad([r for r in ref if r is not None], [ref_args[k] for k in leaves],
                             grads_out)
    for k, a, b in zip(leaves, g, rg):
        scale = 4 if dtype != torch.float64 else 1
        assert_close(a, b, dtype, msg=f"grad {k} of cell {cell}", scale=scale)


@pytest.fixture(params=["units", "rows", "batched"])
def cpu_path(request, monkeypatch):
    """The CPU decompositions: the persistent thread team (default where it applies) with the
    threads sharing the batch rows and splitting the hidden units ("units") or each group of
    threads taking its own rows ("rows"), and the per-step batched GEMM."""
    monkeypatch.setenv("RNNKERNELS_CPU_RECURRENCE", request.param)
    return request.param


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward(cell, shape, dtype, cpu_path):
    check_against_reference(cell, shape, dtype)


@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("cell", [R.LSTM, R.GRU])
def test_thread_counts(cell, threads, split, monkeypatch):
    """The persistent team forms with any thread count, including more threads than cores and
    than batch rows, split by units or into row groups (4 threads, 9 rows: groups of 3, 2, 2,
    2; 3 threads, 2 rows: 2 groups, one of them with 1 idle thread)."""
    monkeypatch.setenv("RNNKERNELS_CPU_RECURRENCE", split)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(cell, (6, 2, 5, 128), torch.float32, lengths=torch.tensor([6, 3]))
        check_against_reference(cell, (4, 9, 5, 128), torch.float32, reverse=True)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [1, 2, 4, 5])
def test_small_batch_step_product(cell, batch, monkeypatch):
    """The batched path's own matrix-vector product for at most 4 batch rows (5: ATen's GEMM),
    one step and several: at hidden 257 and 4 rows every cell's product is split over two
    threads (in ranges of rows of W_hh that are not multiples of the 4 or 2 it takes at a time), K =
    257 is not a multiple of the vector width; the LSTM with a projection, whose product runs
    through it too."""
    monkeypatch.setenv("RNNKERNELS_CPU_RECURRENCE", "batched")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_against_reference(cell, (1, batch, 7, 257), torch.float32)
        check_against_reference(cell, (3, batch, 7, 257), torch.float64)
        if cell == R.LSTM:
            check_against_reference(cell, (2, batch, 7, 257), torch.float32, proj=65)
    finally:
        torch.set_num_threads(previous)


def ops_called(fn) -> set[str]:
    """Names of the rnnkernels ops fn calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("rnnkernels::")}


DECODE_CELLS = [R.LSTM, R.GRU, R.RNN_TANH, R.RNN_RELU]


def assert_matches_reference(outs, args, cell, reverse, dtype):
    """A layer call's (y, h_n, c_n) in dtype, with the float64 reference's shapes and values
    (``args``: make_layer's, without a projection or lengths)."""
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ref = reference_layer(wide["x"], wide["h0"], wide["c0"], wide["w_ih"], wide["w_hh"],
                          wide["b_ih"], wide["b_hh"], None, None, cell, reverse)
    for name, o, r in zip(("y", "h_n", "c_n"), outs, ref):
        if r is not None:
            assert o.dtype == dtype and o.shape == r.shape
            assert_close(o, r, dtype, msg=f"{name} of cell {cell}")


@pytest.mark.parametrize("cell", DECODE_CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_decoding_step(cell, dtype, batch, bias):
    """One step of at most DECODE_ROWS rows without gradients runs the fused cell_step op, with
    the float64 reference's outputs: hidden 257 (two threads' unit ranges, K not a multiple of
    the vector width; for bfloat16, weight rows that end mid-vector in the widening loads),
    input 7."""
    args = make_layer(cell, 1, batch, 7, 257, dtype, bias=bias, requires_grad=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def layer():
            return R.run_layer(args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                               args["b_ih"], args["b_hh"], None, None, cell, False, "cpu")
        with torch.no_grad():
            outs = layer()
            assert ops_called(layer) == {"rnnkernels::cell_step"}
            if dtype == torch.bfloat16:
                # The same float math on the bfloat16 values as the float32 step: outputs equal
                # to its outputs rounded (a wrong widened value, say past a row's end, differs).
                f32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                exact = R.run_layer(f32["x"], f32["h0"], f32["c0"], f32["w_ih"], f32["w_hh"],
                                    f32["b_ih"], f32["b_hh"], None, None, cell, False, "cpu")
                for o, e in zip(outs, exact):
                    if e is not None:
                        assert torch.equal(o, e.to(dtype))
    finally:
        torch.set_num_threads(previous)
    assert_matches_reference(outs, args, cell, False, dtype)
    assert outs[0][0].data_ptr() != outs[1].data_ptr()  # y and h_n are separate tensors


def test_decoding_step_only_without_gradients():
    """With gradients needed, more rows than DECODE_ROWS, two steps or the reset-before GRU,
    a step runs the recurrence ops; tensors that require grad under no_grad take cell_step."""
    def called(cell, T, B, requires_grad, no_grad=False):
        args = make_layer(cell, T, B, 3, 8, torch.float32, requires_grad=requires_grad)
        with torch.set_grad_enabled(not no_grad):
            return ops_called(lambda: R.run_layer(
                args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"],
                args["b_hh"], None, None, cell, False, "cpu"))

    assert called(R.GRU, 1, 1, False) == {"rnnkernels::cell_step"}
    assert called(R.LSTM, 1, 2, True, no_grad=True) == {"rnnkernels::cell_step"}
    for cell, T, B, requires_grad in [(R.GRU, 1, 1, True), (R.GRU, 1, R.DECODE_ROWS + 1, False),
                                      (R.GRU, 2, 1, False), (R.GRU_RESET_BEFORE, 1, 1, False)]:
        assert "rnnkernels::cell_step" not in called(cell, T, B, requires_grad)


def test_decoding_step_op_refuses_bad_arguments():
    """Called directly with arguments the Python side never passes, the op raises instead of
    reading out of bounds: an LSTM without c0, a short bias, too many rows, the reset-before
    GRU, two steps, x without its step dimension."""
    args = make_layer(R.LSTM, 1, 2, 3, 5, torch.float32, requires_grad=False)
    base = [args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"],
            args["b_hh"], R.LSTM]
    op = torch.ops.rnnkernels.cell_step
    bad = [(2, None), (5, args["b_ih"][:-1]), (0, torch.randn(1, R.DECODE_ROWS + 1, 3)),
           (7, R.GRU_RESET_BEFORE), (0, torch.randn(2, 2, 3)), (0, args["x"][0])]
    for i, value in bad:
        call = list(base)
        call[i] = value
        if i == 0:  # states of the rows of this x
            call[1] = torch.randn(value.shape[-2], 5)
            call[2] = torch.randn(value.shape[-2], 5)
        with pytest.raises(RuntimeError, match="cell_step"):
            op(*call)


def test_decoding_step_op_has_no_backward():
    """Called directly on tensors that require grad, the op's outputs record a backward that
    raises a clear error instead of carrying no gradient."""
    args = make_layer(R.GRU, 1, 2, 3, 5, torch.float32)
    y, h, _ = torch.ops.rnnkernels.cell_step(args["x"], args["h0"], None, args["w_ih"],
                                             args["w_hh"], args["b_ih"], args["b_hh"], R.GRU)
    assert h.requires_grad
    with pytest.raises(RuntimeError, match="no backward"):
        h.sum().backward()


@pytest.mark.parametrize("cell", DECODE_CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_step_opcheck(cell, dtype):
    args = make_layer(cell, 1, 2, 3, 5, dtype, requires_grad=False)
    torch.library.opcheck(torch.ops.rnnkernels.cell_step.default,
                          (args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                           args["b_ih"], args["b_hh"], cell))


# T, B = 1, I, H. The fused projection runs from 16 steps on on AVX-512 builds, from 8 on AVX2;
# its units in blocks of 16 steps (units of 16 rows) on AVX-512, of 32 steps (units of 4 rows)
# on AVX2; its blocks (RNNKERNELS_CPU_PROJECTION=blocks) take 32 steps.
SEQUENCE_SHAPES = [
    (18, 1, 7, 257),   # two threads; the second's units (113) end panels mid-vector
    (9, 1, 6, 64),     # AVX-512: too short, the projection as one matmul; AVX2: one row past 8
    (7, 1, 6, 64),     # too short on both
    (17, 1, 37, 29),   # one thread; the last block (AVX-512) or row block (AVX2) of one step
    (40, 1, 256, 64),  # several blocks, the last partial
    (33, 1, 5, 48),    # I far below H: fewer projection units per step than product slots
    (20, 1, 300, 16),  # I above H: the projection's units beyond the slots run on their own
    (16, 1, 9, 130),   # exactly one block on AVX-512 (nothing to project ahead)
    (8, 1, 9, 130),    # the fewest steps fused on AVX2: one partial block of two row blocks
    (65, 1, 11, 40),   # three blocks of 32 steps, the last of one step
]


@pytest.mark.parametrize("cell", DECODE_CELLS)
@pytest.mark.parametrize("shape", SEQUENCE_SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("projection", ["units", "blocks"])
def test_sequence_inference(cell, shape, reverse, threads, projection, monkeypatch):
    """A float32 layer call on one row of more than one step without gradients runs the
    recurrence_infer op (from one block of steps on, the input projection computed in the
    recurrence's team, in either of its two ways) with the float64 reference's outputs."""
    monkeypatch.setenv("RNNKERNELS_CPU_PROJECTION", projection)
    T, B, I, H = shape
    args = make_layer(cell, T, B, I, H, torch.float32, bias=threads != 3, requires_grad=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def layer():
            return R.run_layer(args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                               args["b_ih"], args["b_hh"], None, None, cell, reverse, "cpu")
        outs = layer()
        assert ops_called(layer) == {"rnnkernels::recurrence_infer"}
    finally:
        torch.set_num_threads(previous)
    assert_matches_reference(outs, args, cell, reverse, torch.float32)


def test_sequence_inference_only_where_it_applies():
    """recurrence_infer takes float32 calls of one row and more than one step without
    gradients; gradients, more rows, one step, another dtype, lengths or the reset-before GRU
    take the other ops."""
    def called(cell, T, B, requires_grad=False, dtype=torch.float32, lengths=None):
        args = make_layer(cell, T, B, 3, 8, dtype, requires_grad=requires_grad)
        return ops_called(lambda: R.run_layer(
            args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"],
            args["b_hh"], None, lengths, cell, False, "cpu"))

    assert called(R.LSTM, 5, 1) == {"rnnkernels::recurrence_infer"}
    for kwargs in [dict(cell=R.LSTM, T=5, B=1, requires_grad=True),
                   dict(cell=R.LSTM, T=5, B=2), dict(cell=R.LSTM, T=1, B=1),
                   dict(cell=R.GRU, T=5, B=1, dtype=torch.float64),
                   dict(cell=R.GRU, T=5, B=1, lengths=torch.tensor([4])),
                   dict(cell=R.GRU_RESET_BEFORE, T=5, B=1)]:
        assert "rnnkernels::recurrence_infer" not in called(**kwargs), kwargs


@pytest.mark.parametrize("cell", DECODE_CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_sequence_inference_op_other_inputs(cell, dtype, batch):
    """Called directly with inputs the Python side sends elsewhere (more rows, float64,
    bfloat16), the op projects with one matmul and runs the recurrence op: the reference's
    outputs all the same."""
    args = make_layer(cell, 6, batch, 5, 20, dtype, requires_grad=False)
    outs = torch.ops.rnnkernels.recurrence_infer(args["x"], args["h0"], args["c0"], args["w_ih"],
                                                 args["w_hh"], args["b_ih"], args["b_hh"], cell,
                                                 False)
    assert_matches_reference(outs, args, cell, False, dtype)


def test_sequence_inference_op_refuses_bad_arguments():
    """Called directly with arguments the Python side never passes, the op raises instead of
    reading out of bounds: an LSTM without c0, a short bias, a matrix for x, no steps, the
    reset-before GRU, mixed dtypes."""
    args = make_layer(R.LSTM, 4, 1, 3, 5, torch.float32, requires_grad=False)
    base = [args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"],
            args["b_hh"], R.LSTM, False]
    op = torch.ops.rnnkernels.recurrence_infer
    bad = [(2, None), (5, args["b_ih"][:-1]), (0, args["x"][0]), (0, args["x"][:0]),
           (7, R.GRU_RESET_BEFORE), (4, args["w_hh"].double())]
    for i, value in bad:
        call = list(base)
        call[i] = value
        with pytest.raises(RuntimeError, match="recurrence_infer"):
            op(*call)


def test_sequence_inference_op_has_no_backward():
    args = make_layer(R.GRU, 3, 1, 3, 5, torch.float32)
    y, h, _ = torch.ops.rnnkernels.recurrence_infer(args["x"], args["h0"], None, args["w_ih"],
                                                    args["w_hh"], args["b_ih"], args["b_hh"],
                                                    R.GRU, False)
    assert h.requires_grad
    with pytest.raises(RuntimeError, match="no backward"):
        h.sum().backward()


@pytest.mark.parametrize("cell", DECODE_CELLS)
@pytest.mark.parametrize("batch", [1, 2])
def test_sequence_inference_opcheck(cell, batch):
    args = make_layer(cell, 5, batch, 3, 20, torch.float32, requires_grad=False)
    torch.library.opcheck(torch.ops.rnnkernels.recurrence_infer.default,
                          (args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                           args["b_ih"], args["b_hh"], cell, True))


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16(cell, cpu_path):
    check_against_reference(cell, (6, 3, 5, 16), torch.bfloat16)


@pytest.mark.parametrize("cell", [R.LSTM, R.GRU, R.RNN_TANH, R.RNN_RELU])
@pytest.mark.parametrize("batch", [1, 5, 13, 32])
def test_bfloat16_dot_products(cell, batch, monkeypatch):
    """bfloat16 on a CPU with bfloat16 dot products (elsewhere both runs below take float
    products): the persistent forward packs its W_hh slice in bfloat16 k-pairs and rounds the
    state to bfloat16 for the product. Hidden 257 over two threads (K odd: the zero padding
    pair, and the part of the state a thread gets from the other ending at it), batch 1, 5, 13
    (row blocks of 1, 5, 5 + 4 + 4 rows) and 32 (two row groups). Against the float64
    reference, and within about the rounding of the state of the same layer with float
    products (RNNKERNELS_BF16_DOT=0). Outputs only: the backward's products stay float (its
    gradients in bfloat16: test_bfloat16)."""
    args = make_layer(cell, 6, batch, 7, 257, torch.bfloat16, requires_grad=False)
    wide = {k: v.double() if v is not None else None for k, v in args.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            dot = run(args, cell)
            monkeypatch.setenv("RNNKERNELS_BF16_DOT", "0")
            products = run(args, cell)
    finally:
        torch.set_num_threads(previous)
    ref = run(wide, cell, backend="reference")
    for name, a, b, r in zip(("y", "h_n", "c_n"), dot, products, ref):
        if r is not None:
            assert_close(a, r, torch.bfloat16, msg=f"{name} of cell {cell}")
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_and_reverse(cell, reverse, cpu_path):
    lengths = torch.tensor([3, 7, 1, 5])
    check_against_reference(cell, (7, 4, 3, 9), torch.float64, lengths=lengths, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell", [R.LSTM, R.GRU, R.RNN_TANH])
@pytest.mark.parametrize("reverse", [False, True])
def test_row_groups_skip_rows_past_length(cell, reverse, dtype, monkeypatch):
    """Row groups of one thread multiply, forward and backward, only the rows within their
    length at each step (ActiveRows in recurrence.cpp): groups of 5 rows with some, all and none
    of them past their lengths at a step; bfloat16 through the bfloat16 panels where the CPU has
    them."""
    monkeypatch.setenv("RNNKERNELS_CPU_RECURRENCE", "rows")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lengths = torch.tensor([9, 2, 5, 1, 7, 3, 3, 1, 2, 1])
        check_against_reference(cell, (9, 10, 6, 40), dtype, lengths=lengths, reverse=reverse)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, torch.tensor([2, 5, 4])])
def test_lstm_projection(reverse, lengths):
    check_against_reference(R.LSTM, (5, 3, 4, 11), torch.float64, proj=6, lengths=lengths,
                            reverse=reverse)
    check_against_reference(R.LSTM, (5, 3, 4, 11), torch.float32, proj=6, lengths=lengths,
                            reverse=reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_no_bias(cell):
    check_against_reference(cell, (4, 3, 5, 6), torch.float64, bias=False)


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell):
    args = make_layer(cell, 3, 2, 3, 4, torch.float64, proj=3 if cell == R.LSTM else 0)
    gx = torch.nn.functional.linear(args["x"], args["w_ih"], args["b_ih"]).detach().requires_grad_()
    lengths = torch.tensor([3, 2])

    def f(gx, h0, c0, w_hh, b_hh, w_hr, reverse):
        y, h, c = R.recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, "cpu")
        return (y, h, c) if cell == R.LSTM else (y, h)

    for reverse in (False, True):
        torch.autograd.gradcheck(
            lambda *a, reverse=reverse: f(*a, reverse),
            (gx, args["h0"], args["c0"], args["w_hh"], args["b_hh"], args["w_hr"]))


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(cell):
    args = make_layer(cell, 3, 2, 3, 5, torch.float32, proj=3 if cell == R.LSTM else 0)
    gx = torch.nn.functional.linear(args["x"], args["w_ih"], args["b_ih"]).detach().requires_grad_()
    for lengths in (None, torch.tensor([3, 1])):
        fwd_args = (gx, args["h0"], args["c0"], args["w_hh"], args["b_hh"], args["w_hr"], lengths,
                    cell, False, True)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_fwd.default, fwd_args)
        y, h, c, hs, ws = torch.ops.rnnkernels.recurrence_fwd(*fwd_args)
        bwd_args = (torch.randn_like(y), torch.randn_like(h),
                    torch.randn_like(c) if cell == R.LSTM else None, args["c0"], args["w_hh"],
                    args["w_hr"], lengths, hs, ws, cell, False)
        bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_bwd.default, bwd_args)


def test_non_contiguous_input():
    args = make_layer(R.LSTM, 5, 4, 6, 8, torch.float64)
    x = torch.randn(4, 5, 12, dtype=torch.float64).transpose(0, 1)[..., ::2]
    assert not x.is_contiguous()
    y, (h, c) = rnnkernels.ops.lstm(x, (args["h0"], args["c0"]), args["w_ih"], args["w_hh"],
                                    args["b_ih"], args["b_hh"])
    ry, rh, rc = reference_layer(x, args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                                 args["b_ih"], args["b_hh"], None, None, R.LSTM, False)
    assert_close(y, ry, torch.float64)
    assert_close(c, rc, torch.float64)


def test_no_grad_forward_matches():
    args = make_layer(R.GRU, 6, 3, 4, 10, torch.float32)
    with torch.no_grad():
        y0, h0 = rnnkernels.ops.gru(args["x"], args["h0"], args["w_ih"], args["w_hh"], args["b_ih"],
                                    args["b_hh"])
    y1, h1 = rnnkernels.ops.gru(args["x"], args["h0"], args["w_ih"], args["w_hh"], args["b_ih"],
                                args["b_hh"])
    torch.testing.assert_close(y0, y1.detach(), atol=0, rtol=0)
    torch.testing.assert_close(h0, h1.detach(), atol=0, rtol=0)


def test_backward_after_no_save_raises():
    args = make_layer(R.RNN_TANH, 3, 2, 3, 4, torch.float32)
    gx = torch.randn(3, 2, 4, requires_grad=True)
    y, *_ = torch.ops.rnnkernels.recurrence_fwd(gx, args["h0"], None, args["w_hh"], None, None,
                                                None, R.RNN_TANH, False, False)
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()


@pytest.mark.parametrize("cell", [R.LSTM, R.RNN_TANH])
def test_gate_math_over_the_float_range(cell):
    """The kernels' own float exp / sigmoid / tanh (csrc/cpu/recurrence.cpp) against float64 over
    tiny, ordinary, saturating and overflowing pre-activations, NaN and +-Inf: one step with
    W_hh = 0 is the cell's pointwise function of gx alone."""
    G = R.NUM_GATES[cell]
    H = 48
    mags = torch.cat([torch.logspace(-9, 2.3, 400), torch.tensor([0.0, 1e30, float("inf")])])
    vals = torch.cat([mags, -mags, torch.tensor([float("nan")])])
    vals = vals[torch.randperm(vals.numel())]
    B = (vals.numel() * G + G * H - 1) // (G * H)
    gx = torch.cat([vals.repeat(G), torch.randn(B * G * H)])[: B * G * H].view(1, B, G * H)
    h0 = torch.zeros(B, H)
    c0 = torch.randn(B, H) if cell == R.LSTM else None
    w = torch.zeros(G * H, H)
    y, _, c, _, _ = torch.ops.rnnkernels.recurrence_fwd(gx, h0, c0, w, None, None, None, cell,
                                                        False, False)
    g = gx[0].double()
    if cell == R.LSTM:
        i, f, gg, o = (t.view(B, H) for t in g.view(B, 4, H).unbind(1))
        c_ref = torch.sigmoid(f) * c0.double() + torch.sigmoid(i) * torch.tanh(gg)
        y_ref = torch.sigmoid(o) * torch.tanh(c_ref)
        torch.testing.assert_close(c.double(), c_ref, **tol(torch.float32), equal_nan=True)
    else:
        y_ref = torch.tanh(g)
    torch.testing.assert_close(y[0].double(), y_ref, **tol(torch.float32), equal_nan=True)


def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for is a header template: compiled without -fopenmp, every parallel region
    of our kernels silently runs on one thread. The extension must call into OpenMP."""
    from pathlib import Path

    import rnnkernels._C

    assert b"GOMP_parallel" in Path(rnnkernels._C.__file__).read_bytes()


@pytest.mark.parametrize("cell", CELLS)
def test_functional_forms_take_an_empty_batch(cell):
    """ops.lstm / gru / rnn with B = 0 (as torch.nn takes it): empty outputs and states, with
    gradients (zeros) for the weights; one step or several, with and without gradients."""
    H, I = 5, 3
    G = R.NUM_GATES[cell]
    for T in (1, 4):
        x = torch.randn(T, 0, I, dtype=torch.float64, requires_grad=True)
        w_ih = torch.randn(G * H, I, dtype=torch.float64, requires_grad=True)
        w_hh = torch.randn(G * H, H, dtype=torch.float64, requires_grad=True)
        h0 = torch.zeros(0, H, dtype=torch.float64)
        for grad in (False, True):  # the graph of the last call is differentiated below
            with torch.set_grad_enabled(grad):
                if cell == R.LSTM:
                    y, (h, c) = rnnkernels.ops.lstm(x, (h0, h0), w_ih, w_hh)
                    assert c.shape == (0, H)
                elif cell in (R.GRU, R.GRU_RESET_BEFORE):
                    y, h = rnnkernels.ops.gru(x, h0, w_ih, w_hh, reset_after=cell == R.GRU)
                else:
                    y, h = rnnkernels.ops.rnn(x, h0, w_ih, w_hh, nonlinearity="tanh"
                                              if cell == R.RNN_TANH else "relu")
            assert y.shape == (T, 0, H) and h.shape == (0, H)
        gx, gi, gh = torch.autograd.grad(y.sum() + h.sum(), (x, w_ih, w_hh))
        assert gx.shape == x.shape and not gi.any() and not gh.any()
