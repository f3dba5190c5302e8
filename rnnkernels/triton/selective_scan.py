"""Triton kernels of the selective scan (Mamba), same chunked design as the CPU kernels.

    x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,  y_t = C_t . x_t + D u_t,  out_t = y_t silu(z_t).

Decomposition. One program owns a block of BLOCK_D channels of one batch row inside one group of
B/C, and the state of those channels, a (BLOCK_D, BLOCK_N) float32 tile held in registers; it
walks the sequence one step at a time (the recurrence is sequential), reading u, delta, z of its
channels and the step's B_t, C_t rows once.

Memory. The forward reads every input once, writes out once and, with SAVE, the state at every
chunk start (checkpoints (batch, dim, ceil(L / CHUNK) * N)). The backward walks the chunks in
reverse: it recomputes the chunk's states from its checkpoint into a per-program scratch tile
(CHUNK + 1, BLOCK_D, BLOCK_N), then runs the reverse recurrence over them. Gradients that sum
over a block's channels (grouped B/C) are summed in the program and written as per-block
partials (batch, G, blocks, N, L); gradients that sum over L (A, fixed B/C, D, delta_bias) are
summed in the program and written per batch row. The launcher sums the partials with torch
(fixed order, no atomics: the result is deterministic).
"""


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .. import _validate
from . import launchable

