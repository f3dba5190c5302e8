"""The ops themselves (torch.ops.rnnkernels.*, public beside the Python API, which validates
first) refuse arguments of inconsistent sizes with an error naming the argument, instead of
reading past a buffer: the C++ ops (csrc/recurrence_checks.h and the scans' checks) with a
RuntimeError, the Triton ops (rnnkernels._validate's op checks) with a ValueError / TypeError.
Before these checks a direct call of the C++ recurrence ops with such arguments returned garbage
or crashed the process."""

import pytest
import torch

from rnnkernels import _kernels

op = torch.ops.rnnkernels
T, B, H = 3, 2, 8
LSTM, GRU = 0, 1
ERRORS = (RuntimeError, ValueError, TypeError)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
BACKENDS = ["cpp", "triton"]


@pytest.fixture
def ops(backend, device):
    """The op of each family for the backend, by its base name (recurrence_fwd, ...)."""
    names = ("recurrence_fwd", "recurrence_bwd", "selective_scan_fwd", "selective_scan_bwd",
             "linear_scan_fwd", "linear_scan_bwd")
    if backend == "cpp":
        return {n: getattr(op, n) for n in names}
    if not _kernels.triton_importable():
        pytest.skip("triton is not installed")
    if device == "cpu" and not _kernels.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by tools/test.sh)")
    # importing the modules registers their ops
    import rnnkernels.triton.linear_scan  # noqa: F401
    import rnnkernels.triton.recurrence  # noqa: F401
    import rnnkernels.triton.selective_scan  # noqa: F401
    return {n: getattr(op, f"{n}_triton") for n in names}


def randn(device, *shape):
    return torch.randn(*shape, device=device)


def fwd_args(device, cell=LSTM, **change):
    """recurrence_fwd's base arguments for a valid call, with the entries in ``change`` replaced
    (tensors in ``change`` are moved to ``device``)."""
    G = 4 if cell == LSTM else 3
    args = {"gx": randn(device, T, B, G * H), "h0": randn(device, B, H),
            "c0": randn(device, B, H) if cell == LSTM else None,
            "w_hh": randn(device, G * H, H), "b_hh": randn(device, G * H), "w_hr": None,
            "lengths": None, "cell": cell, "reverse": False, "save": True}
    args.update(_to(device, change))
    return args


def bwd_args(ops, device, **change):
    """recurrence_bwd's base arguments for the backward of a valid LSTM forward, changed."""
    f = fwd_args(device)
    _, _, _, hs, ws = ops["recurrence_fwd"](*f.values())
    args = {"grad_y": randn(device, T, B, H), "grad_h_n": randn(device, B, H),
            "grad_c_n": randn(device, B, H), "c0": f["c0"], "w_hh": f["w_hh"], "w_hr": None,
            "lengths": None, "hs": hs, "ws": ws, "cell": LSTM, "reverse": False}
    args.update(_to(device, change))
    return args


def _to(device, change):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_calls_pass(ops, device):
    lengths = torch.tensor([3, 2], device=device)
    y, h_n, c_n, hs, ws = ops["recurrence_fwd"](*fwd_args(device, lengths=lengths).values())
    assert y.shape == (T, B, H) and ws.shape == (T, B, 5 * H)
    grads = ops["recurrence_bwd"](*bwd_args(ops, device).values())
    assert grads[0].shape == (T, B, 4 * H)


FWD_CASES = {
    "gx sized for the LSTM, GRU cell": (dict(cell=GRU, c0=None, gx=torch.randn(T, B, 4 * H)),
                                        "gx must"),
    "gx 2-d": (dict(gx=torch.randn(B, 4 * H)), "gx must"),
    "gx not G*H wide": (dict(gx=torch.randn(T, B, 4 * H + 1)), "gx must"),
    "h0 other rows": (dict(h0=torch.randn(B + 1, H)), "h0 must"),
    "h0 wider than H": (dict(h0=torch.randn(B, H + 3)), "needs w_hr"),
    "h0 integer": (dict(h0=torch.ones(B, H, dtype=torch.int64)), "h0 must.*floating"),
    "LSTM without c0": (dict(c0=None), "the LSTM needs c0"),
    "c0 other width": (dict(c0=torch.randn(B, H - 1)), "c0 must have shape"),
    "w_hh other rows": (dict(w_hh=torch.randn(4 * H - 2, H)), "w_hh must have shape"),
    "w_hh other cols": (dict(w_hh=torch.randn(4 * H, H + 5)), "w_hh must have shape"),
    "b_hh other size": (dict(b_hh=torch.randn(4 * H - 3)), "b_hh must have shape"),
    "lengths too few": (dict(lengths=torch.tensor([3])), "lengths must"),
    "lengths float": (dict(lengths=torch.tensor([3.0, 2.0])), "lengths must"),
    "w_hr on a GRU": (dict(cell=GRU, c0=None, gx=torch.randn(T, B, 3 * H),
                           w_hh=torch.randn(3 * H, H), b_hh=torch.randn(3 * H),
                           w_hr=torch.randn(H, H)), "LSTM option"),
    "w_hr other shape": (dict(h0=torch.randn(B, 4), w_hh=torch.randn(4 * H, 4),
                              w_hr=torch.randn(4, H + 1)), "w_hr must have shape"),
    "unknown cell": (dict(cell=7), "unknown cell|cell must be one of"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FWD_CASES))
def test_recurrence_fwd_refuses(ops, case, device):
    change, message = FWD_CASES[case]
    with pytest.raises(ERRORS, match=message):
        ops["recurrence_fwd"](*fwd_args(device, **change).values())


