"""Selective scan: the reference against an independent closed form, the C++ CPU op against the
reference (every output, the last state and every gradient), gradcheck, opcheck, compile, the
chunked scan against one pass, mixed precision and dtype fallbacks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tol

import rnnkernels
from rnnkernels.ops import selective_scan
from rnnkernels.ops.selective_scan import CHUNK_SIZE, NARROW_STATE, WIDE_STATE_CHUNK, chunk_size
from rnnkernels.reference import selective_scan_reference

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch=2, dim=3, L=7, N=4, form="variable", groups=1, D=True, z=True,
                delta_bias=True, initial_state=False, dtype=torch.float64, param_dtype=None):
    """Random inputs in mamba_ssm's ranges: delta around softplus' knee, A negative, parameters
    in ``param_dtype`` (default: dtype). form: "fixed" (dim, N), "variable" (batch, N, L) or
    "grouped" (batch, groups, N, L)."""
    p = param_dtype or dtype
    shapes = {"fixed": (dim, N), "variable": (batch, N, L), "grouped": (batch, groups, N, L)}
    bc_dtype = p if form == "fixed" else dtype
    return {
        "u": torch.randn(batch, dim, L, dtype=dtype),
        "delta": (torch.randn(batch, dim, L) * 0.5 - 1.0).to(dtype),
        "A": -(0.2 + torch.rand(dim, N)).to(p),
        "B": torch.randn(shapes[form], dtype=bc_dtype),
        "C": torch.randn(shapes[form], dtype=bc_dtype),
        "D": torch.randn(dim, dtype=p) if D else None,
        "z": torch.randn(batch, dim, L, dtype=dtype) if z else None,
        "delta_bias": (0.3 * torch.randn(dim)).to(p) if delta_bias else None,
        "initial_state": torch.randn(batch, dim, N, dtype=p) if initial_state else None,
    }


def run_with_grads(fn, inputs, softplus=True, seed=1):
    """Runs fn (selective_scan or its reference) with return_last_state and backpropagates fixed
    random weights of out and last_state; returns (out, last_state, grads by name)."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in inputs.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                   leaves["D"], leaves["z"], leaves["delta_bias"], softplus, True,
                   initial_state=leaves["initial_state"])
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64)
    ((out.double() * w_out).sum() + (last.double() * w_last).sum()).backward()
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def check_against_reference(inputs, softplus=True, dtype=None, grad_scale=1.0):
    out, last, grads = run_with_grads(selective_scan, inputs, softplus)
    exact = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, exact, softplus)
    dtype = dtype or inputs["u"].dtype
    assert out.dtype == inputs["u"].dtype
    assert_close(out, out_r, dtype, "out")
    assert_close(last, last_r, dtype, "last_state")
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads_r[name], dtype, f"grad of {name}", scale=grad_scale)


# ------------------------------------------------------------------ the reference

