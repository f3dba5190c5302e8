"""Bad input raises a ValueError / TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import rnnkernels


@pytest.fixture
def lstm():
    return rnnkernels.nn.LSTM(4, 6, num_layers=2)


def test_wrong_rank(lstm):
    with pytest.raises(ValueError, match="input must have 3 dimensions"):
        lstm(torch.randn(2, 3, 4, 5))


def test_wrong_feature_size(lstm):
    with pytest.raises(ValueError, match="input_size=4"):
        lstm(torch.randn(5, 2, 3))


def test_h0_wrong_shape(lstm):
    with pytest.raises(ValueError, match=r"hx\[0\] must have shape \(2, 2, 6\)"):
        lstm(torch.randn(5, 2, 4), (torch.randn(1, 2, 6), torch.randn(2, 2, 6)))


def test_c0_wrong_shape(lstm):
    with pytest.raises(ValueError, match=r"hx\[1\] must have shape"):
        lstm(torch.randn(5, 2, 4), (torch.randn(2, 2, 6), torch.randn(2, 3, 6)))


def test_h0_wrong_dtype(lstm):
    with pytest.raises(TypeError, match=r"hx\[0\] must have dtype torch.float32"):
        h0 = torch.randn(2, 2, 6, dtype=torch.float64)
        lstm(torch.randn(5, 2, 4), (h0, torch.randn(2, 2, 6)))


def test_h0_wrong_device():
    gru = rnnkernels.nn.GRU(4, 6)
    with pytest.raises(ValueError, match="hx must be on device cpu"):
        gru(torch.randn(5, 2, 4), torch.empty(1, 2, 6, device="meta"))


def test_hx_not_a_tuple_for_lstm(lstm):
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        lstm(torch.randn(5, 2, 4), torch.randn(2, 2, 6))


def test_input_dtype_differs_from_weights(lstm):
    with pytest.raises(TypeError, match="input must have the module's dtype"):
        lstm(torch.randn(5, 2, 4, dtype=torch.float64))


def test_integer_input(lstm):
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        lstm(torch.ones(5, 2, 4, dtype=torch.int64))


def test_zero_steps(lstm):
    with pytest.raises(ValueError, match=r"input must have at least one time step \(dimension "
                                         r"0\), got shape \(0, 2, 4\)"):
        lstm(torch.randn(0, 2, 4))
    # batch_first: the dimension and shape of the input as given, not as transposed inside
    lstm.batch_first = True
    with pytest.raises(ValueError, match=r"input must have at least one time step \(dimension "
                                         r"1\), got shape \(2, 0, 4\)"):
        lstm(torch.randn(2, 0, 4))


def test_lengths_out_of_range():
    rnn = rnnkernels.nn.RNN(4, 6)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        rnn(torch.randn(5, 2, 4), lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        rnn(torch.randn(5, 2, 4), lengths=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        rnn(torch.randn(5, 2, 4), lengths=torch.tensor([1.0, 2.0]))


def test_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        rnnkernels.nn.LSTM(3, 0)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        rnnkernels.nn.GRU(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size"):
        rnnkernels.nn.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        rnnkernels.nn.RNN(3, 4, nonlinearity="sigmoid")


def test_functional_shapes():
    x = torch.randn(5, 2, 3)
    w_ih, w_hh = torch.randn(8, 3), torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(6, 2\), got \(6, 3\)"):
        rnnkernels.ops.gru(x, torch.randn(2, 2), torch.randn(6, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="w_ih must have a positive multiple of 3 rows"):
        rnnkernels.ops.gru(x, torch.randn(2, 2), w_ih, w_hh)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 2\)"):
        rnnkernels.ops.lstm(x, (torch.randn(3, 2), torch.randn(2, 2)), w_ih, w_hh)
    with pytest.raises(ValueError, match="w_hr .projection. is supported for the LSTM only"):
        rnnkernels.ops.recurrence._check_layer(x, torch.randn(2, 2), None, torch.randn(6, 3),
                                               torch.randn(6, 2), None, None, torch.randn(2, 2),
                                               None, rnnkernels.ops.recurrence.GRU)
