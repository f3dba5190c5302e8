"""rnnkernels.nn.LSTM / GRU / RNN as drop-ins for torch.nn: parameters, state_dict, inputs,
outputs and every gradient against torch.nn (float64 and float32), extras, torch.compile."""

import warnings

import pytest
import torch
from conftest import assert_close
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkernels

MODES = ["LSTM", "GRU", "RNN"]


def pair(mode, *args, dtype=torch.float64, **kwargs):
    """A torch.nn module and ours with the same weights."""
    ref = getattr(nn, mode)(*args, dtype=dtype, **kwargs)
    ours = getattr(rnnkernels.nn, mode)(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def flat(out):
    """Output tensors of a module call (PackedSequence data included), in a fixed order."""
    y, h = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y, *h] if isinstance(h, tuple) else [y, h]


def compare(ref, ours, inputs, dtype, scale=4.0):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    a, b = flat(ref(*inputs)), flat(ours(*inputs))
    for x, y in zip(a, b):
        assert_close(y, x, dtype)
    grads = [torch.randn_like(x) for x in a]
    params = list(ref.parameters())
    ga = torch.autograd.grad(a, leaves + params, grads)
    gb = torch.autograd.grad(b, leaves + list(ours.parameters()), grads)
    names = [f"input{i}" for i in range(len(leaves))] + [n for n, _ in ref.named_parameters()]
    for name, x, y in zip(names, ga, gb):
        assert_close(y, x, dtype, msg=f"gradient of {name}", scale=scale)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", [
    dict(T=1, B=1, I=3, H=5),
    dict(T=9, B=4, I=7, H=13, num_layers=3, bidirectional=True),
    dict(T=5, B=40, I=16, H=32, num_layers=2, batch_first=True),
    dict(T=6, B=3, I=5, H=9, bias=False),
])
def test_matches_torch(mode, dtype, config):
    c = dict(config)
    T, B, I, H = c.pop("T"), c.pop("B"), c.pop("I"), c.pop("H")
    ref, ours = pair(mode, I, H, dtype=dtype, **c)
    x = rand(B, T, I, dtype=dtype) if c.get("batch_first") else rand(T, B, I, dtype=dtype)
    D = 2 if c.get("bidirectional") else 1
    h0 = rand(c.get("num_layers", 1) * D, B, H, dtype=dtype)
    hx = (h0, rand(c.get("num_layers", 1) * D, B, H, dtype=dtype)) if mode == "LSTM" else h0
    compare(ref, ours, (x, hx), dtype)
    compare(ref, ours, (x,), dtype)


