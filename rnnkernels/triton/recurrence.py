"""Triton kernels of the generic gated recurrence (LSTM, GRU in both variants, tanh/ReLU RNN).

Two ops, ``rnnkernels::recurrence_fwd_triton`` and ``rnnkernels::recurrence_bwd_triton``, with the
schemas, outputs and saved layouts of ``recurrence_fwd`` / ``recurrence_bwd`` (csrc/ops.cpp,
csrc/cpu/recurrence.cpp): gx (T, B, G*H) incl. b_ih; hs (T+1, B, P) fp32 state slots (slot t is
the state before time t forward, slot t+1 in reverse); ws (T, B, K*H) fp32 cell workspace.

Decomposition. Program (b, k) of the grid (NB, NH) owns a block of BB batch rows and, within it,
the hidden units [k*BH, (k+1)*BH) with all of their gate rows, plus the output columns
[k*BP, (k+1)*BP) of the steps that produce P-wide results (the LSTM projection, dh_prev). Batch
blocks never talk to each other; the hidden blocks of one batch block exchange the state through
global memory every step. Three paths, chosen by size (``_plan``):

- ``persistent``: one launch for all T steps, NH = 1. The program loads its weight tiles once
  (Triton keeps these loop-invariant matmul operands in shared memory) and loops over time; a
  CTA barrier separates a step's writes of the state from the next step's reads.
- ``sync``: the same kernel with NH > 1 programs per batch block, each holding a slice of the
  weights, all resident (grid <= SM count), meeting at a grid barrier (an atomic counter) after
  each phase that produces data other programs read. GPU only: the interpreter runs programs one
  after another, so the barrier would deadlock there.
- ``step``: one launch per step and phase; weights are streamed from L2 in K chunks. Any size.

A step has up to three phases, separated by barriers (or launches): the gate matmul with the
cell's pointwise math; for the reset-before GRU the candidate's matmul on r * h; for the
projected LSTM the projection. The backward mirrors it: the cell's derivative on the units
(after the projection's transpose), for the reset-before GRU the gradient through r * h, and
dh_prev = dgates @ W_hh on output columns. Weight gradients are GEMMs over all steps afterwards.

Memory traffic per step (persistent / sync): gx and the outputs once, the state (B, P) read by
every hidden block, the weights not at all; the step path adds the weights from L2 every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .. import _kernels, _validate
from ..ops.recurrence import (
    GRU,
    GRU_RESET_BEFORE,
    LSTM,
    NUM_GATES,
    RNN_RELU,
    register_recurrence,
    workspace_units,
)
from . import launchable

_LSTM = tl.constexpr(LSTM)
_GRU = tl.constexpr(GRU)
_GRU_RB = tl.constexpr(GRU_RESET_BEFORE)
_RNN_RELU = tl.constexpr(RNN_RELU)

# Phases of a step (bit flags of the kernels' PHASES).
_F_GATES, _F_CANDIDATE, _F_PROJ = 1, 2, 4  # forward
_B_CELL, _B_RESET, _B_DH = 1, 2, 4  # backward

_MIN_BLOCK = 16  # tl.dot's smallest M, N and K on a GPU
_MAX_BATCH_BLOCK = 64  # batch rows per program: more rows share one copy of the weights
# Shared memory one program of the persistent / sync paths may use: its weight tiles (Triton
# keeps a loop-invariant dot operand in shared memory) plus the fp32 staging of the state tile.
# An H100 / H200 block can opt into 227 KB; the rest is margin. _smem_bytes matches what Triton
# 3.9 allocates for sm_90 (checked by compiling without a GPU); speed is not tuned on a GPU yet.
_SMEM_BYTES = 200 * 1024
_STEP_BLOCK = 32  # hidden units per program, and K chunk, of the per-step path
PATHS = ("persistent", "sync", "step")


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _block(n: int) -> int:
    """The tile extent that covers n: a power of two, at least tl.dot's minimum."""
    return max(_MIN_BLOCK, _pow2(n))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the grid splits the work: NB x NH programs of BB rows, BH units and BP outputs."""

    path: str
    BB: int
    BH: int
    BP: int
    NB: int
    NH: int


_forced: tuple[str, int | None, int | None] | None = None


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (value < _MIN_BLOCK or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {value}")


@contextlib.contextmanager
def force_plan(path: str, hidden_block: int | None = None,
               batch_block: int | None = None) -> Iterator[None]:
    """Force a path (``persistent``, ``sync`` or ``step``) and optionally the hidden units and
    batch rows per program (powers of two >= 16), for tests and benchmarks. The plan is chosen
    when an op runs, so the backward of a forward run inside this block must run inside it too
    to take the same path. ``persistent`` always keeps all hidden units in one program."""
    global _forced
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    _check_block("hidden_block", hidden_block)
    _check_block("batch_block", batch_block)
    if path == "sync" and _kernels.triton_interpreted():
        raise ValueError("the sync path needs a GPU: under TRITON_INTERPRET=1 its grid barrier "
                         "deadlocks")
    previous = _forced
    _forced = (path, hidden_block, batch_block)
    try:
        yield
    finally:
        _forced = previous


def _smem_bytes(H: int, P: int, cell: int, proj: bool, BB: int, BH: int, BP: int, elem: int,
                backward: bool) -> int:
    """Shared memory of one resident program: the weight tiles of all phases (forward: the gate
    rows of BH units x P inputs, the reset-before GRU's candidate rows, the projection's BP
    rows; backward: all recurrent rows x BP columns, W_hn's and W_hr's BH columns) and the
    largest fp32 (BB, K) operand tile staged for a matmul."""
    split = cell == GRU_RESET_BEFORE
    G1 = 2 if split else NUM_GATES[cell]
    HP, PP, GHP = _block(H), _block(P), _block(G1 * H)
    if backward:
        weights = GHP * BP + (HP * BH if split else 0) + (PP * BH if proj else 0)
        k = max(GHP, PP if proj else 0)
    else:
        weights = G1 * BH * PP + (BH * HP if split else 0) + (BP * HP if proj else 0)
        k = max(PP, HP if (split or proj) else 0)
    return elem * weights + 4 * BB * k


def _plan(B: int, H: int, P: int, cell: int, proj: bool, dtype: torch.dtype,
          device: torch.device, backward: bool) -> Plan:
    """The path and blocks of the forward or backward kernel (each chooses its own: both read
    and write the same layouts, whatever the path)."""
    elem = torch.empty((), dtype=dtype).element_size()
    BB = min(_MAX_BATCH_BLOCK, _block(B))
    if _forced is not None and _forced[2] is not None:
        BB = _forced[2]
    NB = triton.cdiv(B, BB)

    def blocks(BH: int) -> tuple[int, int, int]:
        NH = triton.cdiv(H, BH)
        return BH, _block(triton.cdiv(P, NH)), NH

    def make(path: str, BH: int) -> Plan:
        BH, BP, NH = blocks(BH)
        return Plan(path, BB, BH, BP, NB, NH)

    whole = _block(H)
    if _forced is not None:
        path, hidden_block, _ = _forced
        if path == "persistent":
            return make(path, whole)
        plan = make(path, hidden_block or (_STEP_BLOCK if path == "step" else _MIN_BLOCK))
        if path == "sync" and device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            if plan.NB * plan.NH > sms:
                raise ValueError(f"the sync path needs all {plan.NB * plan.NH} programs resident "
                                 f"at once, more than the {sms} SMs: its barrier would deadlock; "
                                 "give a larger hidden_block or batch_block")
        return plan
    def fits(BH: int) -> bool:
        _, BP, _ = blocks(BH)
        return _smem_bytes(H, P, cell, proj, BB, BH, BP, elem, backward) <= _SMEM_BYTES

    if fits(whole):
        return make("persistent", whole)
    if device.type == "cuda" and not _kernels.triton_interpreted():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        BH = whole // 2
        while BH >= _MIN_BLOCK:
            if NB * blocks(BH)[2] > sms:
                break
            if fits(BH):
                return make("sync", BH)
            BH //= 2
    return make("step", _STEP_BLOCK)


def _num_warps(plan: Plan) -> int:
    # Resident paths hold the whole (BB, K) state tile and several (BB, BH) fp32 tiles per step:
    # 8 warps spread them over twice the registers of 4.
    return 8 if plan.path != "step" or plan.BH * plan.BB > 32 * 32 else 4


_DOT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernels' DOT codes


def _dot_types(dtype: torch.dtype) -> tuple[int, bool]:
    """The operand type of the step's matmuls (a DOT code) and whether it runs as an fp32
    product.

    fp32 keeps fp32 products (no tf32), matching the CPU op. fp16 / bf16 multiply in their own
    type with fp32 accumulation; under the interpreter the operands are rounded to that type and
    multiplied in fp32, because triton 3.9's interpreter multiplies bf16 operands as raw uint16.
    The type travels as an int: a plain constant is what torch.compile's kernel wrapper keeps."""
    return _DOT_TYPES[dtype], dtype == torch.float32 or _kernels.triton_interpreted()


