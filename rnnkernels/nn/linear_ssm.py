"""A diagonal linear state-space layer (S4D-Real) computed three ways: recurrence, scan,
convolution.

Each of the ``channels`` input channels has its own single-input single-output SSM with N real
diagonal states:

    continuous:  x'(t) = A x(t) + B u(t),   y(t) = C . x(t) + D u(t)
    ZOH, step dt:  Ab = exp(dt A),  Bb = (Ab - 1) / A * B        (exact for piecewise-constant u)
    discrete:    x_t = Ab x_{t-1} + Bb u_t,  y_t = C . x_t + D u_t
    kernel:      K_l = sum_n C_n Bb_n Ab_n^l,  y = (K * u)_causal + D u

Because the recurrence is linear and time-invariant, the same output is a causal convolution
with K: the recurrence costs O(L N) per channel in L sequential steps, and :meth:`step` carries
only the O(N) state (inference, one token at a time); the convolution costs O(L N) to build K
plus O(L log L) through the FFT, with every step in parallel (training). Over a whole sequence
the "recurrent" and "scan" modes keep every state, (batch, L, channels, N), for the readout and
the backward; the "conv" mode keeps the Vandermonde matrix Ab^l, (channels, N, L).

Initialisation (S4D-Real, Gu et al. 2022, "On the Parameterization and Initialization of
Diagonal State Space Models"): A_n = -(n + 1) for n = 0..N-1 (the diagonal of HiPPO-LegS), B_n = 1,
C_n ~ N(0, 1/N), D ~ N(0, 1), dt log-uniform in [dt_min, dt_max] per channel. A is stored as
log(-A) so it stays negative (the SSM stays stable) whatever the optimiser does; dt as log(dt).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops import linear_scan
from ..ops._autocast import autocast_input

MODES = ("recurrent", "scan", "conv")


# exp() of arguments below about -87 gives float32 subnormals, which the CPU computes tens of
# times slower than normal numbers; a power of Ab that small (< 2e-35) is negligible next to
# any rounding error, so the exponent is clamped at this floor.
_LOG_POWER_FLOOR = -80.0


def _powers(dtA: Tensor, exponents: Tensor) -> Tensor:
    """Ab ** exponents as (channels, N, len(exponents)), Ab = exp(dtA): the Vandermonde matrix the
    conv mode materialises (its memory cost). exp(l dt A) rather than repeated products: every
    power in one pass."""
    return torch.exp((dtA.unsqueeze(-1) * exponents).clamp(min=_LOG_POWER_FLOOR))


class LinearSSM(nn.Module):
    """Diagonal linear SSM layer over ``channels`` independent channels of ``state_size`` states.

    forward(u: (batch, L, channels), *, mode=None, return_state=False) -> y (batch, L, channels),
    and the last state (batch, channels, state_size) when ``return_state``. ``mode`` overrides
    the module's: "recurrent" (a step loop in PyTorch), "scan" (``rnnkernels.ops.linear_scan``)
    or "conv" (FFT convolution with the SSM kernel). All three compute the same function.
    step(u_t: (batch, channels), state: (batch, channels, state_size)) -> (y_t, state) advances
    one step with O(state) memory, e.g. to generate after a prefix run with return_state=True.
    """

    def __init__(self, channels: int, state_size: int = 64, *, mode: str = "conv",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, device=None,
                 dtype=None) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("state_size", state_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _validate.choice("mode", mode, MODES)
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))
                and 0 < dt_min <= dt_max):
            raise ValueError(f"dt_min and dt_max must be numbers with 0 < dt_min <= dt_max, got "
                             f"{dt_min!r} and {dt_max!r}")
        factory = {"device": device, "dtype": dtype}
        self.channels = channels
        self.state_size = state_size
        self.mode = mode
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.log_neg_A = nn.Parameter(torch.empty(channels, state_size, **factory))
        self.B = nn.Parameter(torch.empty(channels, state_size, **factory))
        self.C = nn.Parameter(torch.empty(channels, state_size, **factory))
        self.D = nn.Parameter(torch.empty(channels, **factory))
        self.log_dt = nn.Parameter(torch.empty(channels, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """S4D-Real: A_n = -(n+1), B = 1, C ~ N(0, 1/N), D ~ N(0, 1), dt log-uniform."""
        N = self.state_size
        with torch.no_grad():
            n = torch.arange(N, dtype=torch.float64)
            self.log_neg_A.copy_(torch.log(n + 1).expand(self.channels, N))
            self.B.fill_(1.0)
            nn.init.normal_(self.C, std=1.0 / math.sqrt(N))
            nn.init.normal_(self.D)
            self.log_dt.uniform_(math.log(self.dt_min), math.log(self.dt_max))

    def extra_repr(self) -> str:
        return f"{self.channels}, state_size={self.state_size}, mode={self.mode!r}"

    # ------------------------------------------------------------------ the SSM's pieces

    def _zoh(self) -> tuple[Tensor, Tensor]:
        """(dt A, Bb), each (channels, state_size); Ab = exp(dt A)."""
        A = -torch.exp(self.log_neg_A)
        dtA = torch.exp(self.log_dt).unsqueeze(-1) * A
        # expm1 keeps (Ab - 1) / A accurate when dt * A is tiny.
        return dtA, torch.expm1(dtA) / A * self.B

    def discretize(self) -> tuple[Tensor, Tensor]:
        """Zero-order hold: (Ab, Bb), each (channels, state_size)."""
        dtA, Bb = self._zoh()
        return torch.exp(dtA), Bb

    def kernel(self, length: int) -> Tensor:
        """K (channels, length): K_l = sum_n C_n Bb_n Ab_n^l, the SSM's impulse response."""
        dtA, Bb = self._zoh()
        steps = torch.arange(length, device=dtA.device, dtype=dtA.dtype)
        return torch.einsum("hn,hnl->hl", self.C * Bb, _powers(dtA, steps))

    def initial_state(self, batch: int) -> Tensor:
        """A zero state (batch, channels, state_size) for :meth:`step`."""
        return self.log_neg_A.new_zeros((batch, self.channels, self.state_size))

    # ------------------------------------------------------------------ forward

    def _check_input(self, u: object) -> Tensor:
        p = self.log_neg_A
        u = _validate.tensor("u", autocast_input(u, p), ndim=3, floating=True)
        if u.shape[2] != self.channels:
            raise ValueError(f"u must have shape (batch, L, {self.channels}) (channels last), got "
                             f"{tuple(u.shape)}")
        _validate.nonempty("u", u, [(1, "time step")])
        if u.dtype != p.dtype:
            raise TypeError(f"u must have the module's dtype {p.dtype}, got {u.dtype}")
        if u.device != p.device:
            raise ValueError(f"u must be on the module's device {p.device}, got {u.device}")
        return u

    def forward(self, u: Tensor, *, mode: str | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """u: (batch, L, channels) -> y (batch, L, channels) [, last state (batch, channels, N)]."""
        u = self._check_input(u)
        mode = self.mode if mode is None else mode
        _validate.choice("mode", mode, MODES)
        if mode == "recurrent":
            y, state = self._recurrent(u)
        elif mode == "scan" or u.shape[0] == 0:  # MKL's FFT refuses an empty batch
            y, state = self._scan(u)
        else:
            y, state = self._conv(u, return_state)
        return (y, state) if return_state else y

    def _recurrent(self, u: Tensor) -> tuple[Tensor, Tensor]:
        Ab, Bb = self.discretize()
        # Bb u_t for every step at once, so the loop is one fused op (and one autograd node) per
        # step; the readout C . x_t is one einsum over the kept states after the loop. unbind,
        # not bu[:, t]: the backward of each of L slicings would write a zero tensor the size of
        # bu, O(L^2) in all.
        bu = Bb * u.unsqueeze(-1)                                   # (batch, L, H, N)
        state = self.initial_state(u.shape[0])
        states = []
        for bu_t in bu.unbind(1):
            state = torch.addcmul(bu_t, Ab, state)
            states.append(state)
        y = torch.einsum("blhn,hn->blh", torch.stack(states, 1), self.C)
        return y + self.D * u, state

    def _scan(self, u: Tensor) -> tuple[Tensor, Tensor]:
        Ab, Bb = self.discretize()
        batch, L, H = u.shape
        N = self.state_size
        # One scan channel per (channel, state): a_t = Ab (the same every step), b_t = Bb u_t.
        # The (H N) channels are never merged from or split into (H, N) along a tensor with
        # time in its strides: under torch 2.11's export such a reshape guarded on
        # min(L, N L) == L and so refused a dynamic length. b takes each channel of u N times
        # (an index_select: repeat_interleave reshapes); y_h = sum_n C[h, n] x_(h, n) is a
        # grouped 1x1 convolution over the (H N) channels; the last state is made contiguous
        # before it is split.
        a = Ab.reshape(1, H * N, 1).expand(batch, H * N, L)
        channel = torch.arange(H, device=u.device).repeat_interleave(N)
        b = Bb.reshape(1, H * N, 1) * u.transpose(1, 2).index_select(1, channel)
        states = linear_scan(a, b)
        y = nn.functional.conv1d(states, self.C.unsqueeze(-1), groups=H).transpose(1, 2)
        last = states[..., -1].contiguous().view(batch, H, N)
        return y + self.D * u, last

    def _conv(self, u: Tensor, with_state: bool) -> tuple[Tensor, Tensor | None]:
        L = u.shape[1]
        K = self.kernel(L)
        n = 2 * L  # zero padding to 2L makes the FFT's circular convolution a causal linear one
        uf = torch.fft.rfft(u.transpose(1, 2), n=n)
        y = torch.fft.irfft(uf * torch.fft.rfft(K, n=n), n=n)[..., :L].transpose(1, 2)
        state = None
        if with_state:
            # x_{L-1} = sum_l Ab^(L-1-l) Bb u_l: the kernel's powers, reversed in time.
            dtA, Bb = self._zoh()
            back = torch.arange(L - 1, -1, -1, device=u.device, dtype=u.dtype)
            state = torch.einsum("hnl,blh->bhn", _powers(dtA, back), u) * Bb
        return y + self.D * u, state

    def step(self, u_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step: u_t (batch, channels), state (batch, channels, N) -> (y_t, new state)."""
        p = self.log_neg_A
        u_t = _validate.tensor("u_t", autocast_input(u_t, p), shape=("batch", self.channels),
                               floating=True)
        if u_t.dtype != p.dtype or u_t.device != p.device:
            raise TypeError(f"u_t must have the module's dtype {p.dtype} and device {p.device}, "
                            f"got {u_t.dtype} on {u_t.device}")
        _validate.tensor("state", state, shape=(u_t.shape[0], self.channels, self.state_size),
                         like=u_t)
        Ab, Bb = self.discretize()
        state = Ab * state + Bb * u_t.unsqueeze(-1)
        return (state * self.C).sum(-1) + self.D * u_t, state