@pytest.mark.parametrize("mode", MODES)
def test_decoding_loop_matches_torch(mode):
    """Token by token without gradients (each call the fused one-step op): two layers,
    bidirectional, batch_first input, unbatched too; outputs and states as torch.nn's."""
    ref, ours = pair(mode, 5, 7, num_layers=2, bidirectional=True, batch_first=True)
    h = torch.randn(4, 3, 7, dtype=torch.float64)
    state = (h, torch.randn_like(h)) if mode == "LSTM" else h
    ref_state = state
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 1, 5, dtype=torch.float64)
            (y, state), (ry, ref_state) = ours(x, state), ref(x, ref_state)
            for a, b in zip(flat((y, state)), flat((ry, ref_state))):
                assert_close(a, b, torch.float64)
        x = torch.randn(1, 5, dtype=torch.float64)
        for a, b in zip(flat(ours(x)), flat(ref(x))):
            assert_close(a, b, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_inference_matches_torch(mode):
    """A float32 sequence of one row without gradients (each layer and direction the fused
    recurrence_infer op): two layers, bidirectional, batch_first, a non-contiguous input, the
    unbatched form too; outputs and states as torch.nn's in float64."""
    ref, ours = pair(mode, 5, 40, num_layers=2, bidirectional=True, batch_first=True,
                     dtype=torch.float32)
    ref = ref.double()
    h = torch.randn(4, 1, 40)
    state = (h, torch.randn_like(h)) if mode == "LSTM" else h
    x = torch.randn(1, 5, 37)[:, :, 3:35:2].transpose(1, 2)  # (1, 16, 5), strided
    wide = tuple(s.double() for s in state) if mode == "LSTM" else state.double()
    with torch.no_grad():
        for a, b in zip(flat(ours(x, state)), flat(ref(x.double(), wide))):
            assert_close(a, b, torch.float32)
        x = torch.randn(23, 5)
        for a, b in zip(flat(ours(x)), flat(ref(x.double()))):
            assert_close(a, b, torch.float32)


class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, B, grad", [(3, 2, True), (1, 1, False), (20, 1, False)])
def test_weights_are_looked_up_on_every_call(mode, T, B, grad):
    """A parametrized weight (torch.nn.utils.parametrize), a reassigned parameter and the
    tensors of torch.func.functional_call are what the layer uses, on the training path, the
    decoding step (T = 1, no gradient) and sequence inference (B = 1, no gradient)."""
    from torch.nn.utils import parametrize

    ref, ours = pair(mode, 5, 6, dtype=torch.float32)
    ref = ref.double()
    x = torch.randn(T, B, 5)

    def check(run=lambda: ours(x)):
        with torch.set_grad_enabled(grad):
            got = flat(run())
        for a, b in zip(got, flat(ref(x.double()))):
            assert_close(a, b, torch.float32)

    parametrize.register_parametrization(ours, "weight_hh_l0", _Scale())
    with torch.no_grad():
        ref.weight_hh_l0.mul_(0.5)
    check()
    new_ih = torch.randn_like(ours.weight_ih_l0)
    ours.weight_ih_l0 = nn.Parameter(new_ih.clone())
    with torch.no_grad():
        ref.weight_ih_l0.copy_(new_ih)
    check()
    bias = torch.randn_like(ours.bias_hh_l0)
    with torch.no_grad():
        ref.bias_hh_l0.copy_(bias)
    check(lambda: torch.func.functional_call(ours, {"bias_hh_l0": bias}, (x,)))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_proj_size(bidirectional):
    ref, ours = pair("LSTM", 6, 10, num_layers=2, proj_size=4, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x = rand(7, 3, 6)
    compare(ref, ours, (x, (rand(2 * D, 3, 4), rand(2 * D, 3, 10))), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_as_torch(mode, T, batch_first):
    """B = 0, which torch.nn takes (a filtered or bucketed batch may come out empty): the same
    empty outputs and states, and gradients (zeros) for the parameters, with and without h0,
    and without gradients (the inference paths); every layer kind: projected, bidirectional,
    stacked."""
    extra = {"proj_size": 3} if mode == "LSTM" else {}
    ref, ours = pair(mode, 4, 6, num_layers=2, bidirectional=True, batch_first=batch_first,
                     **extra)
    x = rand(0, T, 4) if batch_first else rand(T, 0, 4)
    P = 3 if mode == "LSTM" else 6
    h0 = rand(4, 0, P)
    compare(ref, ours, (x, (h0, rand(4, 0, 6)) if mode == "LSTM" else h0), torch.float64)
    compare(ref, ours, (x,), torch.float64)
    with torch.no_grad():
        for a, b in zip(flat(ref(x)), flat(ours(x))):
            assert b.shape == a.shape


@pytest.mark.parametrize("mode", MODES)
def test_unbatched(mode):
    ref, ours = pair(mode, 4, 6, num_layers=2)
    x = rand(5, 4)
    hx = (rand(2, 6), rand(2, 6)) if mode == "LSTM" else rand(2, 6)
    compare(ref, ours, (x, hx), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(mode, enforce_sorted):
    ref, ours = pair(mode, 4, 6, num_layers=2, bidirectional=True)
    x = rand(8, 4, 4)
    lengths = torch.tensor([8, 5, 3, 1]) if enforce_sorted else torch.tensor([3, 8, 1, 5])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    h0 = rand(4, 4, 6)
    hx = (h0, rand(4, 4, 6)) if mode == "LSTM" else h0
    out_ref, out_ours = ref(packed, hx), ours(packed, hx)
    assert torch.equal(out_ours[0].batch_sizes, out_ref[0].batch_sizes)
    for a, b in ((out_ours[0].sorted_indices, out_ref[0].sorted_indices),
                 (out_ours[0].unsorted_indices, out_ref[0].unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    compare(ref, ours, (packed, hx), torch.float64)


def test_lengths_keyword_matches_packed():
    _, ours = pair("GRU", 3, 5)
    x = rand(6, 3, 3)
    lengths = torch.tensor([2, 6, 4])
    y_pad, h_pad = ours(x, lengths=lengths)
    y_packed, h_packed = ours(pack_padded_sequence(x, lengths, enforce_sorted=False))
    y_packed, _ = pad_packed_sequence(y_packed, total_length=6)
    torch.testing.assert_close(y_pad, y_packed)
    torch.testing.assert_close(h_pad, h_packed)


@pytest.mark.parametrize("mode", MODES)
def test_parameters_state_dict_and_init(mode):
    kwargs = dict(num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    ref = getattr(nn, mode)(5, 7, **kwargs)
    torch.manual_seed(3)
    ours = getattr(rnnkernels.nn, mode)(5, 7, **kwargs)
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)
    back = getattr(nn, mode)(5, 7, **kwargs)
    back.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_dropout_train_matches_reference_backend(mode):
    """With dropout between layers, our kernels and the reference path see the same masks."""
    m = getattr(rnnkernels.nn, mode)(4, 6, num_layers=3, dropout=0.5, dtype=torch.float64)
    x = rand(5, 2, 4)
    torch.manual_seed(7)
    a = flat(m(x))
    torch.manual_seed(7)
    with rnnkernels.use_backend("reference"):
        b = flat(m(x))
    for u, v in zip(a, b):
        assert_close(u, v, torch.float64)
    m.eval()
    assert torch.equal(flat(m(x))[0], flat(m(x))[0])


def test_lstm_forget_bias():
    torch.manual_seed(0)
    plain = rnnkernels.nn.LSTM(3, 4, num_layers=2)
    torch.manual_seed(0)
    biased = rnnkernels.nn.LSTM(3, 4, num_layers=2, forget_bias=1.0)
    for (name, p), q in zip(plain.named_parameters(), biased.parameters()):
        expected = p.detach().clone()
        if name.startswith("bias_ih"):
            expected[4:8] += 1.0
        torch.testing.assert_close(q.detach(), expected)


def test_residual_matches_manual_stack():
    ours = rnnkernels.nn.LSTM(6, 6, num_layers=3, residual=True, dtype=torch.float64)
    x = rand(5, 2, 6)
    y, _ = ours(x)
    layer_in = x
    for layer in range(3):
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        w = [getattr(ours, f"{k}_l{layer}") for k in kinds]
        zeros = torch.zeros(2, 6, dtype=torch.float64)
        out, _ = rnnkernels.ops.lstm(layer_in, (zeros, zeros), *w)
        layer_in = out + layer_in if layer > 0 else out
    assert_close(y, layer_in, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_truncated_bptt_chunks_equal_one_pass(mode):
    """State carried across chunks (detached for truncation) gives the outputs of one pass."""
    m = getattr(rnnkernels.nn, mode)(3, 5, num_layers=2, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    full, h_full = m(x)
    state, outs = None, []
    for chunk in x.split(6, dim=1):
        y, state = m(chunk, state)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-10)
    last = state if isinstance(state, tuple) else (state,)
    full_last = h_full if isinstance(h_full, tuple) else (h_full,)
    for a, b in zip(last, full_last):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_gru_reset_before_module_matches_reference():
    ours = rnnkernels.nn.GRU(4, 6, num_layers=2, reset_after=False, dtype=torch.float64)
    x = rand(5, 3, 4)
    y, h = ours(x)
    with rnnkernels.use_backend("reference"):
        ry, rh = ours(x)
    assert_close(y, ry, torch.float64)
    assert_close(h, rh, torch.float64)
    g = torch.autograd.grad(y.sum(), [x, *ours.parameters()])
    rg = torch.autograd.grad(ry.sum(), [x, *ours.parameters()])
    for a, b in zip(g, rg):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    m = getattr(rnnkernels.nn, mode)(4, 8, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 4, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _ = compiled(x)
    # Dynamo warned on every compilation that it traced through our functools caches.
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    y_eager, _ = m(x)
    torch.testing.assert_close(y, y_eager)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    torch.testing.assert_close(g, g_eager)


def test_float16_falls_back_with_one_warning():
    m = rnnkernels.nn.GRU(3, 4, dtype=torch.float16)
    x = torch.randn(4, 2, 3, dtype=torch.float16)
    rnnkernels._backend._warned.clear()
    with pytest.warns(UserWarning, match="reference"):
        y, _ = m(x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)
    with rnnkernels.use_backend("reference"):
        ry, _ = m(x)
    torch.testing.assert_close(y, ry)


def test_torch_compile_inductor_lstm():
    m = rnnkernels.nn.LSTM(4, 8, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 4)
    y, (h, c) = torch.compile(m, fullgraph=True)(x)
    y_eager, (h_eager, c_eager) = m(x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(c, c_eager)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bfloat16(mode):
    """Under CPU autocast the recurrence runs in bf16 (fp32 state inside), close to fp32."""
    m = getattr(rnnkernels.nn, mode)(8, 16, num_layers=2)
    x = torch.randn(6, 3, 8, requires_grad=True)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = m(x)
    assert y16.dtype == torch.bfloat16
    assert_close(y16, y32.double(), torch.bfloat16)
    (g16,) = torch.autograd.grad(y16.float().sum(), x)
    (g32,) = torch.autograd.grad(y32.sum(), x)
    assert g16.dtype == torch.float32
    assert_close(g16, g32.double(), torch.bfloat16, scale=2)


def test_input_gradient_in_eval_mode():
    """cuDNN refuses the backward in eval mode; attribution methods need it."""
    m = rnnkernels.nn.LSTM(4, 6, num_layers=2, dropout=0.3).eval()
    x = rand(5, 2, 4).float().detach().requires_grad_()
    y, _ = m(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_compile_fullgraph_with_lengths():
    m = rnnkernels.nn.GRU(4, 8)
    x, lengths = torch.randn(6, 3, 4), torch.tensor([6, 2, 4])
    y, h = torch.compile(m, fullgraph=True, backend="aot_eager")(x, lengths=lengths)
    y_eager, h_eager = m(x, lengths=lengths)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(h, h_eager)


@pytest.mark.parametrize("mode, kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("LSTM", dict(batch_first=True)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("RNN", dict(num_layers=3, bias=False)),
])
def test_torch_nn_interface_beyond_forward(mode, kwargs):
    """flatten_parameters, all_weights, _all_weights, _flat_weights and the argument checks
    that subclasses of torch.nn's modules call: same results and exception types."""
    ref, ours = pair(mode, 5, 7, **kwargs)
    assert ours.flatten_parameters() is None
    assert ours._all_weights == ref._all_weights
    for a, b in zip(ref.all_weights, ours.all_weights, strict=True):
        for p, q in zip(a, b, strict=True):
            assert isinstance(q, nn.Parameter)
            torch.testing.assert_close(q, p, atol=0, rtol=0)
    for p, q in zip(ref._flat_weights, ours._flat_weights, strict=True):
        torch.testing.assert_close(q, p, atol=0, rtol=0)

    D, L = (2 if kwargs.get("bidirectional") else 1), kwargs.get("num_layers", 1)
    P = kwargs.get("proj_size") or 7
    x = torch.randn(4, 6, 5, dtype=torch.float64)  # (B, T) with batch_first, else (T, B)
    B = x.shape[0] if kwargs.get("batch_first") else x.shape[1]
    packed = pack_padded_sequence(torch.randn(6, 3, 5, dtype=torch.float64), [6, 4, 2])
    for m in (ref, ours):
        assert m.get_expected_hidden_size(x, None) == (L * D, B, P)
        assert m.get_expected_hidden_size(packed.data, packed.batch_sizes) == (L * D, 3, P)
    if mode == "LSTM":
        for m in (ref, ours):
            assert m.get_expected_cell_size(x, None) == (L * D, B, 7)
    good = torch.randn(L * D, B, P, dtype=torch.float64)
    state = (good, torch.randn(L * D, B, 7, dtype=torch.float64)) if mode == "LSTM" else good
    bad_state = (good, good[:, :1]) if mode == "LSTM" else good[:, :1]
    calls = [
        (lambda m: m.check_forward_args(x, state, None), None),
        (lambda m: m.check_forward_args(x, bad_state, None), RuntimeError),
        (lambda m: m.check_forward_args(x[0], state, None), RuntimeError),
        (lambda m: m.check_forward_args(x[..., :4], state, None), RuntimeError),
        (lambda m: m.check_forward_args(x.float(), state, None), ValueError),
        (lambda m: m.check_input(packed.data, packed.batch_sizes), None),
    ]
    for call, error in calls:
        for m in (ref, ours):
            if error is None:
                assert call(m) is None
            else:
                with pytest.raises(error):
                    call(m)
    order = torch.tensor([2, 0, 1] + list(range(3, B)))
    for a, b in zip(flat((x, ref.permute_hidden(state, order))),
                    flat((x, ours.permute_hidden(state, order))), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    assert ours.permute_hidden(state, None) is state


def test_subclass_checking_its_arguments_as_torch_nn():
    """A subclass written against torch.nn.LSTM's interface runs on ours unchanged."""
    class Checked(rnnkernels.nn.LSTM):
        def forward(self, input, hx):
            self.check_forward_args(input, hx, None)
            return super().forward(input, hx)

    ref, ours = pair("LSTM", 4, 6)
    checked = Checked(4, 6, dtype=torch.float64)
    checked.load_state_dict(ours.state_dict())
    x, hx = rand(5, 2, 4), (rand(1, 2, 6), rand(1, 2, 6))
    compare(ref, checked, [x, hx], torch.float64)
    with pytest.raises(RuntimeError, match=r"hidden\[1\]"):
        checked(x, (hx[0], hx[1][:, :1]))


@pytest.mark.parametrize("mode", MODES)
def test_dropout_with_one_layer_warns_as_torch_nn(mode):
    with pytest.warns(UserWarning, match="num_layers"):
        getattr(nn, mode)(3, 4, dropout=0.5)
    with pytest.warns(UserWarning, match="num_layers=1"):
        getattr(rnnkernels.nn, mode)(3, 4, dropout=0.5)
