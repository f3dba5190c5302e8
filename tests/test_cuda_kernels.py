"""Our CUDA kernels (csrc/cuda/, registered by csrc/cuda_bind.cpp) against the float64
references: the recurrence (every cell, both paths: the persistent cooperative kernel and the
batched per-step path), the selective scan and the linear scan, forward and every gradient, on
the CPU tests' edge-case shapes, on shapes aimed at the kernels' tiling and at real sizes; opcheck
of every op and torch.compile(fullgraph=True). CUDA takes float32, float16 and bfloat16; every
test needs a GPU (the cuda marker). The scan modules are imported inside the tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_recurrence_cpu import CELLS, SHAPES, make_layer

import rnnkernels
from rnnkernels import _backend
from rnnkernels.ops import recurrence as R
from rnnkernels.ops.recurrence import reference_layer

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.device("cuda")


def assert_cuda_backend(family: str, dtype: torch.dtype) -> None:
    """The build registered the CUDA kernel of `family` and the dispatcher picks it."""
    with rnnkernels.use_backend("cuda"):
        assert _backend.choose(family, CUDA, dtype) == "cuda"


# ================================================================== recurrence

@pytest.fixture(params=["persistent", "batched"])
def cuda_path(request, monkeypatch):
    """Both CUDA decompositions: the persistent cooperative kernel (taken wherever the weights fit
    on chip; the projected LSTM and the reset-before GRU always take the batched path) and the
    batched path (per step a cuBLAS GEMM and one fused pointwise kernel)."""
    monkeypatch.setenv("RNNKERNELS_CUDA_RECURRENCE", request.param)
    return request.param


def check_recurrence(cell, shape, dtype, proj=0, lengths=None, reverse=False, bias=True,
                     grad_scale=4.0):
    """The CUDA op on random inputs rounded to dtype against the float64 reference of the same
    rounded inputs: y, h_n, c_n and the gradient of every input. The ReLU RNN's gradients are
    compared in float32 only: 16-bit rounding of gx moves some pre-activations across zero, where
    the derivative jumps from 0 to 1, so elementwise gradients differ by O(1) at those units."""
    T, B, I, H = shape
    base = make_layer(cell, T, B, I, H, torch.float64, proj, bias, requires_grad=False)
    args = {k: (v.to(CUDA, dtype).requires_grad_() if v is not None else None)
            for k, v in base.items()}
    ref_args = {k: (v.detach().double().requires_grad_() if v is not None else None)
                for k, v in args.items()}
    if lengths is not None:
        lengths = lengths.to(CUDA)
    gx = F.linear(args["x"], args["w_ih"], args["b_ih"])
    y, h, c = R.recurrence(gx, args["h0"], args["c0"], args["w_hh"], args["b_hh"], args["w_hr"],
                           lengths, cell, reverse, "cuda")
    outs = (y, h, c if cell == R.LSTM else None)
    ref = reference_layer(ref_args["x"], ref_args["h0"], ref_args["c0"], ref_args["w_ih"],
                          ref_args["w_hh"], ref_args["b_ih"], ref_args["b_hh"], ref_args["w_hr"],
                          lengths, cell, reverse)
    for name, o, r in zip(("y", "h_n", "c_n"), outs, ref):
        if r is not None:
            assert o.dtype == dtype and o.device.type == CUDA.type
            assert_close(o, r, dtype, msg=f"{name} of cell {cell}")
    if cell == R.RNN_RELU and dtype != torch.float32:
        return
    grads_out = [torch.randn_like(r) for r in ref if r is not None]
    leaves = [k for k, v in args.items() if v is not None]
    got = torch.autograd.grad([o for o, r in zip(outs, ref) if r is not None],
                              [args[k] for k in leaves], [g.to(dtype) for g in grads_out])
    want = torch.autograd.grad([r for r in ref if r is not None], [ref_args[k] for k in leaves],
                               grads_out)
    for k, a, b in zip(leaves, got, want):
        assert a.dtype == dtype
        assert_close(a, b, dtype, msg=f"grad {k} of cell {cell}", scale=grad_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cell", CELLS)
def test_recurrence(cell, shape, dtype, cuda_path):
    check_recurrence(cell, shape, dtype)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_recurrence_lengths_and_reverse(cell, reverse, cuda_path):
    check_recurrence(cell, (7, 4, 3, 9), torch.float32, lengths=torch.tensor([3, 7, 1, 5]),
                     reverse=reverse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, torch.tensor([2, 5, 4])])
def test_lstm_projection(dtype, reverse, lengths):
    check_recurrence(R.LSTM, (5, 3, 4, 11), dtype, proj=6, lengths=lengths, reverse=reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrence_no_bias(cell, cuda_path):
    check_recurrence(cell, (4, 3, 5, 6), torch.float32, bias=False)


# (T, B, I, H) aimed at the persistent kernel's plan (csrc/cuda/launch_plan.h): the tensor-core
# path from B = 8 in 16-bit storage; several staged batch tiles (B > 32); every WMMA tile height
# (8, 16, 32 resident rows); operand chunks (G*H > 1024 in the backward); a cooperative grid
# beyond one cluster (H = 1100: about one block per multiprocessor).
PERSISTENT_SHAPES = [(6, 8, 5, 24), (4, 40, 7, 40), (3, 16, 9, 300), (3, 9, 4, 1100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PERSISTENT_SHAPES)
@pytest.mark.parametrize("cell", [R.LSTM, R.GRU, R.RNN_TANH, R.RNN_RELU])
def test_recurrence_persistent_plans(cell, shape, dtype):
    check_recurrence(cell, shape, dtype, lengths=torch.randint(1, shape[0] + 1, (shape[1],)),
                     reverse=cell == R.GRU)


def test_recurrence_real_size(cuda_path):
    """The issue's LSTM size, shorter (T = 64, the tolerances' horizon)."""
    check_recurrence(R.LSTM, (64, 16, 256, 768), torch.bfloat16, grad_scale=8.0)


def test_recurrence_too_large_for_chip():
    """fp32 weights of H = 2048 (64 MB) cannot stay on chip: the batched path takes them."""
    check_recurrence(R.LSTM, (8, 4, 16, 2048), torch.float32, grad_scale=8.0)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrence_opcheck(cell, cuda_path):
    base = make_layer(cell, 3, 2, 3, 5, torch.float64, proj=3 if cell == R.LSTM else 0,
                      requires_grad=False)
    args = {k: (v.to(CUDA, torch.float32) if v is not None else None) for k, v in base.items()}
    gx = F.linear(args["x"], args["w_ih"], args["b_ih"]).requires_grad_()
    for lengths in (None, torch.tensor([3, 1], device=CUDA)):
        fwd = (gx, args["h0"], args["c0"], args["w_hh"], args["b_hh"], args["w_hr"], lengths, cell,
               False, True)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_fwd.default, fwd)
        y, h, c, hs, ws = torch.ops.rnnkernels.recurrence_fwd(*fwd)
        bwd = (torch.randn_like(y), torch.randn_like(h),
               torch.randn_like(c) if cell == R.LSTM else None, args["c0"], args["w_hh"],
               args["w_hr"], lengths, hs, ws, cell, False)
        bwd = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_bwd.default, bwd)


def test_recurrence_compile_fullgraph():
    assert_cuda_backend("recurrence", torch.float32)
    lstm = rnnkernels.nn.LSTM(8, 16, num_layers=2, batch_first=True).to(CUDA)
    x = torch.randn(3, 5, 8, device=CUDA, requires_grad=True)
    with rnnkernels.use_backend("cuda"):
        eager = lstm(x)[0]
        compiled = torch.compile(lstm, fullgraph=True)(x)[0]
        g_eager = torch.autograd.grad(eager.square().sum(), x)[0]
        g_compiled = torch.autograd.grad(compiled.square().sum(), x)[0]
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_runs_cuda(dtype):
    for family in ("recurrence", "selective_scan", "linear_scan"):
        assert_cuda_backend(family, dtype)


# ================================================================== selective scan

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def scan_inputs(batch, dim, L, N, form="variable", groups=1, D=True, z=True, delta_bias=True,
                initial_state=False, dtype=torch.float32):
    """Random inputs on the GPU in mamba_ssm's ranges (as tests/test_selective_scan.py):
    activations and variable B/C in dtype, the parameters in float32. form: "fixed" (dim, N),
    "variable" (batch, N, L) or "grouped" (batch, groups, N, L)."""
    f32 = torch.float32
    shapes = {"fixed": (dim, N), "variable": (batch, N, L), "grouped": (batch, groups, N, L)}

    def r(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=CUDA) * scale + shift).to(dt)

    bc = f32 if form == "fixed" else dtype
    return {
        "u": r(batch, dim, L),
        "delta": r(batch, dim, L, scale=0.5, shift=-1.0),
        "A": -(0.2 + torch.rand(dim, N, device=CUDA)),
        "B": r(*shapes[form], dt=bc),
        "C": r(*shapes[form], dt=bc),
        "D": r(dim, dt=f32) if D else None,
        "z": r(batch, dim, L) if z else None,
        "delta_bias": r(dim, dt=f32, scale=0.3) if delta_bias else None,
        "initial_state": r(batch, dim, N, dt=f32) if initial_state else None,
    }


def check_scan(inputs, softplus=True, grad_scale=1.0, msg=""):
    """rnnkernels.ops.selective_scan on the CUDA backend against the float64 reference of the
    same inputs: out, the last state and the gradient of every input."""
    from rnnkernels.ops import selective_scan
    from rnnkernels.reference import selective_scan_reference

    dtype = inputs["u"].dtype
    assert_cuda_backend("selective_scan", dtype)
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in inputs.items()}
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None)
             for k, v in inputs.items()}

    def call(fn, t):
        return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                  softplus, True, initial_state=t["initial_state"])

    with rnnkernels.use_backend("cuda"):
        out, last = call(selective_scan, leaves)
    out_r, last_r = call(selective_scan_reference, exact)
    assert out.dtype == dtype and out.device.type == CUDA.type
    assert_close(out, out_r, dtype, f"out {msg}")
    assert_close(last, last_r, dtype, f"last_state {msg}")
    w_out, w_last = torch.randn_like(out_r), torch.randn_like(last_r)
    names = [k for k in ARGS if leaves[k] is not None]
    got = torch.autograd.grad((out.double() * w_out).sum() + (last.double() * w_last).sum(),
                              [leaves[k] for k in names])
    want = torch.autograd.grad((out_r * w_out).sum() + (last_r * w_last).sum(),
                               [exact[k] for k in names])
    for k, a, b in zip(names, got, want):
        assert a.dtype == leaves[k].dtype, k
        assert_close(a, b, dtype, f"grad of {k} {msg}", scale=grad_scale)


@pytest.fixture
def scan_chunk(monkeypatch):
    """Sets the CUDA backend's chunk size (the checkpoint spacing) for the test."""
    from rnnkernels.ops import selective_scan as module

    return lambda size: monkeypatch.setitem(module.CHUNK_SIZE, "cuda", size)


