"""Linear scan h_t = a_t h_{t-1} + b_t: the reference against a closed form, the C++ CPU op and
the Triton kernels against the reference (outputs and every gradient), gradcheck, opcheck,
compile, chunked == one pass, bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import rnnkernels
from rnnkernels import _kernels
from rnnkernels.ops import linear_scan
from rnnkernels.reference import linear_scan_reference


def make_inputs(batch=2, channels=3, T=9, dtype=torch.float64, initial_state=True):
    """Decays in (0.5, 1) as in diagonal SSMs, inputs and initial state random."""
    return (0.5 + 0.5 * torch.rand(batch, channels, T)).to(dtype), \
        torch.randn(batch, channels, T, dtype=dtype), \
        (torch.randn(batch, channels, dtype=dtype) if initial_state else None)


def run_with_grads(fn, a, b, h0):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, b, h0)]
    h = fn(*leaves)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (h.double() * w).sum().backward()
    return h, [t.grad if t is not None else None for t in leaves]


def check(a, b, h0, dtype=None):
    h, grads = run_with_grads(linear_scan, a, b, h0)
    exact = [t.double() if t is not None else None for t in (a, b, h0)]
    h_r, grads_r = run_with_grads(linear_scan_reference, *exact)
    assert h.dtype == a.dtype
    assert_close(h, h_r, dtype, "h")
    for name, g, g_r in zip(("a", "b", "initial_state"), grads, grads_r):
        if g_r is not None:
            assert_close(g, g_r, dtype, f"grad of {name}", scale=4.0)


def test_reference_matches_closed_form():
    a, b, h0 = make_inputs()
    cum = torch.cumprod(a, -1)
    # h_t = prod_{s<=t} a_s h0 + sum_{s<=t} (prod_{s<r<=t} a_r) b_s
    expected = cum * h0[..., None] + torch.stack(
        [(b[..., : t + 1] * cum[..., t : t + 1] / cum[..., : t + 1]).sum(-1)
         for t in range(a.shape[-1])], -1)
    torch.testing.assert_close(linear_scan_reference(a, b, h0), expected)


# The CPU kernel steps blocks of rows (8 in float64, 16 in float32 with AVX-512) through chunks
# of 64 steps: shapes with partial and whole blocks, one chunk exactly, and a partial last chunk.
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 9), (3, 17, 40), (1, 8, 64), (2, 9, 150)])
@pytest.mark.parametrize("initial_state", [True, False])
def test_cpu_matches_reference_float64(shape, initial_state):
    check(*make_inputs(*shape, initial_state=initial_state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 30), (1, 16, 128), (2, 17, 150)])
def test_cpu_low_precision(dtype, shape):
    check(*make_inputs(*shape, dtype=dtype), dtype=dtype)


def test_cpu_non_contiguous():
    a, b, h0 = make_inputs(2, 4, 11)
    a_t, b_t = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (a, b))
    assert not a_t.is_contiguous()
    check(a_t, b_t, h0[:, :])


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_deterministic_across_thread_counts(threads):
    """Bit for bit the single-thread result, forward and backward, with the threads taking the
    256 row blocks one at a time, more threads than cores included."""
    a, b, h0 = make_inputs(batch=2, channels=2048, T=32, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        h_one, grads_one = run_with_grads(linear_scan, a, b, h0)
        torch.set_num_threads(threads)
        h_many, grads_many = run_with_grads(linear_scan, a, b, h0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(h_one, h_many)
    for one, many in zip(grads_one, grads_many):
        assert torch.equal(one, many)


def test_empty_batch():
    """batch = 0, as torch's own ops take it: an empty h and empty gradients."""
    a, b, h0 = make_inputs(batch=0)
    h, grads = run_with_grads(linear_scan, a, b, h0)
    assert h.shape == (0, 3, 9)
    assert [g.shape for g in grads] == [a.shape, b.shape, h0.shape]


def test_chunked_equals_one_pass():
    a, b, h0 = make_inputs(2, 3, 20)
    h, grads = run_with_grads(linear_scan, a, b, h0)

    def two_parts(a, b, h0):
        first = linear_scan(a[..., :8], b[..., :8], h0)
        return torch.cat([first, linear_scan(a[..., 8:], b[..., 8:], first[..., -1])], -1)

    h2, grads2 = run_with_grads(two_parts, a, b, h0)
    torch.testing.assert_close(h2, h)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g)


