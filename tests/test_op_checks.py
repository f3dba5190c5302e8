"""The ops themselves (torch.ops.rnnkernels.*, public beside the Python API, which validates
first) refuse arguments of inconsistent sizes with an error naming the argument, instead of
reading past a buffer: each case here crashed the process or returned garbage before the
checks of csrc/recurrence_checks.h."""

import pytest
import torch

import rnnkernels  # noqa: F401  (registers the ops)

op = torch.ops.rnnkernels
T, B, H = 3, 2, 8
LSTM, GRU = 0, 1
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def randn(device, *shape):
    return torch.randn(*shape, device=device)


def fwd_args(device, cell=LSTM, **change):
    """recurrence_fwd's arguments for a valid call, with the entries in ``change`` replaced."""
    G = 4 if cell == LSTM else 3
    args = {"gx": randn(device, T, B, G * H), "h0": randn(device, B, H),
            "c0": randn(device, B, H) if cell == LSTM else None,
            "w_hh": randn(device, G * H, H), "b_hh": randn(device, G * H), "w_hr": None,
            "lengths": None, "cell": cell, "reverse": False, "save": True}
    args.update(change)
    return args


def run_fwd(args, **options):
    return op.recurrence_fwd(*args.values(), **options)


def bwd_args(device, **change):
    """recurrence_bwd's arguments for the backward of a valid LSTM forward, changed."""
    f = fwd_args(device)
    _, _, _, hs, ws = run_fwd(f)
    args = {"grad_y": randn(device, T, B, H), "grad_h_n": randn(device, B, H),
            "grad_c_n": randn(device, B, H), "c0": f["c0"], "w_hh": f["w_hh"], "w_hr": None,
            "lengths": None, "hs": hs, "ws": ws, "cell": LSTM, "reverse": False}
    args.update(change)
    return args


@pytest.mark.parametrize("device", DEVICES)
def test_valid_calls_pass(device):
    y, h_n, c_n, hs, ws = run_fwd(fwd_args(device, lengths=torch.tensor([3, 2], device=device)))
    assert y.shape == (T, B, H) and ws.shape == (T, B, 5 * H)
    grads = op.recurrence_bwd(*bwd_args(device).values())
    assert grads[0].shape == (T, B, 4 * H)


FWD_CASES = {
    "gx sized for the LSTM, GRU cell": (dict(cell=GRU, c0=None, gx=torch.randn(T, B, 4 * H)),
                                        "gx must be"),
    "gx 2-d": (dict(gx=torch.randn(B, 4 * H)), "gx must be"),
    "gx not G*H wide": (dict(gx=torch.randn(T, B, 4 * H + 1)), "gx must be"),
    "h0 other rows": (dict(h0=torch.randn(B + 1, H)), "h0 must be"),
    "h0 wider than H": (dict(h0=torch.randn(B, H + 3)), "needs w_hr"),
    "h0 integer": (dict(h0=torch.ones(B, H, dtype=torch.int64)), "h0 must have a floating"),
    "LSTM without c0": (dict(c0=None), "the LSTM needs c0"),
    "c0 other width": (dict(c0=torch.randn(B, H - 1)), "c0 must have shape"),
    "w_hh other rows": (dict(w_hh=torch.randn(4 * H - 2, H)), "w_hh must have shape"),
    "w_hh other cols": (dict(w_hh=torch.randn(4 * H, H + 5)), "w_hh must have shape"),
    "b_hh other size": (dict(b_hh=torch.randn(4 * H - 3)), "b_hh must have shape"),
    "lengths too few": (dict(lengths=torch.tensor([3])), "lengths must be int64"),
    "lengths float": (dict(lengths=torch.tensor([3.0, 2.0])), "lengths must be int64"),
    "w_hr on a GRU": (dict(cell=GRU, c0=None, gx=torch.randn(T, B, 3 * H),
                           w_hh=torch.randn(3 * H, H), b_hh=torch.randn(3 * H),
                           w_hr=torch.randn(H, H)), "LSTM option"),
    "w_hr other shape": (dict(h0=torch.randn(B, 4), w_hh=torch.randn(4 * H, 4),
                              w_hr=torch.randn(4, H + 1)), "w_hr must have shape"),
    "unknown cell": (dict(cell=7), "unknown cell"),
}


def _to(device, change):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FWD_CASES))
def test_recurrence_fwd_refuses(case, device):
    change, message = FWD_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        run_fwd(fwd_args(device, **_to(device, change)))


OPTION_CASES = {
    "w_peep": (torch.randn(2, H), "w_peep must have shape"),
    "zoneout_mask": (torch.rand(T, B), "zoneout_mask must have shape"),
    "zoneout_mask_c": (torch.rand(T, B, H + 1), "zoneout_mask_c must have shape"),
    "recurrent_dropout_mask": (torch.rand(1, 2), "recurrent_dropout_mask must have shape"),
    "ln_weight_hh": (torch.randn(3), "ln_weight_hh must have shape"),
    "ln_weight_c": (torch.randn(H + 2), "ln_weight_c must have shape"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_recurrence_options_refused(name, device):
    value, message = OPTION_CASES[name]
    with pytest.raises(RuntimeError, match=message):
        run_fwd(fwd_args(device), **{name: value.to(device)})
    with pytest.raises(RuntimeError, match=message):
        op.recurrence_bwd(*bwd_args(device).values(), **{name: value.to(device)})


BWD_CASES = {
    "hs one step short": (lambda a: dict(hs=a["hs"][1:]), "hs must have shape"),
    "ws of another cell": (lambda a: dict(ws=a["ws"][..., :4 * H]), "ws must have shape"),
    "hs / ws dtypes": (lambda a: dict(hs=a["hs"].double()), "one dtype"),
    "grad_y other rows": (lambda a: dict(grad_y=torch.randn(T, B + 1, H)), "grad_y must have"),
    "grad_h_n other width": (lambda a: dict(grad_h_n=torch.randn(B, 1)), "grad_h_n must have"),
    "grad_c_n other width": (lambda a: dict(grad_c_n=torch.randn(B, 2)), "grad_c_n must have"),
    "LSTM without c0": (lambda a: dict(c0=None), "the LSTM needs c0"),
    "w_hh not G*H rows": (lambda a: dict(w_hh=torch.randn(4 * H + 2, H)), "w_hh must be"),
    "lengths too many": (lambda a: dict(lengths=torch.tensor([1, 2, 3])), "lengths must be"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_recurrence_bwd_refuses(case, device):
    change, message = BWD_CASES[case]
    args = bwd_args(device)
    args.update(_to(device, change(args)))
    with pytest.raises(RuntimeError, match=message):
        op.recurrence_bwd(*args.values())


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_bwd_refuses_grad_last_state(device):
    batch, dim, L, N = 1, 16, 4, 4
    u, delta = randn(device, batch, dim, L), randn(device, batch, dim, L)
    A, Bm, Cm = -randn(device, dim, N).abs(), randn(device, dim, N), randn(device, dim, N)
    args = (u, delta, A, Bm, Cm, None, None, None, False, None)
    _, _, ckpt = op.selective_scan_fwd(*args, 64, True)
    for wrong in (randn(device, batch, 3, 2), randn(device, batch, dim, N + 1)):
        with pytest.raises(RuntimeError, match="grad_last_state must be"):
            op.selective_scan_bwd(randn(device, batch, dim, L), wrong, *args, ckpt, 64)
    with pytest.raises(RuntimeError, match="grad_out must"):
        op.selective_scan_bwd(randn(device, batch, dim, L + 1), None, *args, ckpt, 64)