def test_selective_scan_cpu_cases(scan_chunk):
    """Every case of the CPU tests, in float32, with several chunks and the last one partial."""
    from test_selective_scan import CASES

    scan_chunk(4)
    for case in CASES:
        batch, dim, L, N, form, groups, D, z, bias, softplus, x0 = case
        check_scan(scan_inputs(batch, dim, L, N, form, groups, D, z, bias, x0), softplus,
                   msg=str(case))


# (batch, dim, L, N, form, groups, chunk) aimed at the kernels' layout (launch_plan.h): states per
# thread 1, 2, 4, 8 (N = 16, 48, 100, 256); partly filled channel groups and blocks; blocks that
# span several groups of B / C; several tiles of 64 steps within and across chunks; a chunk that
# does not fit in one segment (N = 256 at L = 1000).
LAYOUT_CASES = [
    (2, 130, 70, 16, "variable", 1, 64),
    (1, 9, 50, 48, "grouped", 3, 16),
    (2, 3, 40, 100, "grouped", 3, 8),
    (1, 5, 150, 256, "fixed", 1, 64),
    (1, 2, 1000, 256, "variable", 1, 1000),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_selective_scan_layouts(case, scan_chunk):
    batch, dim, L, N, form, groups, chunk = case
    scan_chunk(chunk)
    check_scan(scan_inputs(batch, dim, L, N, form, groups, initial_state=True), grad_scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["fixed", "variable", "grouped"])
def test_selective_scan_half_precision(form, dtype, scan_chunk):
    scan_chunk(8)
    check_scan(scan_inputs(2, 6, 20, 16, form, 3, initial_state=True, dtype=dtype),
               grad_scale=4.0)


@pytest.mark.parametrize("form", ["fixed", "variable", "grouped"])
def test_selective_scan_real_size(form):
    """Mamba's shapes at the default chunk size (bfloat16 activations, float32 parameters)."""
    check_scan(scan_inputs(2, 256, 2048, 16, form, 4, dtype=torch.bfloat16), grad_scale=8.0)


def test_selective_scan_non_contiguous(scan_chunk):
    scan_chunk(4)
    inputs = scan_inputs(2, 5, 9, 8, "grouped", 5)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2)
                   if v is not None and v.dim() > 1 else v) for k, v in inputs.items()}
    sliced = dict(strided)
    sliced["u"] = torch.randn(2, 10, 9, device=CUDA)[:, ::2]  # unit stride in L, channel stride 2
    assert not strided["u"].is_contiguous() and not sliced["u"].is_contiguous()
    check_scan(strided)
    check_scan(sliced)