# ============================================================== device helpers

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument: no overflow, full relative precision near 0.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _round(x, DOT: tl.constexpr):
    """x in the matmul operand type of DOT code 0 (fp32), 1 (fp16) or 2 (bf16)."""
    if DOT == 1:
        return x.to(tl.float16)
    elif DOT == 2:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, F32DOT: tl.constexpr):
    if F32DOT:
        return tl.dot(_round(a, DOT).to(tl.float32), _round(b, DOT).to(tl.float32),
                      input_precision="ieee")
    else:
        return tl.dot(_round(a, DOT), _round(b, DOT))


@triton.jit
def _load_rows(ptr, stride, rows, rmask, cols, K, ptr2, mask2, HAS2: tl.constexpr,
               CACHE: tl.constexpr):
    """A (rows, cols) tile of a row-major fp32 matrix with row stride ``stride``, zero outside
    [rows < B, cols < K]; plus the same tile of ``ptr2`` on the rows in ``mask2``."""
    offs = rows[:, None] * stride + cols[None, :]
    m = rmask[:, None] & (cols[None, :] < K)
    a = tl.load(ptr + offs, mask=m, other=0.0, cache_modifier=CACHE)
    if HAS2:
        a += tl.load(ptr2 + offs, mask=m & mask2[:, None], other=0.0).to(tl.float32)
    return a


@triton.jit
def _load_tile(ptr, kk, K, cols, cmask, stride_k, stride_n):
    """A (K, N) tile of a weight matrix addressed by strides, zero outside [kk < K, cmask]."""
    return tl.load(ptr + kk[:, None] * stride_k + cols[None, :] * stride_n,
                   mask=(kk[:, None] < K) & cmask[None, :], other=0.0)