def test_gradcheck_float64():
    a, b, h0 = (t.requires_grad_() for t in make_inputs(2, 3, 6))
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))
    assert torch.autograd.gradcheck(linear_scan, (a, b, None))


def test_opcheck_cpu_ops():
    a, b, h0 = (t.requires_grad_() for t in make_inputs(2, 3, 6))
    torch.library.opcheck(torch.ops.rnnkernels.linear_scan_fwd.default, (a, b, h0))
    torch.library.opcheck(torch.ops.rnnkernels.linear_scan_fwd.default, (a, b, None))
    h = torch.ops.rnnkernels.linear_scan_fwd(a, b, h0).detach()
    plain = [t.detach() for t in (a, h0)]
    torch.library.opcheck(torch.ops.rnnkernels.linear_scan_bwd.default,
                          (torch.randn_like(h), plain[0], h, plain[1]))


def test_opcheck_cpu_ops_strided_inputs():
    """Permuted a and initial state and an expanded a: the fake kernels give the kernels'
    contiguous outputs, not the strides of the inputs."""
    a, b, h0 = make_inputs(2, 3, 6)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    h0_t = h0.t().contiguous().t().requires_grad_()
    a_x = a[:1, :, :1].expand(2, 3, 6)
    for args in ((a_t, b, h0_t), (a_x, b, None)):
        torch.library.opcheck(torch.ops.rnnkernels.linear_scan_fwd.default, args)
    h = torch.ops.rnnkernels.linear_scan_fwd(a_t, b, h0_t).detach()
    torch.library.opcheck(torch.ops.rnnkernels.linear_scan_bwd.default,
                          (torch.randn_like(h), a_t.detach(), h, h0_t.detach()))


def test_compile_fullgraph():
    a, b, h0 = (t.requires_grad_() for t in make_inputs(2, 3, 6, dtype=torch.float32))

    def fn(a, b, h0):
        return linear_scan(a.sigmoid(), b, h0).square().sum()

    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(a, b, h0)
    grads = torch.autograd.grad(loss, (a, b, h0))
    grads_e = torch.autograd.grad(fn(a, b, h0), (a, b, h0))
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


@pytest.mark.skipif(not _kernels.triton_interpreted(),
                    reason="needs TRITON_INTERPRET=1 (set by tools/test.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 9, 70)])
def test_triton_interpreted_matches_reference(dtype, shape):
    """T = 70 spans two tiles of the kernel's 64 steps; 18 rows span two programs of 16."""
    with rnnkernels.use_backend("triton"):
        check(*make_inputs(*shape, dtype=dtype), dtype=dtype)
        check(*make_inputs(*shape, dtype=dtype, initial_state=False), dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu(dtype):
    a, b, h0 = (t.cuda() for t in make_inputs(4, 33, 1000, dtype=dtype))
    with rnnkernels.use_backend("triton"):
        check(a, b, h0, dtype=dtype)
        from rnnkernels.triton import linear_scan as T

        a.requires_grad_()
        torch.library.opcheck(T.linear_scan_fwd_triton, (a, b, h0))
        loss = torch.compile(lambda a: linear_scan(a, b, h0).sum(), fullgraph=True)(a)
        torch.testing.assert_close(loss, linear_scan(a, b, h0).sum())


BAD = [
    ("a_not_tensor", ([1.0], None, None), TypeError, "a must be a torch.Tensor"),
    ("a_2d", (torch.rand(2, 3), None, None), ValueError, "a must have 3 dimensions"),
    ("a_integer", (torch.ones(2, 3, 4, dtype=torch.int64), None, None), TypeError,
     "a must be a floating"),
    ("a_empty", (torch.rand(2, 3, 0), None, None), ValueError, "at least one time step"),
    ("b_shape", (None, torch.randn(2, 3, 5), None), ValueError, "b must have shape"),
    ("b_dtype", (None, torch.randn(2, 3, 4, dtype=torch.float64), None), TypeError,
     "b must have dtype torch.float32"),
    ("b_device", (None, torch.randn(2, 3, 4, device="meta"), None), ValueError,
     "b must be on device cpu"),
    ("initial_state_shape", (None, None, torch.randn(2, 4)), ValueError,
     "initial_state must have shape"),
]


@pytest.mark.parametrize("name,args,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, args, error, match):
    good = (torch.rand(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3))
    args = [g if x is None else x for x, g in zip(args, good)]
    with pytest.raises(error, match=match):
        linear_scan(*args)