def test_selective_scan_opcheck():
    inputs = scan_inputs(2, 4, 5, 3, "grouped", 2, initial_state=True)
    args = [inputs[k] for k in ARGS[:8]]
    fwd = (*args, True, inputs["initial_state"], 2, True)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_fwd.default, fwd)
    out, last, ckpt = torch.ops.rnnkernels.selective_scan_fwd(*fwd)
    bwd = (torch.randn_like(out), torch.randn_like(last), *args, True, inputs["initial_state"],
           ckpt, 2)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_bwd.default, bwd)
    fixed = scan_inputs(1, 3, 6, 4, "fixed", D=False, z=False, delta_bias=False)
    fargs = [fixed[k] for k in ARGS[:8]]
    fwd = (*fargs, False, None, 4, True)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_fwd.default, fwd)
    out, last, ckpt = torch.ops.rnnkernels.selective_scan_fwd(*fwd)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_bwd.default,
                          (torch.randn_like(out), None, *fargs, False, None, ckpt, 4))
    # plain eager training's op, whose C++ autograd node calls the two above on the GPU
    leaves = [t.detach().requires_grad_() for t in (*args, inputs["initial_state"])]
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_autograd.default,
                          (*leaves[:8], True, leaves[8], 2))


def test_selective_scan_compile_fullgraph():
    from test_selective_scan import check_compile_matches_eager

    check_compile_matches_eager(scan_inputs(2, 4, 9, 4, initial_state=True), "cuda")