BWD_CASES = {
    "hs one step short": (lambda a: dict(hs=a["hs"][1:]), "hs must have shape"),
    "ws of another cell": (lambda a: dict(ws=a["ws"][..., :4 * H]), "ws must have shape"),
    "hs / ws dtypes": (lambda a: dict(hs=a["hs"].double()), "one dtype"),
    "grad_y other rows": (lambda a: dict(grad_y=torch.randn(T, B + 1, H)), "grad_y must have"),
    "grad_h_n other width": (lambda a: dict(grad_h_n=torch.randn(B, 1)), "grad_h_n must have"),
    "grad_c_n other width": (lambda a: dict(grad_c_n=torch.randn(B, 2)), "grad_c_n must have"),
    "LSTM without c0": (lambda a: dict(c0=None), "the LSTM needs c0"),
    "w_hh not G*H rows": (lambda a: dict(w_hh=torch.randn(4 * H + 2, H)), "w_hh must"),
    "lengths too many": (lambda a: dict(lengths=torch.tensor([1, 2, 3])), "lengths must"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_recurrence_bwd_refuses(ops, case, device):
    change, message = BWD_CASES[case]
    args = bwd_args(ops, device)
    args.update(_to(device, change(args)))
    with pytest.raises(ERRORS, match=message):
        ops["recurrence_bwd"](*args.values())


# The C++ ops' cell options (the Triton ops take none).
OPTION_CASES = {
    "w_peep": (torch.randn(2, H), "w_peep must have shape"),
    "zoneout_mask": (torch.rand(T, B), "zoneout_mask must have shape"),
    "zoneout_mask_c": (torch.rand(T, B, H + 1), "zoneout_mask_c must have shape"),
    "recurrent_dropout_mask": (torch.rand(1, 2), "recurrent_dropout_mask must have shape"),
    "ln_weight_hh": (torch.randn(3), "ln_weight_hh must have shape"),
    "ln_weight_c": (torch.randn(H + 2), "ln_weight_c must have shape"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_recurrence_options_refused(ops, name, device):
    value, message = OPTION_CASES[name]
    with pytest.raises(RuntimeError, match=message):
        op.recurrence_fwd(*fwd_args(device).values(), **{name: value.to(device)})
    with pytest.raises(RuntimeError, match=message):
        op.recurrence_bwd(*bwd_args(ops, device).values(), **{name: value.to(device)})


def scan_args(device, batch=1, dim=16, L=4, N=4, **change):
    """selective_scan_fwd's arguments before delta_softplus (u, delta, A, B, C, D, z,
    delta_bias), B and C grouped (batch, 1, N, L), changed."""
    args = {"u": randn(device, batch, dim, L), "delta": randn(device, batch, dim, L),
            "A": -randn(device, dim, N).abs(), "B": randn(device, batch, 1, N, L),
            "C": randn(device, batch, 1, N, L), "D": randn(device, dim), "z": None,
            "delta_bias": None}
    args.update(_to(device, change))
    return list(args.values())


SCAN_FWD_CASES = {
    "B of another L": (dict(B=torch.randn(1, 1, 4, 5)), "B must"),
    "B and C groups differ": (dict(B=torch.randn(1, 2, 4, 4)), "B and C must|C must"),
    "C fixed, another N": (dict(C=torch.randn(16, 3)), "C must"),
    "D of another dim": (dict(D=torch.randn(15)), "D must"),
    "delta of another L": (dict(delta=torch.randn(1, 16, 5)), "delta must"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SCAN_FWD_CASES))
def test_selective_scan_fwd_refuses(ops, case, device):
    change, message = SCAN_FWD_CASES[case]
    with pytest.raises(ERRORS, match=message):
        ops["selective_scan_fwd"](*scan_args(device, **change), False, None, 64, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_bwd_refuses(ops, device):
    batch, dim, L, N = 1, 16, 4, 4
    args = scan_args(device)
    _, _, ckpt = ops["selective_scan_fwd"](*args, False, None, 64, True)
    grad = randn(device, batch, dim, L)
    for wrong in (randn(device, batch, 3, 2), randn(device, batch, dim, N + 1)):
        with pytest.raises(ERRORS, match="grad_last_state must"):
            ops["selective_scan_bwd"](grad, wrong, *args, False, None, ckpt, 64)
    with pytest.raises(ERRORS, match="grad_out must"):
        ops["selective_scan_bwd"](randn(device, batch, dim, L + 1), None, *args, False, None,
                                  ckpt, 64)
    with pytest.raises(ERRORS, match="checkpoints"):
        ops["selective_scan_bwd"](grad, None, *args, False, None, ckpt[..., :2], 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_refuses(ops, device):
    a, b = randn(device, 2, 3, 5), randn(device, 2, 3, 5)
    fwd, bwd = ops["linear_scan_fwd"], ops["linear_scan_bwd"]
    with pytest.raises(ERRORS, match="b must"):
        fwd(a, b[..., :4], None)
    with pytest.raises(ERRORS, match="initial_state must"):
        fwd(a, b, randn(device, 2, 2))
    with pytest.raises(ERRORS, match="a must"):
        fwd(a[0], b[0], None)
    h = fwd(a, b, None)
    with pytest.raises(ERRORS, match="grad_h must"):
        bwd(randn(device, 2, 4, 5), a, h, None)
    with pytest.raises(ERRORS, match="h must"):
        bwd(torch.ones_like(h), a, h[:, :, 1:], None)