@triton.jit
def _mm(a, a_ptr, a_stride, a2_ptr, a2_mask, rows, rmask, K, w, w_ptr, w_sk, w_sn, cols, cmask,
        RESIDENT: tl.constexpr, HAS_A2: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
        BK: tl.constexpr, DOT: tl.constexpr, F32DOT: tl.constexpr, CACHE: tl.constexpr):
    """(BB, BN) fp32 = A (BB, K) @ W (K, BN). RESIDENT: both whole tiles are given (a, w);
    otherwise A and W are streamed from memory in chunks of BK along K."""
    if RESIDENT:
        acc = _dot(a, w, DOT, F32DOT)
    else:
        acc = tl.zeros((BB, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            ak = _load_rows(a_ptr, a_stride, rows, rmask, kk, K, a2_ptr, a2_mask, HAS_A2, CACHE)
            acc += _dot(ak, _load_tile(w_ptr, kk, K, cols, cmask, w_sk, w_sn), DOT, F32DOT)
    return acc


@triton.jit
def _sync(bar_ptr, count, NH, SYNC: tl.constexpr):
    """Barrier number ``count`` (1, 2, ...) of one batch block's NH programs (SYNC), or of the
    threads of one program. The counter only grows, so it needs no reset between barriers."""
    tl.debug_barrier()
    if SYNC:
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while seen < count * NH:
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


# ============================================================== forward

@triton.jit(do_not_specialize=["s_begin", "s_end"])
def _fwd_kernel(
    gx_ptr, hs_ptr, cs_ptr, w_ptr, b_ptr, wr_ptr, len_ptr, y_ptr, ws_ptr, bar_ptr,
    T, B, H, P, ws_stride_t, s_begin, s_end,
    CELL: tl.constexpr, REVERSE: tl.constexpr, SAVE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LEN: tl.constexpr, PROJ: tl.constexpr, PHASES: tl.constexpr, RESIDENT: tl.constexpr,
    SYNC: tl.constexpr, KU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
    BP: tl.constexpr, BK: tl.constexpr, HP: tl.constexpr, PP: tl.constexpr,
    DOT: tl.constexpr, F32DOT: tl.constexpr,
):
    """Steps s_begin .. s_end-1 of the forward, the phases in PHASES (module docstring)."""
    SPLIT: tl.constexpr = CELL == _GRU_RB
    G: tl.constexpr = 4 if CELL == _LSTM else (3 if (CELL == _GRU or SPLIT) else 1)
    G1: tl.constexpr = 2 if SPLIT else G
    CACHE: tl.constexpr = ".cg" if SYNC else ""
    # barriers per step: after the gates (before a phase that reads them) and after the step
    NSYNC: tl.constexpr = 1 + (1 if SPLIT else 0) + (1 if PROJ else 0)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    NH = tl.num_programs(1)
    GH = G * H
    KH = KU * H
    bar = bar_ptr + pid_b
    rows = pid_b * BB + tl.arange(0, BB)
    rmask = rows < B
    units = pid_h * BH + tl.arange(0, BH)
    umask = units < H
    pcols = pid_h * BP + tl.arange(0, BP)
    pmask = pcols < P
    m_u = rmask[:, None] & umask[None, :]
    m_p = rmask[:, None] & pmask[None, :]
    ru = rows[:, None] * GH + units[None, :]  # offsets in a gx row block
    rw = rows[:, None] * KH + units[None, :]  # offsets in a ws row block
    if HAS_LEN:
        lens = tl.load(len_ptr + rows, mask=rmask, other=0)

    kP = tl.arange(0, PP)
    kH = tl.arange(0, HP)
    w0 = 0.0
    w1 = 0.0
    w2 = 0.0
    w3 = 0.0
    wn = 0.0
    wr = 0.0
    if RESIDENT:
        if PHASES & 1:
            w0 = _load_tile(w_ptr, kP, P, units, umask, 1, P)
            if G1 > 1:
                w1 = _load_tile(w_ptr + H * P, kP, P, units, umask, 1, P)
            if G1 > 2:
                w2 = _load_tile(w_ptr + 2 * H * P, kP, P, units, umask, 1, P)
            if G1 > 3:
                w3 = _load_tile(w_ptr + 3 * H * P, kP, P, units, umask, 1, P)
        if SPLIT and (PHASES & 2):
            wn = _load_tile(w_ptr + 2 * H * P, kH, H, units, umask, 1, P)
        if PROJ and (PHASES & 4):
            wr = _load_tile(wr_ptr, kH, H, pcols, pmask, 1, H)
    if HAS_BIAS:
        b0 = tl.load(b_ptr + units, mask=umask, other=0.0).to(tl.float32)[None, :]
        if G > 1:
            b1 = tl.load(b_ptr + H + units, mask=umask, other=0.0).to(tl.float32)[None, :]
            b2 = tl.load(b_ptr + 2 * H + units, mask=umask, other=0.0).to(tl.float32)[None, :]
        if G > 3:
            b3 = tl.load(b_ptr + 3 * H + units, mask=umask, other=0.0).to(tl.float32)[None, :]
    if CELL == _LSTM and (PHASES & 1):
        c = tl.load(cs_ptr + (s_begin % 2) * B * H + rows[:, None] * H + units[None, :],
                    mask=m_u, other=0.0)

    for s in range(s_begin, s_end):
        nbar = (s - s_begin) * NSYNC
        t = (T - 1 - s) if REVERSE else s
        if SAVE:
            slot_in = (T - s) if REVERSE else s
            slot_out = (T - 1 - s) if REVERSE else s + 1
        else:
            slot_in = s % 2
            slot_out = (s + 1) % 2
        h_in = hs_ptr + slot_in.to(tl.int64) * B * P
        h_out = hs_ptr + slot_out.to(tl.int64) * B * P
        gx_t = gx_ptr + t.to(tl.int64) * B * GH
        y_t = y_ptr + t.to(tl.int64) * B * P
        ws_t = ws_ptr + t.to(tl.int64) * ws_stride_t
        if HAS_LEN:
            valid = rmask & (t < lens)
        else:
            valid = rmask
        v2 = valid[:, None]

        if PHASES & 1:
            # ---- gates: gh = h_{t-1} @ W_hh^T for this program's units, then the cell
            a = 0.0
            if RESIDENT:
                a = _load_rows(h_in, P, rows, rmask, kP, P, h_in, valid, False, CACHE)
            acc0 = _mm(a, h_in, P, h_in, valid, rows, rmask, P, w0, w_ptr, 1, P, units, umask,
                       RESIDENT, False, BB, BH, BK, DOT, F32DOT, CACHE)
            acc0 += tl.load(gx_t + ru, mask=m_u, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc0 += b0
            if G1 > 1:
                acc1 = _mm(a, h_in, P, h_in, valid, rows, rmask, P, w1, w_ptr + H * P, 1, P,
                           units, umask, RESIDENT, False, BB, BH, BK, DOT, F32DOT, CACHE)
                acc1 += tl.load(gx_t + H + ru, mask=m_u, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    acc1 += b1
            if G1 > 2:
                acc2 = _mm(a, h_in, P, h_in, valid, rows, rmask, P, w2, w_ptr + 2 * H * P, 1, P,
                           units, umask, RESIDENT, False, BB, BH, BK, DOT, F32DOT, CACHE)
                if HAS_BIAS:
                    acc2 += b2
            if G1 > 3:
                acc3 = _mm(a, h_in, P, h_in, valid, rows, rmask, P, w3, w_ptr + 3 * H * P, 1, P,
                           units, umask, RESIDENT, False, BB, BH, BK, DOT, F32DOT, CACHE)
                acc3 += tl.load(gx_t + 3 * H + ru, mask=m_u, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    acc3 += b3
            if CELL == _LSTM:
                i = _sigmoid(acc0)
                f = _sigmoid(acc1)
                g = _tanh(acc2 + tl.load(gx_t + 2 * H + ru, mask=m_u, other=0.0).to(tl.float32))
                o = _sigmoid(acc3)
                c_new = f * c + i * g
                h = o * _tanh(c_new)
                c = tl.where(v2, c_new, c)
                if SAVE:
                    tl.store(ws_t + rw, tl.where(v2, i, 0.0), mask=m_u)
                    tl.store(ws_t + H + rw, tl.where(v2, f, 0.0), mask=m_u)
                    tl.store(ws_t + 2 * H + rw, tl.where(v2, g, 0.0), mask=m_u)
                    tl.store(ws_t + 3 * H + rw, tl.where(v2, o, 0.0), mask=m_u)
                    tl.store(ws_t + 4 * H + rw, c, mask=m_u)  # masked rows: c_{t-1}
                if PROJ:
                    tl.store(ws_t + 5 * H + rw, tl.where(v2, h, 0.0), mask=m_u)
            elif CELL == _GRU:
                h_prev = tl.load(h_in + rows[:, None] * P + units[None, :], mask=m_u, other=0.0)
                r = _sigmoid(acc0)
                z = _sigmoid(acc1)
                n = _tanh(tl.load(gx_t + 2 * H + ru, mask=m_u, other=0.0).to(tl.float32)
                          + r * acc2)
                h = n + z * (h_prev - n)
                if SAVE:
                    tl.store(ws_t + rw, tl.where(v2, r, 0.0), mask=m_u)
                    tl.store(ws_t + H + rw, tl.where(v2, z, 0.0), mask=m_u)
                    tl.store(ws_t + 2 * H + rw, tl.where(v2, n, 0.0), mask=m_u)
                    tl.store(ws_t + 3 * H + rw, tl.where(v2, acc2, 0.0), mask=m_u)
            elif SPLIT:
                h_prev = tl.load(h_in + rows[:, None] * P + units[None, :], mask=m_u, other=0.0)
                r = _sigmoid(acc0)
                z = _sigmoid(acc1)
                # z and v = r * h_{t-1} feed the candidate phase: stored even without SAVE
                # (into a one-step scratch then).
                if SAVE:
                    tl.store(ws_t + rw, tl.where(v2, r, 0.0), mask=m_u)
                tl.store(ws_t + H + rw, tl.where(v2, z, 0.0), mask=m_u)
                tl.store(ws_t + 3 * H + rw, tl.where(v2, r * h_prev, 0.0), mask=m_u)
            else:
                if CELL == _RNN_RELU:
                    h = tl.maximum(acc0, 0.0)
                else:
                    h = _tanh(acc0)
                if SAVE:
                    tl.store(ws_t + rw, tl.where(v2, h, 0.0), mask=m_u)
            if not SPLIT and not PROJ:
                if CELL == _LSTM or CELL > _GRU_RB:
                    h_prev = tl.load(h_in + rows[:, None] * P + units[None, :], mask=m_u,
                                     other=0.0)
                tl.store(h_out + rows[:, None] * P + units[None, :], tl.where(v2, h, h_prev),
                         mask=m_u)
                tl.store(y_t + rows[:, None] * P + units[None, :],
                         tl.where(v2, h, 0.0).to(y_ptr.dtype.element_ty), mask=m_u)

        if SPLIT and (PHASES & 2):
            # ---- candidate of the reset-before GRU: n = tanh(gx_n + (r * h) @ W_hn^T + b_hn)
            nbar += 1
            _sync(bar, nbar, NH, SYNC)
            a = 0.0
            if RESIDENT:
                a = _load_rows(ws_t + 3 * H, KH, rows, rmask, kH, H, ws_t, valid, False, CACHE)
            acc = _mm(a, ws_t + 3 * H, KH, ws_t, valid, rows, rmask, H, wn, w_ptr + 2 * H * P, 1,
                      P, units, umask, RESIDENT, False, BB, BH, BK, DOT, F32DOT, CACHE)
            acc += tl.load(gx_t + 2 * H + ru, mask=m_u, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(b_ptr + 2 * H + units, mask=umask, other=0.0).to(tl.float32)[None, :]
            n = _tanh(acc)
            z = tl.load(ws_t + H + rw, mask=m_u, other=0.0)
            h_prev = tl.load(h_in + rows[:, None] * P + units[None, :], mask=m_u, other=0.0)
            h = n + z * (h_prev - n)
            if SAVE:
                tl.store(ws_t + 2 * H + rw, tl.where(v2, n, 0.0), mask=m_u)
            tl.store(h_out + rows[:, None] * P + units[None, :], tl.where(v2, h, h_prev), mask=m_u)
            tl.store(y_t + rows[:, None] * P + units[None, :],
                     tl.where(v2, h, 0.0).to(y_ptr.dtype.element_ty), mask=m_u)

        if PROJ and (PHASES & 4):
            # ---- projection of the LSTM: h_t = h_full @ W_hr^T on this program's columns
            nbar += 1
            _sync(bar, nbar, NH, SYNC)
            a = 0.0
            if RESIDENT:
                a = _load_rows(ws_t + 5 * H, KH, rows, rmask, kH, H, ws_t, valid, False, CACHE)
            acc = _mm(a, ws_t + 5 * H, KH, ws_t, valid, rows, rmask, H, wr, wr_ptr, 1, H, pcols,
                      pmask, RESIDENT, False, BB, BP, BK, DOT, F32DOT, CACHE)
            offs = rows[:, None] * P + pcols[None, :]
            h_prev = tl.load(h_in + offs, mask=m_p, other=0.0)
            tl.store(h_out + offs, tl.where(v2, acc, h_prev), mask=m_p)
            tl.store(y_t + offs, tl.where(v2, acc, 0.0).to(y_ptr.dtype.element_ty), mask=m_p)
        nbar += 1
        _sync(bar, nbar, NH, SYNC)

    if CELL == _LSTM and (PHASES & 1):
        tl.store(cs_ptr + (s_end % 2) * B * H + rows[:, None] * H + units[None, :], c, mask=m_u)


# ============================================================== backward

@triton.jit(do_not_specialize=["s_begin", "s_end"])
def _bwd_kernel(
    gy_ptr, hs_ptr, ws_ptr, c0_ptr, w_ptr, wr_ptr, len_ptr, dh_ptr, dc_ptr, dgh_ptr, dgx_ptr,
    dhd_ptr, dhp_ptr, bar_ptr,
    T, B, H, P, s_begin, s_end,
    CELL: tl.constexpr, REVERSE: tl.constexpr, HAS_GY: tl.constexpr, HAS_LEN: tl.constexpr,
    PROJ: tl.constexpr, DGX: tl.constexpr, PHASES: tl.constexpr, RESIDENT: tl.constexpr,
    SYNC: tl.constexpr, KU: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
    BP: tl.constexpr, BK: tl.constexpr, HP: tl.constexpr, PP: tl.constexpr,
    GHP: tl.constexpr, DOT: tl.constexpr, F32DOT: tl.constexpr,
):
    """Steps s_end-1 down to s_begin of the backward, the phases in PHASES.

    dh (2, B, P) and dc (2, B, H) hold the gradients w.r.t. the state after step s in slot
    (s+1) % 2; dgh (T, B, G*H) fp32 receives the gradients of the recurrent pre-activations,
    dgx those of gx when they differ (GRU) or have another dtype (DGX); dhd (B, H) is the direct
    part of dh_prev (GRU); dhp (T, B, P) the gradient of each projected output (LSTM with
    projection)."""
    SPLIT: tl.constexpr = CELL == _GRU_RB
    G: tl.constexpr = 4 if CELL == _LSTM else (3 if (CELL == _GRU or SPLIT) else 1)
    G1: tl.constexpr = 2 if SPLIT else G
    CACHE: tl.constexpr = ".cg" if SYNC else ""
    NSYNC: tl.constexpr = 2 + (1 if SPLIT else 0)  # barriers per step
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    NH = tl.num_programs(1)
    GH = G * H
    KH = KU * H
    bar = bar_ptr + pid_b
    rows = pid_b * BB + tl.arange(0, BB)
    rmask = rows < B
    units = pid_h * BH + tl.arange(0, BH)
    umask = units < H
    pcols = pid_h * BP + tl.arange(0, BP)
    pmask = pcols < P
    m_u = rmask[:, None] & umask[None, :]
    m_p = rmask[:, None] & pmask[None, :]
    ru = rows[:, None] * GH + units[None, :]
    rw = rows[:, None] * KH + units[None, :]
    rh = rows[:, None] * H + units[None, :]
    if HAS_LEN:
        lens = tl.load(len_ptr + rows, mask=rmask, other=0)

    kP = tl.arange(0, PP)
    kH = tl.arange(0, HP)
    kG = tl.arange(0, GHP)
    wr = 0.0
    wn = 0.0
    wd = 0.0
    if RESIDENT:
        if PROJ and (PHASES & 1):
            wr = _load_tile(wr_ptr, kP, P, units, umask, H, 1)
        if SPLIT and (PHASES & 2):
            wn = _load_tile(w_ptr + 2 * H * P, kH, H, units, umask, P, 1)
        if PHASES & 4:
            wd = _load_tile(w_ptr, kG, G1 * H, pcols, pmask, P, 1)
    if CELL == _LSTM and (PHASES & 1):
        dc = tl.load(dc_ptr + (s_end % 2) * B * H + rh, mask=m_u, other=0.0)

    for j in range(s_end - s_begin):
        s = s_end - 1 - j
        nbar = j * NSYNC
        t = (T - 1 - s) if REVERSE else s
        h_prev_ptr = hs_ptr + ((T - s) if REVERSE else s).to(tl.int64) * B * P
        dh_in = dh_ptr + ((s + 1) % 2) * B * P
        dh_out = dh_ptr + (s % 2) * B * P
        ws_t = ws_ptr + t.to(tl.int64) * B * KH
        dgh_t = dgh_ptr + t.to(tl.int64) * B * GH
        dgx_t = dgx_ptr + t.to(tl.int64) * B * GH
        gy_t = gy_ptr + t.to(tl.int64) * B * P
        if HAS_LEN:
            valid = rmask & (t < lens)
        else:
            valid = rmask
        v2 = valid[:, None]

        if PHASES & 1:
            # ---- the cell's derivative on this program's units
            if PROJ:
                # dh_full = (dh + grad_y_t) @ W_hr; this program records its columns of the sum
                # for the gradient of W_hr.
                a = 0.0
                if RESIDENT:
                    a = _load_rows(dh_in, P, rows, rmask, kP, P, gy_t, valid, HAS_GY, CACHE)
                dH = _mm(a, dh_in, P, gy_t, valid, rows, rmask, P, wr, wr_ptr, H, 1, units,
                         umask, RESIDENT, HAS_GY, BB, BH, BK, DOT, F32DOT, CACHE)
                offs = rows[:, None] * P + pcols[None, :]
                rec = tl.load(dh_in + offs, mask=m_p, other=0.0, cache_modifier=CACHE)
                if HAS_GY:
                    rec += tl.load(gy_t + offs, mask=m_p, other=0.0).to(tl.float32)
                tl.store(dhp_ptr + t.to(tl.int64) * B * P + offs, tl.where(v2, rec, 0.0),
                         mask=m_p)
            else:
                dH = tl.load(dh_in + rows[:, None] * P + units[None, :], mask=m_u, other=0.0,
                             cache_modifier=CACHE)
                if HAS_GY:
                    dH += tl.load(gy_t + rows[:, None] * P + units[None, :], mask=m_u,
                                  other=0.0).to(tl.float32)
            if CELL == _LSTM:
                i = tl.load(ws_t + rw, mask=m_u, other=0.0)
                f = tl.load(ws_t + H + rw, mask=m_u, other=0.0)
                g = tl.load(ws_t + 2 * H + rw, mask=m_u, other=0.0)
                o = tl.load(ws_t + 3 * H + rw, mask=m_u, other=0.0)
                c = tl.load(ws_t + 4 * H + rw, mask=m_u, other=0.0)
                # c_{t-1}: c0 at the first step, else saved by the previous step (clamped in
                # range at the first step, where it is not used)
                t_prev = tl.minimum(tl.maximum((t + 1) if REVERSE else (t - 1), 0), T - 1)
                c_prev = tl.where(s == 0, tl.load(c0_ptr + rh, mask=m_u, other=0.0),
                                  tl.load(ws_ptr + t_prev.to(tl.int64) * B * KH + 4 * H + rw,
                                          mask=m_u, other=0.0))
                tc = _tanh(c)
                dct = dc + dH * o * (1.0 - tc * tc)
                d0 = dct * g * i * (1.0 - i)
                d1 = dct * c_prev * f * (1.0 - f)
                d2 = dct * i * (1.0 - g * g)
                d3 = dH * tc * o * (1.0 - o)
                dc = tl.where(v2, dct * f, dc)
                tl.store(dgh_t + 3 * H + ru, tl.where(v2, d3, 0.0), mask=m_u)
                if DGX:
                    tl.store(dgx_t + 3 * H + ru, tl.where(v2, d3, 0.0).to(dgx_ptr.dtype.element_ty),
                             mask=m_u)
            elif CELL == _GRU:
                r = tl.load(ws_t + rw, mask=m_u, other=0.0)
                z = tl.load(ws_t + H + rw, mask=m_u, other=0.0)
                n = tl.load(ws_t + 2 * H + rw, mask=m_u, other=0.0)
                hn = tl.load(ws_t + 3 * H + rw, mask=m_u, other=0.0)
                h_prev = tl.load(h_prev_ptr + rows[:, None] * P + units[None, :], mask=m_u,
                                 other=0.0)
                dn = dH * (1.0 - z) * (1.0 - n * n)
                d0 = dn * hn * r * (1.0 - r)
                d1 = dH * (h_prev - n) * z * (1.0 - z)
                d2 = dn * r
                tl.store(dgx_t + 2 * H + ru, tl.where(v2, dn, 0.0).to(dgx_ptr.dtype.element_ty),
                         mask=m_u)
                tl.store(dhd_ptr + rh, tl.where(v2, dH * z, 0.0), mask=m_u)
            elif SPLIT:
                z = tl.load(ws_t + H + rw, mask=m_u, other=0.0)
                n = tl.load(ws_t + 2 * H + rw, mask=m_u, other=0.0)
                h_prev = tl.load(h_prev_ptr + rows[:, None] * P + units[None, :], mask=m_u,
                                 other=0.0)
                d1 = dH * (h_prev - n) * z * (1.0 - z)
                d2 = dH * (1.0 - z) * (1.0 - n * n)
                tl.store(dhd_ptr + rh, tl.where(v2, dH * z, 0.0), mask=m_u)
            else:
                h = tl.load(ws_t + rw, mask=m_u, other=0.0)
                if CELL == _RNN_RELU:
                    d0 = tl.where(h > 0.0, dH, 0.0)
                else:
                    d0 = dH * (1.0 - h * h)
            if not SPLIT:
                tl.store(dgh_t + ru, tl.where(v2, d0, 0.0), mask=m_u)
                if DGX:
                    tl.store(dgx_t + ru, tl.where(v2, d0, 0.0).to(dgx_ptr.dtype.element_ty),
                             mask=m_u)
            if G > 1:
                tl.store(dgh_t + H + ru, tl.where(v2, d1, 0.0), mask=m_u)
                tl.store(dgh_t + 2 * H + ru, tl.where(v2, d2, 0.0), mask=m_u)
                if DGX:
                    tl.store(dgx_t + H + ru, tl.where(v2, d1, 0.0).to(dgx_ptr.dtype.element_ty),
                             mask=m_u)
                    if CELL != _GRU:
                        tl.store(dgx_t + 2 * H + ru,
                                 tl.where(v2, d2, 0.0).to(dgx_ptr.dtype.element_ty), mask=m_u)

        if SPLIT and (PHASES & 2):
            # ---- through v = r * h_{t-1}: dv = dn @ W_hn, then dr and the direct dh_prev
            nbar += 1
            _sync(bar, nbar, NH, SYNC)
            a = 0.0
            if RESIDENT:
                a = _load_rows(dgh_t + 2 * H, GH, rows, rmask, kH, H, dgh_t, valid, False, CACHE)
            dv = _mm(a, dgh_t + 2 * H, GH, dgh_t, valid, rows, rmask, H, wn, w_ptr + 2 * H * P, P,
                     1, units, umask, RESIDENT, False, BB, BH, BK, DOT, F32DOT, CACHE)
            r = tl.load(ws_t + rw, mask=m_u, other=0.0)
            h_prev = tl.load(h_prev_ptr + rows[:, None] * P + units[None, :], mask=m_u, other=0.0)
            dr = dv * h_prev * r * (1.0 - r)
            tl.store(dgh_t + ru, tl.where(v2, dr, 0.0), mask=m_u)
            if DGX:
                tl.store(dgx_t + ru, tl.where(v2, dr, 0.0).to(dgx_ptr.dtype.element_ty), mask=m_u)
            direct = tl.load(dhd_ptr + rh, mask=m_u, other=0.0)
            tl.store(dhd_ptr + rh, tl.where(v2, direct + dv * r, 0.0), mask=m_u)

        if PHASES & 4:
            # ---- dh_prev = dgates @ W_hh (recurrent rows) on this program's columns
            nbar += 1
            _sync(bar, nbar, NH, SYNC)
            a = 0.0
            if RESIDENT:
                a = _load_rows(dgh_t, GH, rows, rmask, kG, G1 * H, dgh_t, valid, False, CACHE)
            acc = _mm(a, dgh_t, GH, dgh_t, valid, rows, rmask, G1 * H, wd, w_ptr, P, 1, pcols,
                      pmask, RESIDENT, False, BB, BP, BK, DOT, F32DOT, CACHE)
            offs = rows[:, None] * P + pcols[None, :]
            if CELL == _GRU or SPLIT:
                acc += tl.load(dhd_ptr + rows[:, None] * H + pcols[None, :], mask=m_p, other=0.0,
                               cache_modifier=CACHE)
            dh = tl.load(dh_in + offs, mask=m_p, other=0.0, cache_modifier=CACHE)
            tl.store(dh_out + offs, tl.where(v2, acc, dh), mask=m_p)
        nbar += 1
        _sync(bar, nbar, NH, SYNC)

    if CELL == _LSTM and (PHASES & 1):
        tl.store(dc_ptr + (s_begin % 2) * B * H + rh, dc, mask=m_u)


# ============================================================== launchers

def _launches(plan: Plan, T: int, phases: tuple[int, ...], backward: bool
              ) -> list[tuple[int, int, int]]:
    """(s_begin, s_end, PHASES) of each launch, in the order they run: steps forward in time
    (backward in time for the backward), each step's phases in order."""
    if plan.path == "step":
        steps = reversed(range(T)) if backward else range(T)
        return [(s, s + 1, p) for s in steps for p in phases]
    mask = 0
    for p in phases:
        mask |= p
    return [(0, T, mask)]


def _meta(plan: Plan, H: int, P: int, cell: int, proj: bool, dtype: torch.dtype,
          backward: bool, **flags: bool) -> dict[str, int | bool]:
    """The constexpr arguments of the forward or backward kernel but PHASES; ``flags`` are the
    input-dependent ones (REVERSE, HAS_LEN, and SAVE, HAS_BIAS or HAS_GY, DGX)."""
    dot, f32dot = _dot_types(dtype)
    meta = {"CELL": cell, "PROJ": proj, "RESIDENT": plan.path != "step",
            "SYNC": plan.path == "sync", "KU": workspace_units(cell, proj), "BB": plan.BB,
            "BH": plan.BH, "BP": plan.BP, "BK": _STEP_BLOCK, "HP": _block(H), "PP": _block(P),
            "DOT": dot, "F32DOT": f32dot, **flags}
    if backward:
        meta["GHP"] = _block((2 if cell == GRU_RESET_BEFORE else NUM_GATES[cell]) * H)
    return meta


@triton_op("rnnkernels::recurrence_fwd_triton", mutates_args=())
def recurrence_fwd_triton(gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor,
                          b_hh: Tensor | None, w_hr: Tensor | None, lengths: Tensor | None,
                          cell: int, reverse: bool, save: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``recurrence_fwd`` in Triton: same arguments, outputs and saved layouts.

    gx: (T, B, G*H); h0: (B, P); c0: (B, H) (LSTM); w_hh: (G*H, P); b_hh: (G*H,); w_hr: (P, H);
    lengths: (B,) int64. Returns y (T, B, P), h_n (B, P), c_n (B, H) or (0,), hs (T+1, B, P)
    and ws (T, B, K*H) in fp32 (both (0,) without save)."""
    _validate.choice("recurrence_fwd_triton: cell", cell, list(NUM_GATES))
    _validate.recurrence_fwd_op("recurrence_fwd_triton", gx, h0, c0, w_hh, b_hh, w_hr, lengths,
                                gates=NUM_GATES[cell], lstm=cell == LSTM)
    T, B, GH = gx.shape
    G = NUM_GATES[cell]
    H = GH // G
    P = h0.shape[1]
    proj = w_hr is not None
    split = cell == GRU_RESET_BEFORE
    K = workspace_units(cell, proj)
    f32 = {"device": gx.device, "dtype": torch.float32}
    plan = _plan(B, H, P, cell, proj, gx.dtype, gx.device, backward=False)
    meta = _meta(plan, H, P, cell, proj, gx.dtype, False, REVERSE=reverse, SAVE=save,
                 HAS_BIAS=b_hh is not None, HAS_LEN=lengths is not None)

    gx = gx.contiguous()
    w = w_hh.contiguous()
    y = torch.empty((T, B, P), device=gx.device, dtype=gx.dtype)
    hs = torch.empty((T + 1 if save else 2, B, P), **f32)
    hs[(T if reverse else 0) if save else 0] = h0
    cs = torch.empty((2, B, H), **f32) if cell == LSTM else hs
    if cell == LSTM:
        cs[0] = c0
    # Without save the cross-phase values (z and r * h of the reset-before GRU, h before the
    # projection) go to a one-step scratch that every step overwrites (time stride 0).
    if save:
        ws = torch.empty((T, B, K * H), **f32)
    else:
        ws = torch.empty((1, B, K * H) if (split or proj) else (0,), **f32)
    bar = torch.zeros((plan.NB,), device=gx.device, dtype=torch.int32)
    phases = (_F_GATES,) + ((_F_CANDIDATE,) if split else ()) + ((_F_PROJ,) if proj else ())
    for s_begin, s_end, mask in _launches(plan, T, phases, backward=False):
        launchable(_fwd_kernel)[(plan.NB, plan.NH)](
            gx, hs, cs, w, b_hh.contiguous() if b_hh is not None else w,
            w_hr.contiguous() if proj else w, lengths.contiguous() if lengths is not None else w,
            y, ws, bar, T, B, H, P, B * K * H if save else 0, s_begin, s_end, PHASES=mask,
            num_warps=_num_warps(plan), **meta)
    last = ((0 if reverse else T) if save else T % 2)
    # copies: an output of a custom op must not alias another one
    h_n = hs[last].to(gx.dtype, copy=True)
    c_n = cs[T % 2].to(gx.dtype, copy=True) if cell == LSTM else gx.new_empty((0,))
    if not save:
        hs = hs.new_empty((0,))
        ws = ws.new_empty((0,))
    return y, h_n, c_n, hs, ws


@triton_op("rnnkernels::recurrence_bwd_triton", mutates_args=())
def recurrence_bwd_triton(grad_y: Tensor | None, grad_h_n: Tensor | None,
                          grad_c_n: Tensor | None, c0: Tensor | None, w_hh: Tensor,
                          w_hr: Tensor | None, lengths: Tensor | None, hs: Tensor, ws: Tensor,
                          cell: int, reverse: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``recurrence_bwd`` in Triton: same arguments and outputs, from the hs / ws of
    :func:`recurrence_fwd_triton`. Returns grad_gx (T, B, G*H), grad_h0 (B, P), grad_c0 (B, H)
    or (0,), grad_w_hh (G*H, P), grad_b_hh (G*H,), grad_w_hr (P, H) or (0,)."""
    _validate.choice("recurrence_bwd_triton: cell", cell, list(NUM_GATES))
    _validate.recurrence_bwd_op("recurrence_bwd_triton", grad_y, grad_h_n, grad_c_n, c0, w_hh,
                                w_hr, lengths, hs, ws, gates=NUM_GATES[cell], lstm=cell == LSTM,
                                workspace_units=workspace_units(cell, w_hr is not None))
    T, B = ws.shape[0], ws.shape[1]
    GH, P = w_hh.shape
    G = NUM_GATES[cell]
    H = GH // G
    proj = w_hr is not None
    split = cell == GRU_RESET_BEFORE
    st = w_hh.dtype
    dev = w_hh.device
    f32 = {"device": dev, "dtype": torch.float32}
    plan = _plan(B, H, P, cell, proj, st, dev, backward=True)
    dgx_separate = cell == GRU or st != torch.float32
    meta = _meta(plan, H, P, cell, proj, st, True, REVERSE=reverse, HAS_GY=grad_y is not None,
                 HAS_LEN=lengths is not None, DGX=dgx_separate)

    w = w_hh.contiguous()
    hs = hs.contiguous()
    ws = ws.contiguous()
    dh = torch.zeros((2, B, P), **f32)
    if grad_h_n is not None:
        dh[T % 2] = grad_h_n
    dc = torch.zeros((2, B, H), **f32) if cell == LSTM else dh
    if cell == LSTM and grad_c_n is not None:
        dc[T % 2] = grad_c_n
    c0f = c0.float().contiguous() if cell == LSTM else dh
    dgh = torch.empty((T, B, GH), **f32)
    dgx = torch.empty((T, B, GH), device=dev, dtype=st) if dgx_separate else dgh
    dhd = torch.empty((B, H), **f32) if cell in (GRU, GRU_RESET_BEFORE) else dh
    dhp = torch.empty((T, B, P), **f32) if proj else dh
    gy = grad_y.contiguous() if grad_y is not None else dh
    bar = torch.zeros((plan.NB,), device=dev, dtype=torch.int32)
    phases = (_B_CELL,) + ((_B_RESET,) if split else ()) + (_B_DH,)
    for s_begin, s_end, mask in _launches(plan, T, phases, backward=True):
        launchable(_bwd_kernel)[(plan.NB, plan.NH)](
            gy, hs, ws, c0f, w, w_hr.contiguous() if proj else w,
            lengths.contiguous() if lengths is not None else w, dh, dc, dgh, dgx, dhd, dhp, bar,
            T, B, H, P, s_begin, s_end, PHASES=mask, num_warps=_num_warps(plan), **meta)

    # Weight gradients: one GEMM each over all steps and rows (fp32).
    hp = hs[1:] if reverse else hs[:T]
    dgh2 = dgh.view(T * B, GH)
    if split:
        v = ws[:, :, 3 * H:4 * H].reshape(T * B, H)
        dw = torch.cat([dgh2[:, :2 * H].t() @ hp.reshape(T * B, P), dgh2[:, 2 * H:].t() @ v])
    else:
        dw = dgh2.t() @ hp.reshape(T * B, P)
    db = dgh2.sum(0)
    dw_hr = w_hh.new_empty((0,))
    if proj:
        hfull = ws[:, :, 5 * H:6 * H].reshape(T * B, H)
        dw_hr = (dhp.view(T * B, P).t() @ hfull).to(st)
    dc0 = dc[0].to(st, copy=True) if cell == LSTM else w_hh.new_empty((0,))
    return dgx, dh[0].to(st, copy=True), dc0, dw.to(st), db.to(st), dw_hr


register_recurrence("rnnkernels::recurrence_fwd_triton", "rnnkernels::recurrence_bwd_triton")