# ================================================================== linear scan

# (batch, channels, T, initial state): T around the warp's tile of 128 steps.
LINEAR_CASES = [(1, 1, 1, False), (2, 3, 127, True), (1, 5, 128, False), (3, 2, 129, True),
                (2, 33, 300, True), (1, 4, 1000, False)]


def check_linear(a, b, h0, grad_scale=1.0):
    from rnnkernels.ops import linear_scan
    from rnnkernels.reference import linear_scan_reference

    dtype = a.dtype
    assert_cuda_backend("linear_scan", dtype)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, b, h0)]
    exact = [t.detach().double().requires_grad_() if t is not None else None for t in (a, b, h0)]
    with rnnkernels.use_backend("cuda"):
        h = linear_scan(*leaves)
    h_r = linear_scan_reference(*exact)
    assert h.dtype == dtype and h.device.type == CUDA.type
    assert_close(h, h_r, dtype, "h")
    w = torch.randn_like(h_r)
    used = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad((h.double() * w).sum(), [leaves[i] for i in used])
    want = torch.autograd.grad((h_r * w).sum(), [exact[i] for i in used])
    for i, g, gr in zip(used, got, want):
        assert_close(g, gr, dtype, f"grad of {('a', 'b', 'initial_state')[i]}", scale=grad_scale)


def decays(*shape, dtype):
    """a in (0, 1), as in a stable linear SSM."""
    return torch.sigmoid(torch.randn(*shape, device=CUDA) + 1.0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_scan(case, dtype):
    batch, channels, T, initial = case
    a = decays(batch, channels, T, dtype=dtype)
    b = torch.randn(batch, channels, T, device=CUDA).to(dtype)
    h0 = torch.randn(batch, channels, device=CUDA).to(dtype) if initial else None
    check_linear(a, b, h0, grad_scale=1.0 if dtype == torch.float32 else 4.0)


def test_linear_scan_non_contiguous():
    a = decays(300, 2, 6, dtype=torch.float32).permute(1, 2, 0)   # time not the last stride
    b = torch.randn(2, 12, 300, device=CUDA)[:, ::2]              # channel stride 2
    assert not a.is_contiguous() and not b.is_contiguous()
    check_linear(a, b, torch.randn(2, 6, device=CUDA))


def test_linear_scan_opcheck():
    a = decays(2, 3, 130, dtype=torch.float32)
    b = torch.randn(2, 3, 130, device=CUDA)
    for h0 in (None, torch.randn(2, 3, device=CUDA)):
        torch.library.opcheck(torch.ops.rnnkernels.linear_scan_fwd.default, (a, b, h0))
        h = torch.ops.rnnkernels.linear_scan_fwd(a, b, h0)
        torch.library.opcheck(torch.ops.rnnkernels.linear_scan_bwd.default,
                              (torch.randn_like(h), a, h, h0))


def test_linear_scan_compile_fullgraph():
    from rnnkernels.ops import linear_scan

    a = decays(2, 3, 50, dtype=torch.float32).requires_grad_()
    b = torch.randn(2, 3, 50, device=CUDA, requires_grad=True)

    def fn(a, b):
        return linear_scan(a, b).square().sum()

    with rnnkernels.use_backend("cuda"):
        loss = torch.compile(fn, fullgraph=True)(a, b)
        grads = torch.autograd.grad(loss, (a, b))
        loss_e = fn(a, b)
        grads_e = torch.autograd.grad(loss_e, (a, b))
    torch.testing.assert_close(loss, loss_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)
