"""Functional API of the selective scan (Mamba), a drop-in for ``mamba_ssm``'s
``selective_scan_fn``.

:func:`selective_scan` validates its arguments, brings them to the kernels' layout (B/C as
(dim, N) or (batch, G, N, L), variable (batch, N, L) as is for the CPU and Triton kernels; A, D,
delta_bias and the state in the accumulation dtype) and runs
the op of the backend chosen by :mod:`rnnkernels._backend`. The forward keeps only the states at
chunk starts; the backward recomputes the states chunk by chunk from them. Plain eager training
with the C++ ops records a C++ autograd node (csrc/selective_scan_autograd.cpp); torch.func
transforms and torch.compile go through the ops' Autograd kernel registered here.

Second order: the first order stays the fused backward op; a backward whose result must be
differentiable (``create_graph=True``, grad of grad) differentiates the reference scan instead
(slower, any order). torch.func ``grad``, ``vjp``, ``jacrev`` and ``vmap`` work (vmap rules on
the ops).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _backend, _kernels, _validate
from ..reference import selective_scan_reference
from . import _autograd
from ._autocast import autocast_promote
from ._autograd import batched, differentiable_vjp, fold, graph_needed, overload, unfold

# Largest state size N the kernels take (as mamba_ssm's).
MAX_STATE = 256
# Time steps between the saved states, per backend: the backward recomputes one chunk at a time.
# CPU: the kernels gather and scatter each channel's rows in spans of 64 steps (whole chunks; 256
# when the figures below were taken) whatever the chunk, so the chunk sets only the checkpoints and
# the recomputation's buffers, which stay in L1 for short chunks. The training step at 64 against
# 256 (python -m bench.chunk_effect, bench/results/cpu-2026-12-05-chunk-avx512-spans.md, Intel Xeon,
# AVX-512): 1.05x as fast at N = 16, 1.09x to 1.11x at 32 to 256, 1.05x to 1.07x at 4x the data. 32
# against 64 (bench/results/cpu-2026-12-06-chunk-avx512.md): 1.02x to 1.03x as fast at N = 16, 32
# and 64, as in the run before (1.01x to 1.02x); at N = 128 1.00x in this run and 1.01x in that, at
# 256 1.03x and 1.00x. The checkpoints hold N / chunk floats per value of u (at N = 16 and chunk 32,
# half of u's float32 size; at N = 256, eight times it), so states wider than NARROW_STATE keep
# chunks of WIDE_STATE_CHUNK["cpu"] steps at least: half the checkpoints' memory there, for 0% to 3%
# of speed. (Before the spans, the chunk was also the gathers' run length, and 256 was the faster
# chunk: bench/results/cpu-2026-12-05-chunk.md.)
CHUNK_SIZE = {"cpu": 32, "triton": 64, "cuda": 64}
# Per backend whose wide states (N > NARROW_STATE) take a longer chunk: the least chunk there.
WIDE_STATE_CHUNK = {"cpu": 64}
NARROW_STATE = 64


# Backends whose plain eager training records the C++ autograd node of the op
# selective_scan_autograd (csrc/selective_scan_autograd.cpp) instead of the Python
# autograd.Function: the C++ ops' (the Triton ops are Python). python -m bench.step_effect
# times the training step both ways.
CPP_AUTOGRAD_BACKENDS = {"cpu", "cuda"}


def chunk_size(backend: str, N: int) -> int:
    """The chunk of the op of ``backend`` for state size N (see CHUNK_SIZE)."""
    chunk = CHUNK_SIZE[backend]
    if N > NARROW_STATE and backend in WIDE_STATE_CHUNK:
        return max(chunk, WIDE_STATE_CHUNK[backend])
    return chunk


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ fake kernels and autograd

@torch.library.register_fake("rnnkernels::selective_scan_fwd")
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                             chunk_size, save):
    batch, dim, L = u.shape
    N = A.shape[1]
    acc = _acc_dtype(u.dtype)
    checkpoints = (batch, dim, (L + chunk_size - 1) // chunk_size * N) if save else (0,)
    return (u.new_empty(u.shape), u.new_empty((batch, dim, N), dtype=acc),
            u.new_empty(checkpoints, dtype=acc))


@torch.library.register_fake("rnnkernels::selective_scan_bwd")
def _selective_scan_bwd_fake(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias,
                             delta_softplus, initial_state, checkpoints, chunk_size):
    # Contiguous, as every kernel returns the gradients (empty_like would keep the strides of a
    # permuted input, unlike the real output: opcheck's stride check, and torch.compile's
    # graphs reading them).
    def like(t):
        return u.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias),
            like(initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size, save = inputs
    ctx.delta_softplus, ctx.chunk_size, ctx.save = delta_softplus, chunk_size, save
    # An unused last state and the checkpoints get no gradient instead of materialised zeros:
    # the backward op takes grad_last_state as optional.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])


def _backward_differentiable(inputs, grads, delta_softplus, needs):
    """First-order gradients that can be differentiated again: the reference scan recomputed
    from the saved inputs (all of which the fused backward keeps anyway), differentiated.
    inputs: (u, delta, A, B, C, D, z, delta_bias, initial_state); grads: of (out, last_state);
    needs: per input, whether its gradient is wanted (None for the others)."""

    def forward(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        True, initial_state=initial_state)

    return differentiable_vjp(forward, inputs, grads, needs)


@torch.library.impl("rnnkernels::selective_scan_vjp", "CompositeImplicitAutograd")
def _selective_scan_vjp(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias,
                        delta_softplus, initial_state, needs):
    """The create_graph backward of the C++ autograd node (csrc/selective_scan_autograd.cpp):
    the gradients of _backward_differentiable, empty (0,) where there is none."""
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    g = _backward_differentiable(inputs, (grad_out, grad_last_state), delta_softplus, needs)
    return tuple(u.new_empty((0,)) if t is None else t for t in g)


# Positions in selective_scan_fwd's arguments.
_U, _DELTA, _A, _B, _C, _D, _Z, _DELTA_BIAS, _INITIAL = 0, 1, 2, 3, 4, 5, 6, 7, 9


def _vmap_forward(op):
    """vmap of a selective-scan forward: a vmapped dimension on the per-row arguments (u,
    delta, z, initial_state, time-varying B / C) folds into the batch dimension (one kernel
    call); per-sample A, D, delta_bias or fixed (dim, N) B / C run one call each."""

    def rule(info, in_dims, *args):
        fixed = [p for p in (_B, _C) if args[p].dim() - (in_dims[p] is not None) == 2]
        if batched(in_dims, _A, _D, _DELTA_BIAS, *fixed):
            return _autograd.vmap_by_loop(op, info, in_dims, *args)
        n = info.batch_size
        rows = {_U, _DELTA, _B, _C, _Z, _INITIAL} - set(fixed)
        args = [fold(a, d, 0, n) if p in rows else a for p, (a, d) in enumerate(zip(args, in_dims))]
        out, last_state, checkpoints = op(*args)
        save = checkpoints.numel() > 0
        return ((unfold(out, 0, n), unfold(last_state, 0, n),
                 unfold(checkpoints, 0, n) if save else checkpoints), (0, 0, 0 if save else None))

    return rule


def register_autograd(fwd_op, bwd_op) -> None:
    """Registers the backward and vmap rules of a selective-scan op pair (C++ or Triton).

    First order (``create_graph=False``, one ``torch.func.grad``): the fused backward op. When
    the gradients must be differentiable themselves (``create_graph=True``, grad of grad), the
    backward recomputes the scan with the reference from the saved inputs and differentiates
    it: slower, any order. vmap of the backward op runs one call per sample, as the gradients
    of A, D, delta_bias and fixed B / C sum over the batch."""
    fwd, bwd = overload(fwd_op), overload(bwd_op)

    def backward(ctx, grad_out, grad_last_state, _grad_checkpoints):
        if not ctx.save:
            raise RuntimeError("rnnkernels: selective_scan_fwd was called with save=False, so it "
                               "kept no states to differentiate; call it with save=True when a "
                               "gradient is needed")
        u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        if graph_needed(*inputs, grad_out, grad_last_state):
            needs = ctx.needs_input_grad
            g = _backward_differentiable(inputs, (grad_out, grad_last_state),
                                         ctx.delta_softplus, needs[:8] + needs[9:10])
            return (*g[:8], None, g[8], None, None)
        with torch.no_grad():  # the fused op has no autograd, and no graph is needed
            if grad_out is None:  # only the last state is used
                grad_out = torch.zeros_like(u)
            g = bwd(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias,
                    ctx.delta_softplus, initial_state, checkpoints, ctx.chunk_size)

        def given(grad, t):
            return None if t is None else grad

        return (g[0], g[1], g[2], g[3], g[4], given(g[5], D), given(g[6], z),
                given(g[7], delta_bias), None, given(g[8], initial_state), None, None)

    _autograd.register_autograd(fwd, backward, _setup_context)
    torch.library.register_vmap(fwd, _vmap_forward(fwd))
    torch.library.register_vmap(bwd, functools.partial(_autograd.vmap_by_loop, bwd))


register_autograd("rnnkernels::selective_scan_fwd", torch.ops.rnnkernels.selective_scan_bwd)

if _kernels.triton_importable():
    from ..triton import selective_scan as _triton

    register_autograd(_triton.selective_scan_fwd_triton, _triton.selective_scan_bwd_triton)


# ------------------------------------------------------------------ validation and dispatch

def _param(name: str, t: object, shape: tuple[int | str, ...], u: Tensor) -> Tensor:
    """A parameter on u's device in any floating dtype (mamba_ssm keeps A, D, delta_bias and
    fixed B/C in float32 next to half-precision activations)."""
    if isinstance(t, Tensor) and t.is_complex():
        raise TypeError(f"{name} must be real: complex {name} is not supported, got dtype "
                        f"{t.dtype}")
    return _validate.tensor(name, t, shape=shape, like=u, floating=True,
                            dtype=t.dtype if isinstance(t, Tensor) else None)


def _check_bc(name: str, M: object, u: Tensor, N: int) -> int:
    """Checks B or C; returns its number of groups (0 for the fixed (dim, N) form)."""
    batch, dim, L = u.shape
    if isinstance(M, Tensor) and M.dim() not in (2, 3, 4):
        raise ValueError(f"{name} must be (dim, N) fixed, (batch, N, L) variable or "
                         f"(batch, G, N, L) grouped, got shape {tuple(M.shape)}")
    ndim = M.dim() if isinstance(M, Tensor) else 2
    shape = {2: (dim, N), 3: (batch, N, L), 4: (batch, "G", N, L)}[ndim]
    M = _param(name, M, shape, u)
    if ndim < 4:
        return 0 if ndim == 2 else 1
    G = M.shape[1]
    if G == 0 or dim % G:
        raise ValueError(f"{name} has {G} groups, which must divide dim = {dim} (the channels "
                         f"of u), got shape {tuple(M.shape)}")
    return G


def _accepts(u, delta, A, B, C, D, z, delta_bias, initial_state) -> bool:
    """Whether the arguments are the common well-formed case, on which :func:`_check` passes:
    tensors on u's device; u, delta and z of one floating dtype and shape (batch, dim, L) with
    dim and L positive; A (dim, N) with 1 <= N <= MAX_STATE; B and C (batch, N, L); D and
    delta_bias (dim,); initial_state (batch, dim, N); every parameter floating. A few
    comparisons instead of _check's generic validators, which take tens of microseconds of a
    training step once its kernels have evicted the interpreter's caches; _check runs where
    this says no, and raises the error."""
    if not (isinstance(u, Tensor) and isinstance(delta, Tensor) and isinstance(A, Tensor)
            and isinstance(B, Tensor) and isinstance(C, Tensor)):
        return False
    shape, dtype, device = u.shape, u.dtype, u.device
    if len(shape) != 3 or not dtype.is_floating_point or delta.dtype != dtype:
        return False
    batch, dim, L = shape
    N = A.shape[1] if A.dim() == 2 else 0
    if not (dim and L and 1 <= N <= MAX_STATE and delta.shape == shape and A.shape[0] == dim
            and B.shape == (batch, N, L) and C.shape == (batch, N, L)):
        return False
    params = [A, B, C]
    for t, want in ((D, (dim,)), (delta_bias, (dim,)), (initial_state, (batch, dim, N))):
        if t is not None:
            if not isinstance(t, Tensor) or t.shape != want:
                return False
            params.append(t)
    if z is not None and not (isinstance(z, Tensor) and z.shape == shape and z.dtype == dtype
                              and z.device == device):
        return False
    return (delta.device == device
            and all(t.dtype.is_floating_point and t.device == device for t in params))


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    _validate.tensor("u", u, ndim=3, floating=True)
    _validate.nonempty("u", u, [(1, "channel"), (2, "time step")])
    batch, dim, L = u.shape
    _validate.tensor("delta", delta, shape=(batch, dim, L), like=u)
    A = _param("A", A, (dim, "N"), u)
    N = A.shape[1]
    if not 1 <= N <= MAX_STATE:
        raise ValueError(f"A must have between 1 and {MAX_STATE} state columns (N, the kernels' "
                         f"limit), got shape {tuple(A.shape)}")
    groups_B, groups_C = _check_bc("B", B, u, N), _check_bc("C", C, u, N)
    if groups_B and groups_C and groups_B != groups_C:
        raise ValueError(f"B and C must have the same number of groups when both vary with "
                         f"time, got {groups_B} and {groups_C}")
    if D is not None:
        _param("D", D, (dim,), u)
    if delta_bias is not None:
        _param("delta_bias", delta_bias, (dim,), u)
    _validate.optional("z", z, shape=(batch, dim, L), like=u)
    if initial_state is not None:
        _param("initial_state", initial_state, (batch, dim, N), u)


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in dtype (no call where it has it already: a decoding or small training step pays
    microseconds for each no-op .to)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _grouped(M: Tensor, dtype: torch.dtype, acc: torch.dtype, backend: str) -> Tensor:
    """B or C in the op's layout: fixed (dim, N) in acc, else variable in u's dtype, as
    (batch, G, N, L), or for the CPU and Triton ops, which take it as is, also (batch, N, L):
    without the view that adds a node to the autograd graph of every call."""
    if M.dim() == 2:
        return _as(M, acc)
    return _as(M.unsqueeze(1) if M.dim() == 3 and backend == "cuda" else M, dtype)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, initial_state: Tensor | None = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan of Mamba, with ``mamba_ssm.selective_scan_fn``'s arguments:

        x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t,   y_t = C_t . x_t + D u_t,
        out_t = y_t * silu(z_t),   delta = softplus(delta + delta_bias) with ``delta_softplus``.

    u, delta, z: (batch, dim, L), one floating dtype; A: (dim, N) real, N <= 256; B, C: (dim, N)
    fixed, (batch, N, L) variable or (batch, G, N, L) grouped (channel d reads group
    d // (dim // G)); D, delta_bias: (dim,); initial_state: (batch, dim, N) (zeros when None).
    A, B, C, D, delta_bias and initial_state may have any floating dtype (float32 next to half
    precision activations, as in mamba_ssm). Returns out (batch, dim, L) in u's dtype, and with
    ``return_last_state`` the pair (out, last_state), last_state (batch, dim, N) in float32
    (float64 for float64 input). Gradients flow through initial_state and last_state, so a
    sequence scanned chunk by chunk gives exactly the result of one pass.

    Under ``torch.autocast`` the scan keeps its inputs' precision (it is memory-bound, with no
    matmul to speed up): u, delta and z are brought to the widest dtype among them (autocast's
    "promote" rule), the scan runs in that dtype with a float32 state and float32 accumulation,
    and out has that dtype; the parameters keep their dtypes as outside autocast.
    """
    u, delta, z = autocast_promote(u, delta, z)
    if not _accepts(u, delta, A, B, C, D, z, delta_bias, initial_state):
        _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = _backend.choose("selective_scan", u.device, u.dtype)
    if backend == "reference" or u.shape[0] == 0:  # no batch row: nothing for a kernel to do
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        return_last_state, initial_state=initial_state)
    acc = _acc_dtype(u.dtype)
    save = _autograd.needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    fwd = (_triton.selective_scan_fwd_triton if backend == "triton"
           else torch.ops.rnnkernels.selective_scan_fwd)
    args = (u, delta, _as(A, acc), _grouped(B, u.dtype, acc, backend),
            _grouped(C, u.dtype, acc, backend), _as(D, acc), z, _as(delta_bias, acc),
            bool(delta_softplus), _as(initial_state, acc), chunk_size(backend, A.shape[1]),
            save)
    if save and backend in CPP_AUTOGRAD_BACKENDS and _autograd.plain_eager():
        # No Python in the step's autograd path (csrc/selective_scan_autograd.cpp).
        out, last_state = torch.ops.rnnkernels.selective_scan_autograd.default(*args[:-1])
    else:
        out, last_state, _ = _autograd.call(fwd, save, *args)
    return (out, last_state) if return_last_state else out


__all__ = ["CHUNK_SIZE", "CPP_AUTOGRAD_BACKENDS", "MAX_STATE", "NARROW_STATE", "WIDE_STATE_CHUNK",
           "chunk_size", "selective_scan"]
