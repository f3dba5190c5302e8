"""The Mamba block (Gu and Dao, 2023) on rnnkernels' selective scan.

Hyperparameters, parameter names, shapes and initialisation follow ``mamba_ssm.modules.
mamba_simple.Mamba``, so a state_dict saved from theirs loads into ours and the other way round.
The block calls :func:`rnnkernels.ops.selective_scan` (not a fused in-projection-to-out-projection
kernel), on whichever backend the input allows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from ..ops import selective_scan
from ..ops.selective_scan import MAX_STATE


class Mamba(nn.Module):
    """in_proj -> causal depthwise conv1d -> silu -> x_proj -> dt_proj -> selective scan
    (softplus(dt + dt_proj.bias), A = -exp(A_log), skip D) -> silu(z) gate -> out_proj.

    d_model: model width; d_state: N, the state size per channel; d_conv: width of the causal
    convolution; expand: d_inner = expand * d_model channels; dt_rank: rank of the dt projection
    ("auto": ceil(d_model / 16)); dt_min, dt_max: range of softplus(dt_proj.bias) at
    initialisation (log-uniform, floored at dt_init_floor); dt_init ("random" or "constant") and
    dt_scale: initialisation of dt_proj.weight; conv_bias, bias: biases of conv1d and of
    in_proj/out_proj; use_fast_path: taken for mamba_ssm's signature (its two paths, the fused
    one and conv1d then the scan, compute the same block; this block has one path); layer_idx
    names the layer's slot in an inference cache.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _validate.choice("dt_init", dt_init, ("random", "constant"))
        if not 1 <= d_state <= MAX_STATE:
            raise ValueError(f"d_state must lie in [1, {MAX_STATE}] (the scan kernels' limit), "
                             f"got {d_state}")
        if d_model < 1 or d_conv < 1 or expand * d_model < 1:
            raise ValueError(f"d_model, d_conv and expand * d_model must be positive, got "
                             f"d_model={d_model}, d_conv={d_conv}, expand={expand}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        # dt_proj: weight scaled to keep the variance of dt; bias = softplus^-1 of a dt drawn
        # log-uniformly in [dt_min, dt_max], so that softplus(bias) starts in that range.
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner, **factory)
                           * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # Marks honoured by mamba_ssm's training code: no re-initialisation, no weight decay.
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation, A = -(1, 2, ..., N) per channel; A_log and D stay float32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(A).repeat(self.d_inner, 1))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dt (without its bias), B and C from the convolved input x (..., d_inner)."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state],
                               dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _scan(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor,
              initial_state: Tensor | None, last_state: bool) -> Tensor | tuple[Tensor, Tensor]:
        """x, dt, z: (batch, d_inner, L); B, C: (batch, d_state, L)."""
        return selective_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                              return_last_state=last_state, initial_state=initial_state)

    def forward(self, hidden_states: Tensor, inference_params: Any = None) -> Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model).

        inference_params (as mamba_ssm's InferenceParams: ``key_value_memory_dict`` and
        ``seqlen_offset``) keeps this layer's conv and SSM states under ``layer_idx``: with
        seqlen_offset 0 the call fills them from the whole sequence, afterwards it decodes one
        token with :meth:`step`.
        """
        _validate.tensor("hidden_states", hidden_states, shape=("batch", "L", self.d_model),
                         floating=True)
        _validate.nonempty("hidden_states", hidden_states, [(1, "time step")])
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                return self.step(hidden_states, conv_state, ssm_state)[0]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        if conv_state is not None:
            # The last d_conv inputs, zero-padded on the left when the sequence is shorter.
            conv_state.copy_(F.pad(x, (self.d_conv - seqlen, 0)))
        x = F.silu(self.conv1d(x)[..., :seqlen])
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        y = self._scan(x, dt.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2), z, None,
                       ssm_state is not None)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Decodes one token in O(1) time and memory, updating the states in place.

        hidden_states: (batch, 1, d_model); conv_state: (batch, d_inner, d_conv); ssm_state:
        (batch, d_inner, d_state). Returns (out (batch, 1, d_model), conv_state, ssm_state).
        """
        _validate.tensor("hidden_states", hidden_states, shape=("batch", 1, self.d_model),
                         floating=True)
        batch = hidden_states.shape[0]
        _validate.tensor("conv_state", conv_state, shape=(batch, self.d_inner, self.d_conv),
                         floating=True)
        _validate.tensor("ssm_state", ssm_state, shape=(batch, self.d_inner, self.d_state),
                         floating=True)
        x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x).to(hidden_states.dtype)
        dt, B, C = self._ssm_inputs(x)
        y, last_state = self._scan(x[..., None], dt[..., None], B[..., None], C[..., None],
                                   z[..., None], ssm_state, True)
        ssm_state.copy_(last_state)
        return self.out_proj(y[..., 0]).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: torch.dtype | None = None, **kwargs: Any
                                 ) -> tuple[Tensor, Tensor]:
        """Zeroed (conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state)), in
        the conv1d's and dt_proj's dtypes unless ``dtype`` is given. max_seqlen and kwargs are
        accepted for mamba_ssm's interface; the states do not grow with the sequence."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=dtype or self.conv1d.weight.dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=dtype or self.dt_proj.weight.dtype)
        return conv_state, ssm_state

    def _states_from_cache(self, inference_params: Any, batch_size: int) -> tuple[Tensor, Tensor]:
        if self.layer_idx is None:
            raise ValueError("Mamba needs layer_idx to keep its states in inference_params")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, 0)
        return cache[self.layer_idx]


__all__ = ["Mamba"]