def closed_form(u, delta, A, B, C, D, z, delta_bias, x0):
    """x_t = prod_{s<=t} a_s x0 + sum_{s<=t} exp(A (cum_t - cum_s)) dt_s B_s u_s, all at once."""
    dt = F.softplus(delta + delta_bias[:, None])                    # (b, d, L)
    cum = dt.cumsum(-1)
    dim = u.shape[1]
    Bc = B.repeat_interleave(dim // B.shape[1], dim=1)              # (b, d, N, L)
    Cc = C.repeat_interleave(dim // C.shape[1], dim=1)
    gap = cum[..., :, None] - cum[..., None, :]                     # (b, d, t, s)
    causal = torch.ones(u.shape[-1], u.shape[-1], dtype=torch.bool).tril()
    decay = torch.exp(gap[..., None] * A[None, :, None, None, :])   # (b, d, t, s, N)
    decay = decay * causal[..., None]
    drive = (dt * u)[..., None] * Bc.transpose(-1, -2)              # (b, d, s, N)
    x = (decay * drive[:, :, None]).sum(3) + torch.exp(cum[..., None] * A[:, None]) * x0[:, :, None]
    y = (x * Cc.transpose(-1, -2)).sum(-1) + D[:, None] * u
    return y * F.silu(z), x[:, :, -1]


def test_reference_matches_closed_form():
    inputs = make_inputs(batch=2, dim=4, L=6, N=3, form="grouped", groups=2,
                         initial_state=True)
    out, last = selective_scan_reference(*(inputs[k] for k in ARGS[:8]), delta_softplus=True,
                                         return_last_state=True,
                                         initial_state=inputs["initial_state"])
    out_c, last_c = closed_form(*(inputs[k] for k in ARGS))
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(last, last_c)


def test_reference_forms_agree():
    """Fixed B equals a variable B constant in time; variable equals grouped with G = 1."""
    inputs = make_inputs(form="fixed", dim=4)
    fixed = selective_scan_reference(*(inputs[k] for k in ARGS[:8]))
    batch, L = inputs["u"].shape[0], inputs["u"].shape[2]
    per_channel = {**inputs}
    # Channel d of a (batch, dim, N, L) grouped B reads group d: the same fixed row for every t.
    per_channel["B"] = inputs["B"][None, :, :, None].expand(batch, -1, -1, L)
    per_channel["C"] = inputs["C"][None, :, :, None].expand(batch, -1, -1, L)
    grouped = selective_scan_reference(*(per_channel[k] for k in ARGS[:8]))
    torch.testing.assert_close(fixed, grouped)


# ------------------------------------------------------------------ the C++ CPU op

CASES = [
    # (batch, dim, L, N, form, groups, D, z, delta_bias, softplus, initial_state)
    (1, 1, 1, 1, "fixed", 1, False, False, False, False, False),
    (2, 3, 1, 16, "variable", 1, True, True, True, True, True),
    (1, 5, 13, 4, "variable", 1, True, False, True, True, False),
    (2, 3, 9, 16, "fixed", 1, False, True, False, False, True),
    (2, 6, 11, 64, "grouped", 3, True, True, True, True, True),
    (3, 7, 10, 1, "grouped", 7, False, False, True, True, False),
    (1, 20, 9, 5, "grouped", 2, True, True, False, True, True),
    (2, 4, 8, 17, "variable", 1, True, True, True, False, False),
    (2, 18, 7, 7, "variable", 1, True, True, True, True, True),  # states 4 + 2 + 1 a pass
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_matches_reference_float64(case, monkeypatch):
    batch, dim, L, N, form, groups, D, z, bias, softplus, x0 = case
    monkeypatch.setitem(CHUNK_SIZE, "cpu", 4)  # several chunks, the last one partial
    inputs = make_inputs(batch, dim, L, N, form, groups, D, z, bias, x0)
    check_against_reference(inputs, softplus)


@pytest.mark.parametrize("form", ["fixed", "variable", "grouped"])
def test_cpu_default_chunk_long_sequence(form):
    """The production chunk size, with L past a whole number of chunks."""
    L = CHUNK_SIZE["cpu"] * 2 + 5
    inputs = make_inputs(batch=1, dim=9, L=L, N=16, form=form, groups=3, initial_state=True)
    check_against_reference(inputs)


@pytest.mark.parametrize("N, chunk", [
    (16, CHUNK_SIZE["cpu"]), (NARROW_STATE, CHUNK_SIZE["cpu"]),
    (NARROW_STATE + 1, max(CHUNK_SIZE["cpu"], WIDE_STATE_CHUNK["cpu"]))])
def test_cpu_chunk_by_state_size(N, chunk):
    """The CPU op saves the state every CHUNK_SIZE["cpu"] steps up to N = NARROW_STATE and every
    WIDE_STATE_CHUNK["cpu"] steps at least above (the checkpoints' memory grows with N / chunk):
    the checkpoints the forward keeps for the backward have ceil(L / chunk) * N values a row."""
    L = 2 * WIDE_STATE_CHUNK["cpu"] + 3
    inputs = make_inputs(batch=1, dim=3, L=L, N=N, form="variable", dtype=torch.float32)
    for k in ("u", "delta"):
        inputs[k].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selective_scan(*(inputs[k] for k in ARGS[:8]))
    checkpoints = saved[-1]  # saved last, after the inputs
    assert checkpoints.shape == (1, 3, -(-L // chunk) * N)
    assert chunk_size("triton", N) == CHUNK_SIZE["triton"]


@pytest.mark.parametrize("form", ["fixed", "variable", "grouped"])
def test_cpu_spans_of_several_chunks(form, monkeypatch):
    """Checkpoints every 24 steps inside 240-step spans (the steps a CPU task gathers and
    scatters at once: 256 rounded down to whole chunks), L = 517: two whole spans and a third
    of one whole chunk and a partial one."""
    monkeypatch.setitem(CHUNK_SIZE, "cpu", 24)
    inputs = make_inputs(batch=2, dim=19, L=517, N=5, form=form, groups=1, initial_state=True)
    check_against_reference(inputs)


@pytest.mark.parametrize("dim, groups", [(37, 1), (64, 2), (80, 1)])
def test_cpu_float32_whole_tiles(dim, groups):
    """float32 with whole 16-channel blocks and whole 16-step tiles (the kernels' in-register
    transpose and prefetch path), next to a partial block (37 = 16 + 16 + 5) and a partial
    tile (the last chunk's 21 steps), at the production chunk size. 80 channels: the backward
    splits a batch row's 5 blocks into 4 supers of 2, 2, 1 and 0 blocks (an empty super)."""
    L = CHUNK_SIZE["cpu"] * 2 + 21
    inputs = make_inputs(batch=2, dim=dim, L=L, N=16, form="grouped", groups=groups,
                         initial_state=True, dtype=torch.float32)
    check_against_reference(inputs)


def test_cpu_streamed_outputs_equal_per_row_runs():
    """float32 outputs of 1 MB and more (out, grad_u, grad_delta, grad_z) are stored
    non-temporally (lanes::kStreamBytes): bit for bit what runs of one batch row each, below the
    size, store plainly; the gradients summed in another order agree to rounding."""
    inputs = make_inputs(batch=4, dim=64, L=1024, N=4, form="variable", dtype=torch.float32)
    assert inputs["u"].numel() * inputs["u"].element_size() >= 1 << 20
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(inputs["u"].shape, generator=g)

    def run(rows):
        leaves = {k: v[rows].clone().requires_grad_() if k in ("u", "delta", "B", "C", "z")
                  else v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        out = selective_scan(*(leaves.get(k) for k in ARGS[:8]), True)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out[rows])
        return out, dict(zip(leaves, grads))

    out, grads = run(slice(None))
    rows = [run(slice(b, b + 1)) for b in range(4)]
    assert torch.equal(out, torch.cat([r[0] for r in rows]))
    for k in ("u", "delta", "z"):
        assert torch.equal(grads[k], torch.cat([r[1][k] for r in rows])), k
    # B and C: summed over channels in supers, which a batch row alone splits otherwise
    for k in ("B", "C"):
        torch.testing.assert_close(grads[k], torch.cat([r[1][k] for r in rows]))
    for k in ("A", "D", "delta_bias"):
        torch.testing.assert_close(grads[k], sum(r[1][k] for r in rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kept_buffers_never_reach_results(threads):
    """The CPU kernels' lane buffers are kept per thread from one call to the next
    (lanes::FreedBuffers), with what the last call left in them: after a call whose every input
    is NaN, the same shape (a partial block, a partial span) gives bit for bit what it gave
    before it, out, last state and every gradient."""
    inputs = make_inputs(batch=2, dim=37, L=CHUNK_SIZE["cpu"] * 9 + 21, N=16, form="grouped",
                         groups=1, initial_state=True, dtype=torch.float32)
    poisoned = {k: None if v is None else torch.full_like(v, math.nan) for k, v in inputs.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = run_with_grads(selective_scan, inputs)
        assert run_with_grads(selective_scan, poisoned)[0].isnan().all()
        again = run_with_grads(selective_scan, inputs)
    finally:
        torch.set_num_threads(before)
    for x, y in zip([*first[:2], *first[2].values()], [*again[:2], *again[2].values()]):
        assert torch.equal(x, y)


def test_cpu_results_do_not_depend_on_thread_count():
    """Every sum of the CPU backward runs in a fixed order, whichever thread runs a super or a
    piece of the grouped dB / dC reductions: 1, 2 and 3 threads give bit for bit the same out,
    last state and gradients (several (batch row, group) pairs, each with several supers,
    L of several reduction pieces and a partial one)."""
    inputs = make_inputs(batch=3, dim=70, L=100, N=6, form="grouped", groups=2,
                         initial_state=True, dtype=torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_with_grads(selective_scan, inputs))
    finally:
        torch.set_num_threads(before)
    first = [*results[0][:2], *results[0][2].values()]
    for other in results[1:]:
        for x, y in zip(first, [*other[:2], *other[2].values()]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("L", [64, 70])
def test_cpu_forced_streaming_changes_no_value(L, monkeypatch):
    """RNNKERNELS_CPU_STREAM=1 (non-temporal stores of whole aligned tiles, whatever the size;
    rows of 70 steps are not aligned) gives bit for bit the results of =0 (plain stores): out,
    last state and every gradient."""
    inputs = make_inputs(batch=2, dim=37, L=L, N=4, form="grouped", groups=1,
                         initial_state=True, dtype=torch.float32)
    results = []
    for value in ("1", "0"):
        monkeypatch.setenv("RNNKERNELS_CPU_STREAM", value)
        out, last, grads = run_with_grads(selective_scan, inputs)
        results.append([out, last, *grads.values()])
    for streamed, plain in zip(*results):
        assert torch.equal(streamed, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_low_precision(dtype, monkeypatch):
    """Half-precision activations with float32 parameters, as in mamba_ssm's Mamba block."""
    monkeypatch.setitem(CHUNK_SIZE, "cpu", 8)
    inputs = make_inputs(batch=2, dim=6, L=20, N=16, initial_state=True, dtype=dtype,
                         param_dtype=torch.float32)
    check_against_reference(inputs, dtype=dtype, grad_scale=4.0)


def test_cpu_non_contiguous_inputs():
    inputs = make_inputs(batch=2, dim=5, L=9, N=8, form="grouped", groups=5)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and
                   v.dim() > 1 else v) for k, v in inputs.items()}
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    check_against_reference(strided)


@pytest.mark.parametrize("form", ["fixed", "variable", "grouped"])
def test_empty_batch(form):
    """batch = 0 (a filtered or bucketed batch may come out empty; torch's own ops take it):
    empty out and last state, and zero gradients for the parameters, with every option."""
    inputs = make_inputs(batch=0, dim=4, form=form, groups=2, initial_state=True)
    out, last, grads = run_with_grads(selective_scan, inputs)
    assert out.shape == (0, 4, 7) and last.shape == (0, 4, 4)
    assert grads.keys() == {k for k, v in inputs.items() if v is not None}
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and not g.any(), name


def test_chunked_scan_equals_one_pass():
    """Scanning [0, 7) then [7, 19) from the first part's last state gives the one-pass result,
    outputs and gradients, with gradients flowing through the hand-over state."""
    inputs = make_inputs(batch=2, dim=4, L=19, N=8, initial_state=True)
    out, last, grads = run_with_grads(selective_scan, inputs)

    def two_parts(u, delta, A, B, C, D, z, delta_bias, softplus, last_state, initial_state):
        first, mid = selective_scan(u[..., :7], delta[..., :7], A, B[..., :7], C[..., :7], D,
                                    z[..., :7], delta_bias, softplus, True,
                                    initial_state=initial_state)
        second, end = selective_scan(u[..., 7:], delta[..., 7:], A, B[..., 7:], C[..., 7:], D,
                                     z[..., 7:], delta_bias, softplus, True, initial_state=mid)
        return torch.cat([first, second], -1), end

    out2, last2, grads2 = run_with_grads(two_parts, inputs)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(last2, last)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=name)


def check_one_output_unused(inputs, used):
    """With return_last_state, a loss of ``used`` ("out" or "last_state") alone: the other
    output's gradient reaches the backward as None (no materialised zeros); every gradient as
    the reference's."""

    def grads_of(fn, tensors):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()
                  if v is not None}
        out, last = fn(*(leaves.get(k) for k in ARGS[:8]), True, True,
                       initial_state=leaves["initial_state"])
        loss = (out if used == "out" else last).double().square().sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        # the last state does not depend on C, D and z: None from the reference, zeros from ours
        return {k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(leaves.items(), grads)}

    grads = grads_of(selective_scan, inputs)
    expected = grads_of(selective_scan_reference,
                        {k: (v.double() if v is not None else None) for k, v in inputs.items()})
    for name, grad in grads.items():
        assert_close(grad, expected[name], inputs["u"].dtype, f"grad of {name}")


@pytest.mark.parametrize("used", ["out", "last_state"])
def test_gradients_with_one_output_unused(used):
    check_one_output_unused(make_inputs(batch=2, dim=5, L=9, N=4, initial_state=True), used)


def test_gradcheck_float64():
    inputs = make_inputs(batch=1, dim=2, L=5, N=3, form="grouped", groups=2, initial_state=True)
    names = [k for k in ARGS if inputs[k] is not None]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                              kw["delta_bias"], True, True, initial_state=kw["initial_state"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CHUNK_SIZE, "cpu", 2)
        assert torch.autograd.gradcheck(
            fn, [inputs[k].requires_grad_() for k in names], eps=1e-6, atol=1e-7)


def test_opcheck_cpu_ops():
    inputs = make_inputs(batch=2, dim=4, L=5, N=3, form="grouped", groups=2, initial_state=True)
    for k in ("A", "D", "delta_bias", "initial_state"):
        inputs[k].requires_grad_()
    args = [inputs[k] for k in ARGS[:8]]
    fwd = (*args[:5], args[5], args[6], args[7], True, inputs["initial_state"], 2, True)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_fwd.default, fwd)
    out, last, ckpt = torch.ops.rnnkernels.selective_scan_fwd(*fwd)
    plain = [a.detach() if a is not None else None for a in args]
    bwd = (torch.randn_like(out), torch.randn_like(last), *plain, True,
           inputs["initial_state"].detach(), ckpt.detach(), 2)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_bwd.default, bwd)


def test_opcheck_eager_autograd_ops():
    """The ops of plain eager training: the forward with its C++ autograd node, and the
    create_graph backward it calls (the reference differentiated, from Python)."""
    inputs = make_inputs(batch=2, dim=4, L=5, N=3, form="grouped", groups=2, initial_state=True)
    for k in ARGS:
        inputs[k].requires_grad_()
    args = [inputs[k] for k in ARGS[:8]]
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_autograd.default,
                          (*args, True, inputs["initial_state"], 2))
    plain = [inputs[k].detach() for k in ARGS]
    grads = (torch.randn_like(plain[0]), torch.randn_like(plain[-1]))
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_vjp.default,
                          (*grads, *plain[:8], True, plain[8], [True] * 9))


@pytest.mark.parametrize("wanted", [("A", "initial_state"), ("z",), ("u", "C", "delta")])
def test_eager_node_gradients_of_some_inputs(wanted):
    """Plain eager training records the C++ autograd node; with D and delta_bias absent (the
    node has no input edge for them) and only some inputs requiring grad, its gradients, first
    order and differentiated again (create_graph), equal the reference's."""
    inputs = make_inputs(batch=2, dim=3, L=7, N=4, D=False, delta_bias=False, initial_state=True)
    g = torch.Generator().manual_seed(3)
    w_out, w_last = (torch.randn(s, generator=g, dtype=torch.float64)
                     for s in ((2, 3, 7), (2, 3, 4)))

    def grads(fn, check_node):
        leaves = {k: (v.detach().clone().requires_grad_(k in wanted) if v is not None else None)
                  for k, v in inputs.items()}
        out, last = fn(*(leaves[k] for k in ARGS[:8]), True, True,
                       initial_state=leaves["initial_state"])
        if check_node:
            assert "SelectiveScanFunction" in out.grad_fn.name()
        first = torch.autograd.grad((out * w_out).sum() + (last * w_last).sum(),
                                    [leaves[k] for k in wanted], create_graph=True)
        second = torch.autograd.grad(sum((f * f).sum() for f in first),
                                     [leaves[k] for k in wanted])
        return first + second

    for got, expected in zip(grads(selective_scan, True),
                             grads(selective_scan_reference, False)):
        assert_close(got, expected, torch.float64, "gradient")


def _scan_ops(backend: str):
    """(forward op, backward op) of a backend whose kernels run here: the CPU ops, or the Triton
    ops under the Triton interpreter (skipped without it)."""
    if backend == "cpu":
        return torch.ops.rnnkernels.selective_scan_fwd, torch.ops.rnnkernels.selective_scan_bwd
    if not rnnkernels._kernels.triton_interpreted():
        pytest.skip("the Triton ops run here under TRITON_INTERPRET=1 (set by tools/test.sh)")
    from rnnkernels.triton import selective_scan as triton_scan
    return triton_scan.selective_scan_fwd_triton, triton_scan.selective_scan_bwd_triton


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ops_take_ungrouped_variable_bc(backend):
    """The CPU and Triton ops take variable B / C as (batch, N, L) too (the public function
    passes them so, without a view in the autograd graph of every call): opcheck, results and
    every gradient the same as those of the (batch, 1, N, L) form; other group counts refused."""
    fwd_op, bwd_op = _scan_ops(backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    inputs = make_inputs(batch=2, dim=5, L=7, N=3, form="variable", initial_state=True,
                         dtype=dtype, param_dtype=torch.float32 if backend == "triton" else None)
    args = [inputs[k] for k in ARGS[:8]]
    x0 = inputs["initial_state"]

    def both(B, C):
        out, last, ckpt = fwd_op(*args[:3], B, C, *args[5:], True, x0, 3, True)
        grad_out, grad_last = torch.ones_like(out) * 0.3, torch.ones_like(last) * -0.7
        bwd = (grad_out, grad_last, *args[:3], B, C, *args[5:], True, x0, ckpt, 3)
        return (out, last, ckpt, *bwd_op(*bwd)), bwd

    flat, bwd = both(inputs["B"], inputs["C"])
    grouped, _ = both(inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1))
    for got, want in zip(flat, grouped):
        assert torch.equal(got, want.view_as(got))
    assert flat[6].shape == inputs["B"].shape and flat[7].shape == inputs["C"].shape
    assert flat[6]._base is None and flat[7]._base is None  # an op returns no views
    if backend == "cpu":  # fake tensors cannot enter the Triton interpreter: on a GPU, below
        torch.library.opcheck(fwd_op.default, (*args, True, x0, 3, True))
        torch.library.opcheck(bwd_op.default, bwd)
    five_groups = torch.randn(2, 5, 3, 7, dtype=dtype)
    for B, C in ((inputs["B"], five_groups), (five_groups, inputs["C"])):
        with pytest.raises((RuntimeError, ValueError), match="B must|C must|B and C"):
            fwd_op(*args[:3], B, C, *args[5:], True, x0, 3, True)
    with pytest.raises((RuntimeError, ValueError), match="B must"):
        fwd_op(*args[:3], inputs["B"][..., :6], inputs["C"], *args[5:], True, x0, 3, True)


def test_opcheck_cpu_ops_permuted_inputs():
    """u, delta, z, A, B, C and the initial state stored transposed (as a (batch, L, dim)
    activation gives them): the fake kernels give the kernels' contiguous gradients."""
    inputs = make_inputs(batch=2, dim=4, L=5, N=3, form="grouped", groups=2, initial_state=True)

    def permuted(t):  # the same values, last two dims stored transposed
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    args = [permuted(inputs[k]) if k not in ("D", "delta_bias") else inputs[k]
            for k in ARGS[:8]]
    x0 = permuted(inputs["initial_state"])
    fwd = (*args, True, x0, 2, True)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_fwd.default, fwd)
    out, last, ckpt = torch.ops.rnnkernels.selective_scan_fwd(*fwd)
    bwd = (torch.randn_like(out), torch.randn_like(last), *args, True, x0, ckpt, 2)
    torch.library.opcheck(torch.ops.rnnkernels.selective_scan_bwd.default, bwd)


def check_compile_matches_eager(inputs: dict, backend: str | None = None) -> None:
    """torch.compile(fullgraph=True) of a loss over selective_scan (with D, z, delta_bias,
    softplus, initial and last state) equals eager, value and every gradient."""

    def fn(u, delta, A, B, C, D, z, delta_bias, x0):
        out, last = rnnkernels.ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True,
                                                  initial_state=x0)
        return out.sum() + last.square().sum()

    leaves = [inputs[k].requires_grad_() for k in ARGS]
    with rnnkernels.use_backend(backend):
        loss = torch.compile(fn, fullgraph=True)(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        loss_e = fn(*leaves)
        grads_e = torch.autograd.grad(loss_e, leaves)
    torch.testing.assert_close(loss, loss_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


def test_compile_fullgraph():
    check_compile_matches_eager(
        make_inputs(batch=2, dim=4, L=9, N=4, dtype=torch.float32, initial_state=True))


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_deterministic_across_thread_counts(threads):
    """Bit for bit the single-thread result with the threads taking tasks one at a time (20
    forward blocks, 8 backward supers at this shape), more threads than cores included."""
    inputs = make_inputs(batch=2, dim=160, L=30, N=16, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(selective_scan, inputs)
        torch.set_num_threads(threads)
        many = run_with_grads(selective_scan, inputs)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    for name in one[2]:
        assert torch.equal(one[2][name], many[2][name]), name


def test_no_grad_saves_nothing_and_matches():
    inputs = make_inputs(batch=1, dim=3, L=6, N=4)
    with torch.no_grad():
        out = selective_scan(*(inputs[k] for k in ARGS[:8]), delta_softplus=True)
    expected = selective_scan_reference(*(inputs[k] for k in ARGS[:8]), delta_softplus=True)
    assert_close(out, expected)


def test_mamba_ssm_return_convention():
    """out alone, or (out, last_state) with return_last_state; last_state in float32 next to
    bfloat16 activations."""
    inputs = make_inputs(dtype=torch.bfloat16, param_dtype=torch.float32)
    args = [inputs[k] for k in ARGS[:8]]
    out = selective_scan(*args)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    out2, last = selective_scan(*args, return_last_state=True)
    assert last.dtype == torch.float32 and last.shape == (2, 3, 4)
    assert torch.equal(out, out2)


def test_float16_on_cpu_falls_back_with_one_warning():
    inputs = make_inputs(dtype=torch.float16, param_dtype=torch.float32)
    args = [inputs[k] for k in ARGS[:8]]
    rnnkernels._backend._warned.clear()
    with pytest.warns(UserWarning, match="selective_scan"):
        out = selective_scan(*args, delta_softplus=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_scan(*args, delta_softplus=True)
    exact = [a.double() if a is not None else None for a in args]
    assert_close(out, selective_scan_reference(*exact, delta_softplus=True))


def test_backward_memory_does_not_scale_with_L_times_N():
    """The forward saves states only at chunk starts: (batch, dim, ceil(L / chunk) * N)."""
    inputs = make_inputs(batch=1, dim=2, L=200, N=16, form="grouped", dtype=torch.float32)
    args = [inputs[k] for k in ARGS[:8]]
    ckpt = torch.ops.rnnkernels.selective_scan_fwd(*args, True, None, 64, True)[2]
    assert ckpt.shape == (1, 2, math.ceil(200 / 64) * 16)


def test_scan_math_over_the_float_range():
    """The CPU kernel's own float softplus and exp (csrc/cpu/vec_math.h) against float64 over tiny,
    ordinary, saturating and overflowing arguments, NaN and +-Inf. One step per channel: with
    B = C = 1, u = 1 and a zero state, out = softplus(delta); with u = 0 and state 1 before the
    step, out = exp(delta A) = exp(A) for delta = 1 without softplus (inf past the float
    range, as float64's value rounded to float)."""
    mags = torch.cat([torch.logspace(-9, 2.3, 400), torch.tensor([0.0, 1e30, float("inf")])])
    vals = torch.cat([mags, -mags, torch.tensor([float("nan")])])
    vals = vals[torch.randperm(vals.numel())]
    dim = vals.numel()
    ones = torch.ones(dim, 1)
    out = selective_scan(torch.ones(1, dim, 1), vals.view(1, dim, 1), -ones, ones, ones,
                         delta_softplus=True)
    torch.testing.assert_close(out.view(-1).double(), F.softplus(vals.double()),
                               **tol(torch.float32), equal_nan=True)
    out = selective_scan(torch.zeros(1, dim, 1), torch.ones(1, dim, 1), vals.view(dim, 1), ones,
                         ones, initial_state=torch.ones(1, dim, 1))
    torch.testing.assert_close(out.view(-1).double(), torch.exp(vals.double()).float().double(),
                               **tol(torch.float32), equal_nan=True)


def test_zero_decay_keeps_the_state_exactly():
    """exp(dt A) is exactly 1 for A = 0, so a channel without decay and without input carries
    its state unchanged over any number of steps: out_t = x_0 bit for bit, not x_0 shrunk by a
    rounding error of the exp per step."""
    dim, L = 37, 1000
    x0 = torch.randn(1, dim, 1)
    ones = torch.ones(dim, 1)
    out = selective_scan(torch.zeros(1, dim, L), torch.rand(1, dim, L) + 0.1,
                         torch.zeros(dim, 1), ones, ones, initial_state=x0)
    torch.testing.assert_close(out, x0.expand(1, dim, L), rtol=0, atol=0)


def test_exp_range_checked_per_chunk():
    """Chunks whose exp arguments dt A log2(e) all lie in [-126, 127] skip the exp's clamp on
    AVX2 builds (exp_args_in_range), the others keep it: a float32 scan whose chunks and channel
    blocks mix the two (steps of about 0.01 and 2 with A down to -128: arguments down to about
    -2 and -400), against float64, output and every gradient."""
    chunk, dim, N = CHUNK_SIZE["cpu"], 16, 16
    L = 3 * chunk + 5
    g = torch.Generator().manual_seed(0)
    inputs = make_inputs(batch=1, dim=dim, L=L, N=N, delta_bias=False, initial_state=True,
                         dtype=torch.float32)
    steps = torch.full((1, dim, L), 0.01)
    steps[:, :, chunk:2 * chunk] = 2.0      # every block's second chunk out of range
    steps[:, dim // 2:, 2 * chunk:] = 2.0   # and the second block's last two
    inputs["delta"] = steps * (0.9 + 0.2 * torch.rand(1, dim, L, generator=g))
    inputs["A"] = -torch.linspace(1, 128, N).expand(dim, N).contiguous()
    check_against_reference(inputs, softplus=False)


def test_small_steps_decay_without_drift():
    """Many small steps (dt A of order -1e-3, as in a trained Mamba): the state decays by
    exp(A sum(dt)) with the float32 roundings of the steps' exp(dt A) cancelling, not adding up.
    An exp whose error has one sign for small negative arguments (a reduction to y - floor(y),
    which evaluates them near f = 1) drifted by 1.6e-4 relative over these 2000 steps; an
    unbiased one stays within a few 1e-6."""
    dim, N, L = 8, 4, 2000
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(1, dim, L, generator=g) * 0.009 + 0.001
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(dim, N).contiguous()
    x0, ones = torch.ones(1, dim, N), torch.ones(dim, N)
    u = torch.zeros(1, dim, L)
    out = selective_scan(u, delta, A, ones, ones, initial_state=x0)
    ref = selective_scan_reference(u.double(), delta.double(), A.double(), ones.double(),
                                   ones.double(), initial_state=x0.double())
    assert ((out.double() - ref).abs() / ref.abs()).max().item() < 2e-5
