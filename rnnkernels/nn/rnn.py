"""Drop-in replacements for torch.nn.LSTM / GRU / RNN on the generic recurrence kernels.

Same constructor arguments, parameter names, shapes, initialisation and state_dict keys as
torch.nn, so ``load_state_dict`` works both ways; same inputs (batched or unbatched tensors,
PackedSequence, optional initial state) and outputs. Extras are keyword-only: ``residual``
(residual connections between stacked layers of equal width), ``forget_bias`` (LSTM),
``reset_after`` (GRU variant), the cell options ``peephole`` (LSTM), ``zoneout``,
``recurrent_dropout`` and ``layer_norm`` (LSTM, GRU), and
``lengths=`` in forward for padded input. Random masks of the cell options are drawn in training
mode only, with torch's generator (``torch.manual_seed`` fixes them). A cell option adds its
parameters after torch.nn's (``weight_peephole_l0``, ``layer_norm_weight_ih_l0``, ...); with
every option off the parameters and state_dict keys are exactly torch.nn's.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import _backend, _validate
from ..ops import recurrence as R
from ..ops._autocast import autocast_input

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _packed_rows(packed: PackedSequence, device: torch.device) -> Tensor:
    """The row of the time-major padded layout flattened to (T * B, *) that holds each row of
    packed.data, b in the caller's batch order: one index_copy or index_select moves a whole
    sequence between the two forms (torch's pad_packed_sequence copies one time step at a time,
    in both directions; advanced indexing with (t, b) index pairs, whose backward is an
    accumulating index_put, took about twice as long forward and backward at B = 32, T = 128)."""
    bs = packed.batch_sizes
    t_idx = torch.repeat_interleave(torch.arange(len(bs)), bs)
    offsets = torch.cumsum(bs, 0) - bs
    i_idx = torch.arange(int(bs.sum())) - torch.repeat_interleave(offsets, bs)
    b_idx = i_idx if packed.sorted_indices is None else packed.sorted_indices.cpu()[i_idx]
    return (t_idx * int(bs[0]) + b_idx).to(device)


def _pad(packed: PackedSequence) -> tuple[Tensor, Tensor, Tensor]:
    """pad_packed_sequence(packed): the padded input (T, B, *) (zeros past each length) and the
    lengths (B,) (int64 on the CPU), in the caller's batch order, and the _packed_rows that
    pack the output again (_pack_like)."""
    bs, data = packed.batch_sizes, packed.data
    T, B, feature = len(bs), int(bs[0]), tuple(data.shape[1:])
    rows = _packed_rows(packed, data.device)
    x = data.new_zeros((T * B,) + feature).index_copy(0, rows, data)
    sorted_lengths = (bs.unsqueeze(1) > torch.arange(B)).sum(0)
    lengths = sorted_lengths if packed.sorted_indices is None else \
        torch.empty_like(sorted_lengths).index_copy_(0, packed.sorted_indices.cpu(),
                                                    sorted_lengths)
    return x.view((T, B) + feature), lengths, rows


def _pack_like(y: Tensor, like: PackedSequence, rows: Tensor) -> PackedSequence:
    """Pack time-major padded y (T, B, *) with the batch sizes and order of ``like``, whose
    _packed_rows are ``rows``."""
    data = y.reshape((-1,) + tuple(y.shape[2:])).index_select(0, rows)
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _param_name(kind: str, layer: int, direction: int) -> str:
    """The name of parameter ``kind`` of a layer and direction, as torch.nn's
    (weight_ih_l0, bias_hh_l1_reverse, ...)."""
    return f"{kind}_l{layer}{'_reverse' if direction == 1 else ''}"


def _layer_names(layer: int, direction: int) -> tuple[str, ...]:
    """Names of (w_ih, w_hh, b_ih, b_hh, w_hr) of a layer and direction."""
    return tuple(_param_name(kind, layer, direction)
                 for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))


class RNNBase(nn.Module):
    """Layers, directions, packing, dropout and residuals, written once for every cell."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None, *,
                 residual: bool = False, reset_after: bool = True,
                 peephole: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout={dropout} has no effect with num_layers=1: dropout applies "
                          "to the outputs of every layer but the last (as in torch.nn)",
                          stacklevel=3)
        if not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size must be a non-negative integer, got {proj_size!r}")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size is supported for the LSTM only")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), got "
                             f"{proj_size}")
        for name, value in (("peephole", peephole), ("layer_norm", layer_norm)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if layer_norm and not (mode == "LSTM" or (mode == "GRU" and reset_after)):
            raise ValueError("layer_norm is supported for the LSTM and the GRU with "
                             "reset_after=True only")
        zoneout = _validate.probability("zoneout", zoneout)
        recurrent_dropout = _validate.probability("recurrent_dropout", recurrent_dropout)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.residual = residual
        self.reset_after = reset_after
        self.peephole = peephole
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout
        self.layer_norm = layer_norm
        num_directions = 2 if bidirectional else 1
        gate_size = _GATES[mode] * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input = input_size if layer == 0 else real_hidden * num_directions
                params = [("weight_ih", (gate_size, layer_input)),
                          ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    params += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    params += [("weight_hr", (proj_size, hidden_size))]
                if peephole:
                    params += [("weight_peephole", (3, hidden_size))]
                if layer_norm:
                    params += [("layer_norm_weight_ih", (gate_size,)),
                               ("layer_norm_weight_hh", (gate_size,))]
                    if mode == "LSTM":
                        params += [("layer_norm_weight_c", (hidden_size,)),
                                   ("layer_norm_bias_c", (hidden_size,))]
                for kind, shape in params:
                    name = _param_name(kind, layer, direction)
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        # The names _weights looks up on every call, formed once here (a functools.cache on
        # _layer_names did the same, but Dynamo warns whenever it traces through one).
        self._weight_names = [[_layer_names(layer, d) for d in range(num_directions)]
                              for layer in range(num_layers)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias uniform in +-1/sqrt(hidden_size);
        layer-norm gains 1 and shifts 0."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, weight in self.named_parameters():
            if name.startswith("layer_norm_weight"):
                nn.init.ones_(weight)
            elif name.startswith("layer_norm_bias"):
                nn.init.zeros_(weight)
            else:
                nn.init.uniform_(weight, -stdv, stdv)

    @property
    def _cell(self) -> int:
        if self.mode == "LSTM":
            return R.LSTM
        if self.mode == "GRU":
            return R.GRU if self.reset_after else R.GRU_RESET_BEFORE
        return R.RNN_TANH if self.mode == "RNN_TANH" else R.RNN_RELU

    def _param(self, name: str, *default: None) -> Tensor | None:
        """The tensor named ``name``, looked up on every call so that parametrizations and
        reassigned parameters are seen: a registered parameter straight from _parameters
        (nn.Module.__getattr__ costs about half a microsecond a name), anything else by
        getattr (with ``default`` where given)."""
        p = self._parameters.get(name)
        return p if p is not None else getattr(self, name, *default)

    def _get(self, kind: str, layer: int, direction: int) -> Tensor | None:
        return self._param(_param_name(kind, layer, direction), None)

    def _weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of a layer and direction, None where absent."""
        ih, hh, bih, bhh, hr = self._weight_names[layer][direction]
        get = self._param
        return (get(ih), get(hh), get(bih, None) if self.bias else None,
                get(bhh, None) if self.bias else None, get(hr, None) if self.proj_size else None)

    # ---------------------------------------------- the rest of torch.nn.RNNBase's interface
    # For code written against torch.nn's modules: subclasses that check their arguments as
    # torch.nn's forward does, loops over all_weights, flatten_parameters after moving a module.
    # Same results and exception types as torch.nn's (RuntimeError for shapes, ValueError for a
    # dtype).

    def flatten_parameters(self) -> None:
        """Nothing to do: torch.nn's copies the weights into one cuDNN buffer; the kernels here
        read every parameter where it lies, on every call."""

    @property
    def _all_weights(self) -> list[list[str]]:
        """The parameter names of each layer and direction, layer by layer."""
        names = self._flat_weights_names
        per = len(names) // (self.num_layers * (2 if self.bidirectional else 1))
        return [names[i:i + per] for i in range(0, len(names), per)]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """The parameters of each layer and direction, layer by layer."""
        return [[self._param(name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The parameters in _flat_weights_names' order."""
        return [self._param(name) for name in self._flat_weights_names]

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        """That input is (T, B, input_size) (batch_sizes None) or a PackedSequence's data
        (N, input_size), in the weights' dtype."""
        dtype = self.weight_ih_l0.dtype
        if input.dtype != dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"input must have the weights' dtype {dtype}, got {input.dtype}")
        dims = 2 if batch_sizes is not None else 3
        if input.dim() != dims:
            raise RuntimeError(f"input must have {dims} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be input_size={self.input_size}, got "
                               f"{input.size(-1)}")

    def _expected_state_size(self, input: Tensor, batch_sizes: Tensor | None,
                             features: int) -> tuple[int, int, int]:
        if batch_sizes is not None:
            rows = int(batch_sizes[0])
        else:
            rows = input.size(0) if self.batch_first else input.size(1)
        return (self.num_layers * (2 if self.bidirectional else 1), rows, features)

    def get_expected_hidden_size(self, input: Tensor,
                                 batch_sizes: Tensor | None) -> tuple[int, int, int]:
        """(num_layers * directions, batch, proj_size or hidden_size)."""
        return self._expected_state_size(input, batch_sizes, self.proj_size or self.hidden_size)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden: Tensor,
                           batch_sizes: Tensor | None) -> None:
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def permute_hidden(self, hx: Tensor, permutation: Tensor | None) -> Tensor:
        """hx with its batch rows (dimension 1) in the order permutation gives (None: as is)."""
        return hx if permutation is None else hx.index_select(1, permutation)

    def _cell_options(self, layer: int, direction: int) -> R.CellOptions:
        if not (self.peephole or self.layer_norm or self.zoneout or self.recurrent_dropout):
            return R.NO_OPTIONS  # the common case, without eight lookups per layer
        get = lambda kind: self._get(kind, layer, direction)  # noqa: E731
        return R.CellOptions(w_peep=get("weight_peephole"), zoneout=self.zoneout,
                             recurrent_dropout=self.recurrent_dropout, training=self.training,
                             ln_weight_ih=get("layer_norm_weight_ih"),
                             ln_weight_hh=get("layer_norm_weight_hh"),
                             ln_weight_c=get("layer_norm_weight_c"),
                             ln_bias_c=get("layer_norm_bias_c"))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.residual:
            s += ", residual=True"
        if self.mode == "GRU" and not self.reset_after:
            s += ", reset_after=False"
        if self.peephole:
            s += ", peephole=True"
        if self.zoneout:
            s += f", zoneout={self.zoneout}"
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        if self.layer_norm:
            s += ", layer_norm=True"
        return s

    # ------------------------------------------------------------------ forward

    def _check_state(self, name: str, t: object, shape: tuple[int, ...], x: Tensor) -> Tensor:
        t = _validate.tensor(name, autocast_input(t, x), like=x)
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        return t

    def _forward(self, input, hx, lengths):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths must not be given with a PackedSequence input, which "
                                 "carries its own lengths")
            x, lengths, packed_rows = _pad(input)
            batched = True
        else:
            x = _validate.tensor("input", input, floating=True)
            if x.dim() not in (2, 3):
                raise ValueError("input must have 3 dimensions (batched: (T, B, input_size), or "
                                 "(B, T, input_size) with batch_first) or 2 (unbatched: (T, "
                                 f"input_size)), got shape {tuple(x.shape)}")
            batched = x.dim() == 3
            # torch.nn refuses no time step too; an empty batch (B = 0) it takes, and so do we.
            _validate.nonempty("input", x, [(1 if batched and self.batch_first else 0,
                                             "time step")])
            if not batched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input must have input_size={self.input_size} features in its last "
                             f"dimension, got {x.shape[-1]}")
        w0 = self._param("weight_ih_l0")
        # Under autocast the layers run in the autocast dtype (compute_dtype) anyway.
        x = autocast_input(x, w0)
        if x.dtype != w0.dtype:
            raise TypeError(f"input must have the module's dtype {w0.dtype}, got {x.dtype}")
        if x.device != w0.device:
            raise ValueError(f"input must be on the module's device {w0.device}, got {x.device}")
        T, B = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = _validate.lengths("lengths", lengths, B, T)

        D = 2 if self.bidirectional else 1
        P = self.proj_size or self.hidden_size
        L = self.num_layers
        is_lstm = self.mode == "LSTM"
        h0 = c0 = None
        if hx is not None:
            if is_lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError("hx must be a tuple (h_0, c_0) for the LSTM")
                h0, c0 = hx
            else:
                h0 = hx
            h_shape = (L * D, B, P) if batched else (L * D, P)
            h0 = self._check_state("hx[0]" if is_lstm else "hx", h0, h_shape, x)
            if is_lstm:
                c_shape = (L * D, B, self.hidden_size) if batched else (L * D, self.hidden_size)
                c0 = self._check_state("hx[1]", c0, c_shape, x)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        if h0 is None:
            h0 = x.new_zeros((L * D, B, P))
            if is_lstm:
                c0 = x.new_zeros((L * D, B, self.hidden_size))

        backend = _backend.choose("recurrence", x.device, R.compute_dtype(x))
        cell = self._cell
        layer_input = x
        h_n, c_n = [], []
        for layer in range(L):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, direction)
                y, h, c = R.run_layer(layer_input, h0[k], c0[k] if is_lstm else None, w_ih,
                                      w_hh, b_ih, b_hh, w_hr, lengths, cell, direction == 1,
                                      backend, self._cell_options(layer, direction))
                outs.append(y)
                h_n.append(h)
                if is_lstm:
                    c_n.append(c)
            out = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.residual and layer > 0 and out.shape[-1] == layer_input.shape[-1]:
                out = out + layer_input
            if self.dropout > 0 and self.training and layer < L - 1:
                out = F.dropout(out, self.dropout, training=True)
            layer_input = out
        output = layer_input
        def stack(states: list[Tensor]) -> Tensor:
            # one layer and direction: a view instead of stack's copy, a decoding loop's cost
            return torch.stack(states) if len(states) > 1 else states[0].unsqueeze(0)

        h_n = stack(h_n)
        c_n = stack(c_n) if is_lstm else None
        if packed:
            output = _pack_like(output, input, packed_rows)
        elif not batched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n) if is_lstm else h_n