# Register budget of one program's state tile: BLOCK_D * BLOCK_N <= STATE_TILE.
STATE_TILE = 1024
MAX_BLOCK_D = 32
SOFTPLUS_THRESHOLD = 20.0  # softplus(v) = v above it, as torch and mamba_ssm


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _discretise(delta_ptr, bias, row, t, d_mask, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):
    """v = delta + bias and dt = softplus(v) (or v) of one step, per channel of the block."""
    v = tl.load(delta_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += bias
    if SOFTPLUS:
        dt = tl.where(v > SOFTPLUS_THRESHOLD, v, tl.log(1.0 + tl.exp(v)))
    else:
        dt = v
    return v, dt


@triton.jit
def _bc_row(ptr, fixed, base, n, n_mask, t, L, VAR: tl.constexpr):
    """B_t or C_t as a (1, BLOCK_N) row (grouped form) or the fixed (BLOCK_D, BLOCK_N) tile."""
    if VAR:
        return tl.load(ptr + base + n * L + t, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        return fixed


@triton.jit
def _block(dim, G, blocks, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, N):
    """The program's batch row, group, block, channels and state lanes."""
    b = tl.program_id(1)
    g = tl.program_id(0) // blocks
    k = tl.program_id(0) % blocks
    per_group = dim // G
    d_local = k * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_local < per_group
    d = g * per_group + d_local
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    return b, g, k, d, d_mask, n, n_mask


@triton.jit
def _params(A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, b, g, d, d_mask, n, n_mask, dim, L, N, G,
            B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_D: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """What both kernels load before the time loop: A, fixed B / C, D and the delta bias of the
    block, its (d, n) state mask and offsets, and the bases of its (batch, dim, L) rows and of
    its group's (batch, G, N, L) B / C rows."""
    dn_mask = d_mask[:, None] & n_mask[None, :]
    dn = d[:, None] * N + n[None, :]
    A = tl.load(A_ptr + dn, mask=dn_mask, other=0.0).to(tl.float32)
    B_fixed = tl.load(B_ptr + dn, mask=dn_mask & (not B_VAR), other=0.0).to(tl.float32)
    C_fixed = tl.load(C_ptr + dn, mask=dn_mask & (not C_VAR), other=0.0).to(tl.float32)
    Dd = tl.load(D_ptr + d, mask=d_mask & HAS_D, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=d_mask & HAS_BIAS, other=0.0).to(tl.float32)
    state = (b * dim + d)[:, None] * N + n[None, :]
    row = (b * dim + d).to(tl.int64) * L  # int64: batch * dim * L may pass 2^31
    bc_base = ((b * G + g) * N).to(tl.int64) * L
    return dn_mask, A, B_fixed, C_fixed, Dd, bias, state, row, bc_base


@triton.jit
def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, x0_ptr,
        out_ptr, last_ptr, ckpt_ptr, dim, L, N, G, blocks, nchunks,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_X0: tl.constexpr,
        SAVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b, g, _, d, d_mask, n, n_mask = _block(dim, G, blocks, BLOCK_D, BLOCK_N, N)
    dn_mask, A, B_fixed, C_fixed, Dd, bias, state, row, bc_base = _params(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, b, g, d, d_mask, n, n_mask, dim, L, N, G, B_VAR,
        C_VAR, HAS_D, HAS_BIAS)
    x = tl.load(x0_ptr + state, mask=dn_mask & HAS_X0, other=0.0).to(tl.float32)
    for t in range(L):
        if SAVE:  # the state before each chunk's first step
            ck = ((b * dim + d).to(tl.int64) * nchunks + t // CHUNK)[:, None] * N + n[None, :]
            tl.store(ckpt_ptr + ck, x, mask=dn_mask & (t % CHUNK == 0))
        _, dt = _discretise(delta_ptr, bias, row, t, d_mask, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
        Bt = _bc_row(B_ptr, B_fixed, bc_base, n, n_mask, t, L, B_VAR)
        Ct = _bc_row(C_ptr, C_fixed, bc_base, n, n_mask, t, L, C_VAR)
        x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * Bt
        y = tl.sum(x * Ct, 1) + Dd * u
        if HAS_Z:
            zt = tl.load(z_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
            y = y * zt * _sigmoid(zt)
        tl.store(out_ptr + row + t, y, mask=d_mask)
    tl.store(last_ptr + state, x, mask=dn_mask)


@triton.jit
def _selective_scan_bwd_kernel(
        gout_ptr, glast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        ckpt_ptr, scratch_ptr,
        gu_ptr, gdelta_ptr, gz_ptr, gx0_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
        dim, L, N, G, blocks, nchunks,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_X0: tl.constexpr,
        HAS_GLAST: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr):
    b, g, k, d, d_mask, n, n_mask = _block(dim, G, blocks, BLOCK_D, BLOCK_N, N)
    dn_mask, A, B_fixed, C_fixed, Dd, bias, state, row, bc_base = _params(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, b, g, d, d_mask, n, n_mask, dim, L, N, G, B_VAR,
        C_VAR, HAS_D, HAS_BIAS)
    h = tl.load(glast_ptr + state, mask=dn_mask & HAS_GLAST, other=0.0).to(tl.float32)
    # Partials of grouped B/C gradients: (batch, G, blocks, N, L), this program's slice.
    part = (((b * G + g) * blocks + k) * N).to(tl.int64) * L
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    scratch = scratch_ptr + program * (CHUNK + 1) * BLOCK_D * BLOCK_N + tile
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dB_fixed = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dC_fixed = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        ck = ((b * dim + d).to(tl.int64) * nchunks + c)[:, None] * N + n[None, :]
        x = tl.load(ckpt_ptr + ck, mask=dn_mask, other=0.0)
        tl.store(scratch, x)
        for t in range(t0, t1):
            _, dt = _discretise(delta_ptr, bias, row, t, d_mask, HAS_BIAS, SOFTPLUS)
            u = tl.load(u_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
            Bt = _bc_row(B_ptr, B_fixed, bc_base, n, n_mask, t, L, B_VAR)
            x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * Bt
            tl.store(scratch + (t - t0 + 1) * BLOCK_D * BLOCK_N, x)
        tl.debug_barrier()
        for j in range(t1 - t0):
            t = t1 - 1 - j
            x = tl.load(scratch + (t - t0 + 1) * BLOCK_D * BLOCK_N)
            x_prev = tl.load(scratch + (t - t0) * BLOCK_D * BLOCK_N)
            v, dt = _discretise(delta_ptr, bias, row, t, d_mask, HAS_BIAS, SOFTPLUS)
            u = tl.load(u_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
            Bt = _bc_row(B_ptr, B_fixed, bc_base, n, n_mask, t, L, B_VAR)
            Ct = _bc_row(C_ptr, C_fixed, bc_base, n, n_mask, t, L, C_VAR)
            a = tl.exp(dt[:, None] * A)
            gy = tl.load(gout_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=d_mask, other=0.0).to(tl.float32)
                sg = _sigmoid(zt)
                y = tl.sum(x * Ct, 1) + Dd * u
                tl.store(gz_ptr + row + t, gy * y * sg * (1.0 + zt * (1.0 - sg)), mask=d_mask)
                gy = gy * zt * sg
            dD += gy * u
            h += gy[:, None] * Ct
            if C_VAR:
                tl.store(gC_ptr + part + n * L + t, tl.sum(gy[:, None] * x, 0), mask=n_mask)
            else:
                dC_fixed += gy[:, None] * x
            if B_VAR:
                tl.store(gB_ptr + part + n * L + t, tl.sum(h * (dt * u)[:, None], 0),
                         mask=n_mask)
            else:
                dB_fixed += h * (dt * u)[:, None]
            s1 = tl.sum(h * Bt, 1)
            q = h * a * x_prev
            gdt = u * s1 + tl.sum(q * A, 1)
            dA += q * dt[:, None]
            if SOFTPLUS:
                gdt = tl.where(v > SOFTPLUS_THRESHOLD, gdt, gdt * _sigmoid(v))
            dbias += gdt
            tl.store(gu_ptr + row + t, gy * Dd + dt * s1, mask=d_mask)
            tl.store(gdelta_ptr + row + t, gdt, mask=d_mask)
            h = a * h
        tl.debug_barrier()
    if HAS_X0:
        tl.store(gx0_ptr + state, h, mask=dn_mask)
    # Per batch row sums over L (at the state's offsets); the launcher sums them over batch.
    tl.store(gA_ptr + state, dA, mask=dn_mask)
    if not B_VAR:
        tl.store(gB_ptr + state, dB_fixed, mask=dn_mask)
    if not C_VAR:
        tl.store(gC_ptr + state, dC_fixed, mask=dn_mask)
    tl.store(gD_ptr + b * dim + d, dD, mask=d_mask)
    tl.store(gbias_ptr + b * dim + d, dbias, mask=d_mask)


def _layout(u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> dict:
    """Grid and block sizes shared by the forward and backward launches."""
    batch, dim, L = u.shape
    N = A.shape[1]
    G = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    block_n = triton.next_power_of_2(N)
    block_d = min(triton.next_power_of_2(dim // G), MAX_BLOCK_D, max(1, STATE_TILE // block_n))
    blocks = triton.cdiv(dim // G, block_d)
    return {"batch": batch, "dim": dim, "L": L, "N": N, "G": G, "blocks": blocks,
            "grid": (G * blocks, batch), "BLOCK_D": block_d, "BLOCK_N": block_n}


def _flags(B: Tensor, C: Tensor, D, z, delta_bias, delta_softplus, initial_state) -> dict:
    return {"B_VAR": B.dim() == 4, "C_VAR": C.dim() == 4, "HAS_D": D is not None,
            "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(delta_softplus), "HAS_X0": initial_state is not None}


def _grouped(M: Tensor) -> Tensor:
    """Variable B or C as (batch, G, N, L): (batch, N, L) is one group (a view)."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _variable_grad(partials: Tensor, shape: torch.Size) -> Tensor:
    """The gradient of a variable B or C of ``shape``, (batch, N, L) or (batch, G, N, L), from
    its per-block partials (batch, G, blocks, N, L): a tensor of its own, not a view of them (an
    op's outputs must not be views)."""
    return partials.flatten(1, 2).sum(1) if len(shape) == 3 else partials.sum(2)


def _contiguous(*tensors: Tensor | None, fill: Tensor) -> list[Tensor]:
    """Contiguous tensors; an absent one becomes ``fill`` (never read: its flag is off)."""
    return [fill if t is None else t.contiguous() for t in tensors]


@triton_op("rnnkernels::selective_scan_fwd_triton", mutates_args=())
def selective_scan_fwd_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None, z: Tensor | None,
                              delta_bias: Tensor | None, delta_softplus: bool,
                              initial_state: Tensor | None, chunk_size: int, save: bool
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of rnnkernels::selective_scan_fwd (same arguments and results) in Triton."""
    _validate.selective_scan_op("selective_scan_fwd_triton", u, delta, A, B, C, D, z, delta_bias,
                                initial_state)
    B, C = _grouped(B), _grouped(C)
    lay = _layout(u, A, B, C)
    flags = _flags(B, C, D, z, delta_bias, delta_softplus, initial_state)
    nchunks = triton.cdiv(lay["L"], chunk_size)
    u_, delta_, A_, B_, C_, D_, z_, bias_, x0_ = _contiguous(
        u, delta, A, B, C, D, z, delta_bias, initial_state, fill=A.new_empty((0,)))
    out = torch.empty_like(u_)
    last = u.new_empty((lay["batch"], lay["dim"], lay["N"]), dtype=torch.float32)
    ckpt = u.new_empty((lay["batch"], lay["dim"], nchunks * lay["N"]) if save else (0,),
                       dtype=torch.float32)
    launchable(_selective_scan_fwd_kernel)[lay["grid"]](
        u_, delta_, A_, B_, C_, D_, z_, bias_, x0_, out, last, ckpt,
        lay["dim"], lay["L"], lay["N"], lay["G"], lay["blocks"], nchunks, SAVE=save,
        CHUNK=chunk_size, BLOCK_D=lay["BLOCK_D"], BLOCK_N=lay["BLOCK_N"], **flags)
    return out, last, ckpt


@triton_op("rnnkernels::selective_scan_bwd_triton", mutates_args=())
def selective_scan_bwd_triton(grad_out: Tensor, grad_last_state: Tensor | None, u: Tensor,
                              delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None, z: Tensor | None,
                              delta_bias: Tensor | None, delta_softplus: bool,
                              initial_state: Tensor | None, checkpoints: Tensor,
                              chunk_size: int
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor, Tensor]:
    """The backward of rnnkernels::selective_scan_bwd (same arguments and results) in Triton."""
    op = "selective_scan_bwd_triton"
    _validate.selective_scan_op(op, u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    N = A.shape[1]
    _validate.op_tensor(op, "grad_out", grad_out, (batch, dim, L), u)
    _validate.op_optional(op, "grad_last_state", grad_last_state, (batch, dim, N), u)
    _validate.op_tensor(op, "checkpoints", checkpoints,
                        (batch, dim, triton.cdiv(L, chunk_size) * N), u)
    B_shape, C_shape = B.shape, C.shape
    B, C = _grouped(B), _grouped(C)
    lay = _layout(u, A, B, C)
    flags = _flags(B, C, D, z, delta_bias, delta_softplus, initial_state)
    batch, dim, L, N, G, blocks = (lay[key] for key in ("batch", "dim", "L", "N", "G", "blocks"))
    nchunks = triton.cdiv(L, chunk_size)
    gout, glast, u_, delta_, A_, B_, C_, D_, z_, bias_, ckpt = _contiguous(
        grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, checkpoints,
        fill=u.new_empty((0,)))

    def empty() -> Tensor:  # a gradient of an absent input; each its own tensor (no aliasing)
        return u.new_empty((0,))

    f32 = {"dtype": torch.float32, "device": u.device}
    programs = lay["grid"][0] * lay["grid"][1]
    scratch = torch.empty((programs, chunk_size + 1, lay["BLOCK_D"], lay["BLOCK_N"]), **f32)
    grad_u, grad_delta = torch.empty_like(u_), torch.empty_like(u_)
    grad_z = torch.empty_like(u_) if z is not None else empty()
    grad_x0 = torch.empty((batch, dim, N), **f32) if initial_state is not None else empty()
    grad_A = torch.empty((batch, dim, N), **f32)
    # Fixed B/C: sums per batch row; grouped: per-block partials over (batch, G, blocks, N, L).
    grad_B = torch.empty((batch, G, blocks, N, L) if B.dim() == 4 else (batch, dim, N), **f32)
    grad_C = torch.empty((batch, G, blocks, N, L) if C.dim() == 4 else (batch, dim, N), **f32)
    grad_D, grad_bias = torch.empty((batch, dim), **f32), torch.empty((batch, dim), **f32)
    launchable(_selective_scan_bwd_kernel)[lay["grid"]](
        gout, glast, u_, delta_, A_, B_, C_, D_, z_, bias_, ckpt, scratch,
        grad_u, grad_delta, grad_z, grad_x0, grad_A, grad_B, grad_C, grad_D, grad_bias,
        dim, L, N, G, blocks, nchunks, HAS_GLAST=grad_last_state is not None, CHUNK=chunk_size,
        BLOCK_D=lay["BLOCK_D"], BLOCK_N=lay["BLOCK_N"], **flags)
    grad_B = _variable_grad(grad_B, B_shape) if B.dim() == 4 else grad_B.sum(0)
    grad_C = _variable_grad(grad_C, C_shape) if C.dim() == 4 else grad_C.sum(0)
    grad_B, grad_C = grad_B.to(B.dtype), grad_C.to(C.dtype)
    return (grad_u, grad_delta, grad_A.sum(0).to(A.dtype), grad_B, grad_C,
            grad_D.sum(0).to(D.dtype) if D is not None else empty(), grad_z,
            grad_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None else empty(),
            grad_x0)
