// Launch shapes of the CUDA kernels, as plain C++ so that the host ctest
// (csrc/tests/test_launch_plan.cpp) checks them without a GPU: the state slots of the recurrence,
// the partition of the persistent recurrence kernel over blocks and its shared-memory layout, and
// the tiling of the scans.
// Nothing here includes a CUDA header; the launchers (csrc/cuda/*.cu) fill DeviceLimits from the
// runtime and pass the plans to the kernels by value.
#pragma once

#include <cstdint>

#include "rnnkernels/cells.h"

namespace rnnkernels::cuda {

// Storage type of the activations of one call; the state and all accumulation are fp32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

RK_HOST_DEVICE constexpr int dtype_bytes(DType d) { return d == DType::F32 ? 4 : 2; }
RK_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
RK_HOST_DEVICE constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
RK_HOST_DEVICE constexpr int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// What the launchers read from the device (cudaDeviceGetAttribute) before planning.
struct DeviceLimits {
  int sms = 0;                 // multiprocessors
  int64_t smem_per_block = 0;  // opt-in maximum of dynamic shared memory per block, bytes
  int max_cluster = 0;         // largest portable thread-block cluster; 0 before Hopper
};

// ============================================================== recurrence: step order

// Step s of the loop runs time t = time(s). The state before step s is slot slot_in(s) of hs and
// the state after it slot slot_out(s): with save, slot t holds the state before time t forward
// and slot t+1 reverse, so the states that multiply the gradients of times 0..T-1 are one
// contiguous slice; without save two slots alternate. Same as csrc/cpu/recurrence.cpp.
struct StepOrder {
  int64_t steps;
  bool reverse, save;
  RK_HOST_DEVICE int64_t time(int64_t s) const { return reverse ? steps - 1 - s : s; }
  RK_HOST_DEVICE int64_t slot_in(int64_t s) const {
    return save ? (reverse ? steps - s : s) : (s & 1);
  }
  RK_HOST_DEVICE int64_t slot_out(int64_t s) const {
    return save ? (reverse ? steps - 1 - s : s + 1) : ((s + 1) & 1);
  }
  // Time of the step that ran just before step s (its workspace holds c_{t-1} of the LSTM).
  RK_HOST_DEVICE int64_t time_before(int64_t s) const {
    return reverse ? time(s) + 1 : time(s) - 1;
  }
};

// ============================================================== recurrence: persistent kernel
//
// Block k owns the hidden units [k * units, (k + 1) * units) for all T steps. The forward keeps
// the rows g*H + j (every gate g of its units j) of W_hh in shared memory and computes
// gates[b][row] = sum_p h[b][p] W[row][p]; the backward keeps the columns j of W_hh (rows of W^T)
// and computes dh[b][j] = sum_r dgh[b][r] W[r][j]. Either way a block multiplies its resident
// slice W_s (rows x k) by a staged operand X (batch x k) that every block reads whole from global
// memory after the step's barrier. The operand is staged k_chunk columns at a time, batch_tile
// rows at a time; partial sums go to shared memory G (ksplit copies, summed by the pointwise
// pass).

constexpr int kPersistentThreads = 512;
constexpr int kPersistentWarps = kPersistentThreads / 32;
// Per-block rows below which a block is mostly idle: a smaller grid is then cheaper to sync.
constexpr int kMinRowsPerBlock = 32;
// Widest and narrowest operand chunk staged at once (columns of X).
constexpr int kMaxChunk = 1024;
constexpr int kMinChunk = 128;
// Largest batch tile staged at once (rows of X).
constexpr int kMaxBatchTile = 32;
// Shared-memory row padding of 16-bit operands of the tensor-core path (bank spread, keeps
// every 16-column WMMA tile 32-byte aligned).
constexpr int kSkew16 = 8;
// FMA path: rows and batch rows one warp accumulates in registers.
constexpr int kFmaRows = 4;
constexpr int kFmaBatch = 8;
constexpr int kSmemAlign = 128;

struct PersistentProblem {
  int gates;        // G
  int64_t hidden;   // H (= P: the persistent kernels take no projection)
  int64_t batch;    // B
  bool backward;
  int w_bytes;      // bytes of one resident weight (the storage dtype)
  bool mma;         // tensor-core path (fp16/bf16 with batch >= 8) else FMA
};

struct PersistentPlan {
  bool fits = false;
  bool cluster = false;  // one thread-block cluster, hardware cluster barrier (sm_90)
  int blocks = 0, units = 0;
  int rows = 0, rows_pad = 0;          // rows of the resident slice, padded to tile_m
  int k = 0, k_pad = 0, k_chunk = 0;   // reduction length, padded to 16; staged chunk
  int tile_m = 0, tile_n = 0;          // WMMA shape (m x n x 16); FMA path: kFmaRows x kFmaBatch
  int batch_tile = 0, ksplit = 1;
  int ldw = 0, ldx = 0, ldg = 0;       // leading dimensions in elements
  int64_t off_x = 0, off_g = 0, smem_bytes = 0;
};

RK_HOST_DEVICE constexpr int rows_per_unit(const PersistentProblem& pb) {
  return pb.backward ? 1 : pb.gates;
}

// WMMA shape (m, n, 16) among those for 16-bit inputs, chosen to pad the resident rows least
// (ties go to the taller tile, which pads the batch least).
inline int choose_tile_m(int rows) {
  int best = 32;
  for (int m : {32, 16, 8}) {
    if (round_up(rows, m) < round_up(rows, best)) best = m;
  }
  return best;
}

// The layout for a given number of units per block; fits is false if it exceeds the limits.
inline PersistentPlan persistent_layout(const PersistentProblem& pb, const DeviceLimits& lim,
                                        int units) {
  PersistentPlan pl;
  pl.units = units;
  pl.blocks = static_cast<int>(ceil_div(pb.hidden, units));
  pl.rows = units * rows_per_unit(pb);
  pl.k = static_cast<int>(pb.backward ? pb.gates * pb.hidden : pb.hidden);
  pl.k_pad = static_cast<int>(round_up(pl.k, 16));
  pl.k_chunk = pl.k_pad < kMaxChunk ? pl.k_pad : kMaxChunk;
  const int x_bytes = pb.mma ? 2 : 4;  // X is staged in the storage type for MMA, fp32 for FMA
  if (pb.mma) {
    pl.tile_m = choose_tile_m(pl.rows);
    pl.tile_n = 256 / pl.tile_m;
    pl.rows_pad = static_cast<int>(round_up(pl.rows, pl.tile_m));
    pl.ldw = pl.k_pad + kSkew16;
  } else {
    pl.tile_m = kFmaRows;
    pl.tile_n = kFmaBatch;
    pl.rows_pad = static_cast<int>(round_up(pl.rows, kFmaRows));
    pl.ldw = pl.k_pad;
  }
  pl.ldg = pl.rows_pad + 4;  // WMMA stores need a multiple of 4 floats
  const int64_t w_bytes = round_up(int64_t(pl.rows_pad) * pl.ldw * pb.w_bytes, kSmemAlign);
  const int64_t max_tile = round_up(pb.batch, pl.tile_n);
  pl.batch_tile = static_cast<int>(max_tile < kMaxBatchTile ? max_tile
                                                             : round_up(kMaxBatchTile, pl.tile_n));
  // Shrink the staged batch, then the staged chunk, until the layout fits.
  for (;;) {
    pl.ldx = pl.k_chunk + (pb.mma ? kSkew16 : 0);
    pl.ksplit = 1;
    if (pb.mma) {
      const int tiles = (pl.rows_pad / pl.tile_m) * (pl.batch_tile / pl.tile_n);
      const int by_warps = kPersistentWarps / tiles;
      const int by_k = pl.k_chunk / 16;
      pl.ksplit = by_warps < 1 ? 1 : (by_warps < by_k ? by_warps : by_k);
    }
    const int64_t x_total = round_up(int64_t(pl.batch_tile) * pl.ldx * x_bytes, kSmemAlign);
    const int64_t g_total = round_up(int64_t(pl.ksplit) * pl.batch_tile * pl.ldg * 4, kSmemAlign);
    pl.off_x = w_bytes;
    pl.off_g = w_bytes + x_total;
    pl.smem_bytes = pl.off_g + g_total;
    if (pl.smem_bytes <= lim.smem_per_block) break;
    if (pl.batch_tile > pl.tile_n) {
      pl.batch_tile -= pl.tile_n;
    } else if (pl.k_chunk > kMinChunk) {
      pl.k_chunk = static_cast<int>(round_up(pl.k_chunk / 2, 16));
    } else {
      break;
    }
  }
  pl.fits = pl.blocks <= lim.sms && pl.smem_bytes <= lim.smem_per_block;
  return pl;
}

// Units per block: one cluster when the slice fits a portable cluster (its barrier is a hardware
// one), else enough blocks for kMinRowsPerBlock rows each, at most one block per multiprocessor.
// Co-residency with the kernel's real register use is checked by the launcher.
inline PersistentPlan plan_persistent(const PersistentProblem& pb, const DeviceLimits& lim) {
  const int64_t h = pb.hidden;
  const int u_min = static_cast<int>(ceil_div(h, lim.sms));
  if (lim.max_cluster > 0) {
    const int64_t u_c = ceil_div(h, lim.max_cluster);
    PersistentPlan pl = persistent_layout(pb, lim, static_cast<int>(u_c > u_min ? u_c : u_min));
    if (pl.fits) {
      pl.cluster = true;
      return pl;
    }
  }
  const int64_t u_lo = ceil_div(kMinRowsPerBlock, rows_per_unit(pb));
  const int64_t u_pref = u_lo < h ? u_lo : h;
  PersistentPlan pl = persistent_layout(pb, lim, static_cast<int>(u_pref > u_min ? u_pref : u_min));
  if (!pl.fits && u_pref > u_min) pl = persistent_layout(pb, lim, u_min);
  return pl;
}

// ============================================================== scans

constexpr int kScanThreads = 128;
// Time steps staged per tile, largest first; smaller tiles when shared memory is short.
constexpr int kScanTiles[] = {64, 32, 16};
// Shared memory a scan block prefers to stay under, so several blocks share a multiprocessor.
constexpr int64_t kScanPreferredSmem = 48 * 1024;
// Largest state size: 32 lanes x 8 states per thread.
constexpr int kMaxStates = 256;

// Thread layout of a selective-scan block: `lanes` threads per channel (a power of two <= 32)
// each own `states` of the N states (n = lane + k * lanes); `channels` channels per block.
struct ScanThreads {
  int lanes, states, channels;
};

inline ScanThreads scan_threads(int n_state) {
  const int lanes = pow2_ceil(n_state) < 32 ? pow2_ceil(n_state) : 32;
  return {lanes, pow2_ceil(ceil_div(n_state, lanes)), kScanThreads / lanes};
}

// Most groups of B (or C) that the `channels` consecutive channels of one block span, with
// `groups` groups of dim / groups channels each.
inline int groups_spanned(int64_t dim, int64_t groups, int channels) {
  const int64_t per = dim / groups;
  int most = 1;
  for (int64_t d0 = 0; d0 < dim; d0 += channels) {
    const int64_t d1 = (d0 + channels < dim ? d0 + channels : dim) - 1;
    const int span = static_cast<int>(d1 / per - d0 / per + 1);
    if (span > most) most = span;
  }
  return most;
}

struct SelectiveScanShape {
  int64_t dim, length;   // D, L
  int n_state;           // N
  int b_groups, c_groups;  // groups of variable B / C; 0 when fixed (dim, N)
  bool has_z, backward;
  int64_t chunk_size;
};

struct SelectiveScanPlan {
  bool fits = false;
  ScanThreads th{};
  int tile = 0, ts = 0;  // steps per tile, shared row stride (tile + 1: no bank conflicts)
  int np = 0;            // states padded: lanes * states
  int b_span = 0, c_span = 0;  // groups of B / C staged per block
  int seg_tiles = 0;     // backward: tiles whose start states fit in shared memory at once
  int64_t smem_bytes = 0;
  // Offsets, in floats, of the shared arrays (see the kernels for their use).
  int64_t off_b = 0, off_c = 0, off_db = 0, off_dc = 0, off_x = 0, off_bnd = 0;
};

// Number of per-channel rows of `ts` floats a block stages: forward u, delta, z, out; backward
// u, delta, the softplus derivative, z, grad_out, du, ddelta, dz.
RK_HOST_DEVICE constexpr int scan_channel_rows(bool backward) { return backward ? 8 : 4; }

// Tiles of one chunk (backward).
inline int64_t tiles_per_chunk(const SelectiveScanShape& s, int tile) {
  return ceil_div(s.chunk_size < s.length ? s.chunk_size : s.length, tile);
}

inline SelectiveScanPlan selective_scan_layout(const SelectiveScanShape& s, int64_t smem_limit,
                                               int tile) {
  SelectiveScanPlan pl;
  pl.th = scan_threads(s.n_state);
  pl.tile = tile;
  pl.ts = tile + 1;
  pl.np = pl.th.lanes * pl.th.states;
  pl.b_span = s.b_groups ? groups_spanned(s.dim, s.b_groups, pl.th.channels) : 0;
  pl.c_span = s.c_groups ? groups_spanned(s.dim, s.c_groups, pl.th.channels) : 0;
  const int64_t row = pl.ts;
  int64_t off = int64_t(scan_channel_rows(s.backward)) * pl.th.channels * row;
  pl.off_b = off;
  off += int64_t(pl.b_span) * pl.np * row;
  pl.off_c = off;
  off += int64_t(pl.c_span) * pl.np * row;
  const int64_t slots = int64_t(kScanThreads) * pl.th.states;
  if (s.backward) {
    pl.off_db = off;
    off += int64_t(pl.b_span) * pl.np * row;
    pl.off_dc = off;
    off += int64_t(pl.c_span) * pl.np * row;
    pl.off_x = off;
    off += int64_t(tile) * slots;
    pl.off_bnd = off;
    const int64_t per_chunk = tiles_per_chunk(s, tile);
    const int64_t room = smem_limit / 4 - off;
    const int64_t fit = room > 0 ? room / slots : 0;
    pl.seg_tiles = static_cast<int>(fit < per_chunk ? fit : per_chunk);
    off += int64_t(pl.seg_tiles) * slots;
    pl.fits = pl.seg_tiles >= 1;
  } else {
    pl.fits = true;
  }
  pl.smem_bytes = off * 4;
  pl.fits = pl.fits && s.n_state <= kMaxStates && pl.smem_bytes <= smem_limit;
  return pl;
}

// The largest tile whose layout stays under kScanPreferredSmem, else under the device limit; for
// the backward, first one that holds the start states of a whole chunk (no recomputation beyond
// one pass per chunk), else the largest tile that fits at all (chunks then run in segments).
inline SelectiveScanPlan plan_selective_scan(const SelectiveScanShape& s, int64_t smem_limit) {
  const int64_t preferred = smem_limit < kScanPreferredSmem ? smem_limit : kScanPreferredSmem;
  for (int64_t budget : {preferred, smem_limit}) {
    for (int tile : kScanTiles) {
      const SelectiveScanPlan pl = selective_scan_layout(s, budget, tile);
      if (pl.fits && (!s.backward || pl.seg_tiles == tiles_per_chunk(s, tile))) return pl;
    }
  }
  SelectiveScanPlan pl;
  for (int tile : kScanTiles) {
    pl = selective_scan_layout(s, smem_limit, tile);
    if (pl.fits) return pl;
  }
  return pl;
}

// The backward visits the tiles of one chunk from last to first, a segment of at most seg_tiles
// tiles at a time: first tile of the segment that ends (exclusive) at tile `end`.
RK_HOST_DEVICE constexpr int segment_begin(int end, int seg_tiles) {
  return end > seg_tiles ? end - seg_tiles : 0;
}

// Linear scan: one warp per (batch, channel) row, kLinearItems consecutive steps per lane.
constexpr int kLinearItems = 4;
constexpr int kLinearWarps = 4;
constexpr int kLinearTile = 32 * kLinearItems;

}  // namespace rnnkernels::cuda