class LSTM(RNNBase):
    """Drop-in for torch.nn.LSTM. Keyword-only extras: ``forget_bias`` (added to the forget
    gate's input bias at initialisation; +1 or +2 helps long-range gradients), ``residual``,
    ``peephole`` (the i and f gates see c_{t-1} and the o gate c_t through diagonal weights
    ``weight_peephole_l{k}[_reverse]`` of shape (3, hidden_size), rows i, f, o), ``zoneout``
    (in training each unit of h (after the projection) and of c keeps its previous value with
    this probability, drawn per step; in evaluation the expectation), ``recurrent_dropout``
    (in training, variational dropout of the state that W_hh multiplies: one mask per sequence,
    layer and direction, scaled by 1 / (1 - p); the output is not dropped), ``layer_norm``
    (haste's LayerNormLSTM: x W_ih^T and h W_hh^T layer-normalised separately with gains
    ``layer_norm_weight_ih_l{k}`` / ``layer_norm_weight_hh_l{k}`` (4 * hidden_size,) before the
    biases, and h = o * tanh(LN(c) * ``layer_norm_weight_c_l{k}`` + ``layer_norm_bias_c_l{k}``)).
    forward(input, hx=None, *, lengths=None) -> (output, (h_n, c_n))."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, forget_bias: float = 0.0,
                 residual: bool = False, peephole: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        self.forget_bias = float(forget_bias)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, residual=residual,
                         peephole=peephole, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout, layer_norm=layer_norm)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias and self.bias:
            H = self.hidden_size
            with torch.no_grad():
                for name in self._flat_weights_names:
                    if name.startswith("bias_ih"):
                        getattr(self, name)[H:2 * H] += self.forget_bias

    def get_expected_cell_size(self, input: Tensor,
                               batch_sizes: Tensor | None) -> tuple[int, int, int]:
        """(num_layers * directions, batch, hidden_size)."""
        return self._expected_state_size(input, batch_sizes, self.hidden_size)

    def check_forward_args(self, input: Tensor, hidden: tuple[Tensor, Tensor],
                           batch_sizes: Tensor | None) -> None:
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx: tuple[Tensor, Tensor],
                       permutation: Tensor | None) -> tuple[Tensor, Tensor]:
        if permutation is None:
            return hx
        return (super().permute_hidden(hx[0], permutation),
                super().permute_hidden(hx[1], permutation))

    def forward(self, input, hx=None, *, lengths: Tensor | None = None):
        return self._forward(input, hx, lengths)


class GRU(RNNBase):
    """Drop-in for torch.nn.GRU. Keyword-only extras: ``reset_after`` (True: torch's / cuDNN's
    cell; False: Cho et al. 2014, reset applied before the recurrent matmul; same parameters),
    ``residual``, ``zoneout`` (as for the LSTM, on h), ``recurrent_dropout`` (as for the LSTM),
    ``layer_norm`` (haste's LayerNormGRU, reset_after=True only: x W_ih^T and h W_hh^T
    layer-normalised separately with gains ``layer_norm_weight_ih_l{k}`` /
    ``layer_norm_weight_hh_l{k}`` (3 * hidden_size,) before the biases).
    forward(input, hx=None, *, lengths=None) -> (output, h_n)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, reset_after: bool = True,
                 residual: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, residual=residual,
                         reset_after=reset_after, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout, layer_norm=layer_norm)

    def forward(self, input, hx=None, *, lengths: Tensor | None = None):
        return self._forward(input, hx, lengths)


class RNN(RNNBase):
    """Drop-in for torch.nn.RNN (``nonlinearity`` "tanh" or "relu"). Keyword-only extras:
    ``residual``, ``zoneout`` (as for the LSTM, on h), ``recurrent_dropout`` (as for the LSTM).
    forward(input, hx=None, *, lengths=None) -> (output, h_n)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 residual: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0) -> None:
        _validate.choice("nonlinearity", nonlinearity, ("tanh", "relu"))
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
                         device, dtype, residual=residual, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout)

    def forward(self, input, hx=None, *, lengths: Tensor | None = None):
        return self._forward(input, hx, lengths)
