// Host test of the launch shapes of the CUDA kernels (csrc/cuda/launch_plan.h): the state slots of
// the recurrence, the persistent kernel's partition and shared-memory layout (coverage, limits,
// the alignment WMMA needs), the scans' thread layout, group spans, tiling and the backward's
// segment order. Runs without a GPU; the last line is "N passed, M failed".
#include <cstdio>
#include <vector>

#include "check.h"
#include "launch_plan.h"

using namespace rnnkernels;
using namespace rnnkernels::cuda;

namespace {

const DeviceLimits kH100{132, 227 * 1024, 8};
const DeviceLimits kA100{108, 163 * 1024, 0};

void test_step_order() {
  for (int64_t steps = 1; steps <= 6; ++steps) {
    for (bool reverse : {false, true}) {
      for (bool save : {false, true}) {
        std::snprintf(rk_test::context(), 256, "steps=%lld reverse=%d save=%d",
                      static_cast<long long>(steps), reverse, save);
        const StepOrder o{steps, reverse, save};
        std::vector<int> seen(steps, 0);
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t t = o.time(s);
          CHECK(t >= 0 && t < steps);
          if (t >= 0 && t < steps) ++seen[t];
          if (s + 1 < steps) CHECK(o.slot_out(s) == o.slot_in(s + 1));
          if (s > 0) CHECK(o.time_before(s) == o.time(s - 1));
          if (save) {
            // The state before time t (in the direction of the run) is slot t forward, t+1 reverse.
            CHECK(o.slot_in(s) == (reverse ? t + 1 : t));
            CHECK(o.slot_out(s) == (reverse ? t : t + 1));
          } else {
            CHECK(o.slot_in(s) == (s & 1) && o.slot_out(s) == ((s + 1) & 1));
          }
        }
        for (int64_t t = 0; t < steps; ++t) CHECK(seen[t] == 1);
      }
    }
  }
}

void check_persistent(const PersistentProblem& pb, const DeviceLimits& lim,
                      const PersistentPlan& pl) {
  const int rpu = pb.backward ? 1 : pb.gates;
  const int64_t k = pb.backward ? pb.gates * pb.hidden : pb.hidden;
  CHECK(int64_t(pl.blocks) * pl.units >= pb.hidden);
  CHECK(int64_t(pl.blocks - 1) * pl.units < pb.hidden);
  CHECK(pl.blocks <= lim.sms);
  if (pl.cluster) CHECK(pl.blocks <= lim.max_cluster);
  CHECK(pl.smem_bytes <= lim.smem_per_block);
  CHECK(pl.rows == pl.units * rpu);
  CHECK(pl.rows_pad >= pl.rows && pl.rows_pad % pl.tile_m == 0);
  CHECK(pl.k == k && pl.k_pad >= k && pl.k_pad % 16 == 0);
  CHECK(pl.k_chunk % 16 == 0 && pl.k_chunk <= pl.k_pad && pl.k_chunk <= kMaxChunk);
  CHECK(pl.batch_tile % pl.tile_n == 0 && pl.batch_tile >= pl.tile_n);
  CHECK(pl.batch_tile <= round_up(pb.batch, pl.tile_n));
  CHECK(pl.ldw >= pl.k_pad && pl.ldx >= pl.k_chunk && pl.ldg >= pl.rows_pad);
  CHECK(pl.ksplit >= 1);
  // The three shared arrays are disjoint and in bounds.
  const int x_bytes = pb.mma ? 2 : 4;
  CHECK(pl.off_x >= int64_t(pl.rows_pad) * pl.ldw * pb.w_bytes);
  CHECK(pl.off_g - pl.off_x >= int64_t(pl.batch_tile) * pl.ldx * x_bytes);
  CHECK(pl.smem_bytes - pl.off_g >= int64_t(pl.ksplit) * pl.batch_tile * pl.ldg * 4);
  CHECK(pl.off_x % kSmemAlign == 0 && pl.off_g % kSmemAlign == 0);
  if (pb.mma) {
    CHECK(pl.tile_m * pl.tile_n == 256);
    CHECK(pl.tile_m == 8 || pl.tile_m == 16 || pl.tile_m == 32);
    // WMMA: leading dimensions a multiple of 8 (16-bit) / 4 (fp32) elements, and every tile
    // pointer 32-byte aligned: row steps of a tile, chunk starts, k steps, split copies.
    CHECK(pl.ldw % 8 == 0 && pl.ldx % 8 == 0 && pl.ldg % 4 == 0);
    CHECK((int64_t(pl.tile_m) * pl.ldw * 2) % 32 == 0);
    CHECK((int64_t(pl.tile_n) * pl.ldx * 2) % 32 == 0);
    CHECK((pl.k_chunk * 2) % 32 == 0);
    CHECK((int64_t(pl.tile_n) * pl.ldg * 4) % 32 == 0 && (pl.tile_m * 4) % 32 == 0);
    CHECK((int64_t(pl.batch_tile) * pl.ldg * 4) % 32 == 0);
    const int tiles = (pl.rows_pad / pl.tile_m) * (pl.batch_tile / pl.tile_n);
    CHECK(pl.ksplit == 1 || tiles * pl.ksplit <= kPersistentWarps);
    CHECK(pl.ksplit <= pl.k_chunk / 16);
  } else {
    CHECK(pl.ksplit == 1);
    CHECK(pl.tile_m == kFmaRows && pl.tile_n == kFmaBatch);
  }
}

void test_persistent_invariants() {
  const int64_t hiddens[] = {1, 7, 33, 64, 100, 256, 333, 512, 1000, 1024, 1536, 2048, 4096};
  const int64_t batches[] = {1, 3, 8, 17, 64, 200};
  int fitting = 0;
  for (const DeviceLimits& lim : {kH100, kA100}) {
    for (int gates : {4, 3, 1}) {
      for (int64_t h : hiddens) {
        for (int64_t b : batches) {
          for (int w_bytes : {2, 4}) {
            for (bool backward : {false, true}) {
              const PersistentProblem pb{gates, h, b, backward, w_bytes, w_bytes == 2 && b >= 8};
              std::snprintf(rk_test::context(), 256, "G=%d H=%lld B=%lld bytes=%d bwd=%d sms=%d",
                            gates, static_cast<long long>(h), static_cast<long long>(b), w_bytes,
                            backward, lim.sms);
              const PersistentPlan pl = plan_persistent(pb, lim);
              if (pl.fits) {
                ++fitting;
                check_persistent(pb, lim, pl);
              } else {
                // Only too much weight for the chip may refuse: even the thinnest slice (one
                // block per multiprocessor) does not fit, and its weights alone fill a good part
                // of the shared memory.
                const int u_min = static_cast<int>(ceil_div(h, lim.sms));
                CHECK(persistent_layout(pb, lim, u_min).smem_bytes > lim.smem_per_block);
                const int64_t rows = int64_t(u_min) * (backward ? 1 : gates);
                const int64_t k = backward ? gates * h : h;
                CHECK(rows * k * w_bytes > lim.smem_per_block / 4);
              }
            }
          }
        }
      }
    }
  }
  rk_test::context()[0] = '\0';
  CHECK(fitting > 100);
}

void test_persistent_choices() {
  // A small LSTM in bf16 goes to one cluster on Hopper, a cooperative grid on Ampere.
  PersistentProblem lstm{4, 256, 16, false, 2, true};
  std::snprintf(rk_test::context(), 256, "LSTM H=256 bf16");
  PersistentPlan pl = plan_persistent(lstm, kH100);
  CHECK(pl.fits && pl.cluster && pl.blocks == 8 && pl.units == 32);
  pl = plan_persistent(lstm, kA100);
  CHECK(pl.fits && !pl.cluster && pl.rows >= kMinRowsPerBlock);
  // H = 1024 bf16 needs most of the chip: one unit-group per multiprocessor, forward and back.
  lstm.hidden = 1024;
  std::snprintf(rk_test::context(), 256, "LSTM H=1024 bf16");
  pl = plan_persistent(lstm, kH100);
  CHECK(pl.fits && !pl.cluster && pl.blocks <= 132 && pl.tile_m == 32);
  lstm.backward = true;
  pl = plan_persistent(lstm, kH100);
  CHECK(pl.fits && pl.k == 4096 && pl.k_chunk == kMaxChunk);
  // fp32 weights of H = 2048 (64 MB) cannot stay on chip.
  const PersistentProblem big{4, 2048, 16, false, 4, false};
  std::snprintf(rk_test::context(), 256, "LSTM H=2048 fp32");
  CHECK(!plan_persistent(big, kH100).fits);
  // The WMMA shape pads the resident rows least.
  std::snprintf(rk_test::context(), 256, "choose_tile_m");
  CHECK(choose_tile_m(32) == 32 && choose_tile_m(64) == 32 && choose_tile_m(8) == 8);
  CHECK(choose_tile_m(12) == 16 && choose_tile_m(24) == 8 && choose_tile_m(48) == 16);
}

void test_scan_threads() {
  for (int n = 1; n <= kMaxStates; ++n) {
    std::snprintf(rk_test::context(), 256, "N=%d", n);
    const ScanThreads th = scan_threads(n);
    CHECK(th.lanes >= 1 && th.lanes <= 32 && (th.lanes & (th.lanes - 1)) == 0);
    CHECK(th.states == 1 || th.states == 2 || th.states == 4 || th.states == 8);
    CHECK(th.lanes * th.states == pow2_ceil(n));
    CHECK(th.lanes * th.channels == kScanThreads);
  }
}

void test_groups_spanned() {
  for (int64_t dim = 1; dim <= 48; ++dim) {
    for (int64_t groups = 1; groups <= dim; ++groups) {
      if (dim % groups) continue;
      for (int channels : {1, 2, 4, 8, 16, 32, 128}) {
        std::snprintf(rk_test::context(), 256, "dim=%lld groups=%lld channels=%d",
                      static_cast<long long>(dim), static_cast<long long>(groups), channels);
        const int64_t per = dim / groups;
        int most = 0;
        for (int64_t d0 = 0; d0 < dim; d0 += channels) {
          std::vector<int> hit(groups, 0);
          for (int64_t d = d0; d < d0 + channels && d < dim; ++d) hit[d / per] = 1;
          int first = -1, count = 0;
          for (int g = 0; g < groups; ++g) {
            if (hit[g] && first < 0) first = g;
            count += hit[g];
          }
          // The groups of a block are consecutive, starting at the first channel's.
          CHECK(first == d0 / per);
          if (count > most) most = count;
        }
        CHECK(groups_spanned(dim, groups, channels) == most);
      }
    }
  }
}

void check_scan_plan(const SelectiveScanShape& s, int64_t limit, const SelectiveScanPlan& pl) {
  CHECK(pl.smem_bytes <= limit);
  CHECK(pl.tile == 64 || pl.tile == 32 || pl.tile == 16);
  CHECK(pl.ts == pl.tile + 1);
  CHECK(pl.np >= s.n_state);
  const int64_t row = int64_t(pl.th.channels) * pl.ts;
  CHECK(pl.off_b >= scan_channel_rows(s.backward) * row);
  CHECK(pl.off_c - pl.off_b == int64_t(pl.b_span) * pl.np * pl.ts);
  if (s.b_groups) CHECK(pl.b_span >= 1 && pl.b_span <= s.b_groups);
  if (s.c_groups) CHECK(pl.c_span >= 1 && pl.c_span <= s.c_groups);
  const int64_t slots = int64_t(kScanThreads) * pl.th.states;
  if (s.backward) {
    CHECK(pl.off_db - pl.off_c == int64_t(pl.c_span) * pl.np * pl.ts);
    CHECK(pl.off_dc - pl.off_db == int64_t(pl.b_span) * pl.np * pl.ts);
    CHECK(pl.off_x - pl.off_dc == int64_t(pl.c_span) * pl.np * pl.ts);
    CHECK(pl.off_bnd - pl.off_x == int64_t(pl.tile) * slots);
    CHECK(pl.smem_bytes == (pl.off_bnd + int64_t(pl.seg_tiles) * slots) * 4);
    CHECK(pl.seg_tiles >= 1 && pl.seg_tiles <= tiles_per_chunk(s, pl.tile));
  } else {
    CHECK(pl.smem_bytes == (pl.off_c + int64_t(pl.c_span) * pl.np * pl.ts) * 4);
  }
}

void test_scan_plans() {
  for (int n : {1, 5, 16, 33, 64, 256}) {
    for (int64_t dim : {1, 7, 48, 1536}) {
      for (int groups : {0, 1, 3}) {
        if (groups && dim % groups) continue;
        for (int64_t chunk : {16, 100, 256, 2048}) {
          for (bool backward : {false, true}) {
            const SelectiveScanShape s{dim, 2048, n, groups, groups, true, backward, chunk};
            std::snprintf(rk_test::context(), 256, "N=%d dim=%lld groups=%d chunk=%lld bwd=%d", n,
                          static_cast<long long>(dim), groups, static_cast<long long>(chunk),
                          backward);
            const SelectiveScanPlan pl = plan_selective_scan(s, kH100.smem_per_block);
            CHECK(pl.fits);
            if (pl.fits) check_scan_plan(s, kH100.smem_per_block, pl);
          }
        }
      }
    }
  }
  // The typical Mamba shape keeps several blocks per multiprocessor and whole chunks on chip.
  const SelectiveScanShape mamba{1536, 2048, 16, 1, 1, true, true, 256};
  std::snprintf(rk_test::context(), 256, "mamba-like backward");
  const SelectiveScanPlan pl = plan_selective_scan(mamba, kH100.smem_per_block);
  CHECK(pl.fits && pl.smem_bytes <= kScanPreferredSmem);
  CHECK(pl.seg_tiles == tiles_per_chunk(mamba, pl.tile));
  // Too many states are refused.
  const SelectiveScanShape wide{64, 100, kMaxStates + 1, 0, 0, false, false, 64};
  std::snprintf(rk_test::context(), 256, "N > kMaxStates");
  CHECK(!plan_selective_scan(wide, kH100.smem_per_block).fits);
}

void test_segments() {
  // The backward's tile order within a chunk: every tile exactly once, last to first, each
  // segment's start states within the seg_tiles slots.
  for (int tiles = 1; tiles <= 40; ++tiles) {
    for (int seg = 1; seg <= tiles + 2; ++seg) {
      std::snprintf(rk_test::context(), 256, "tiles=%d seg=%d", tiles, seg);
      std::vector<int> order;
      bool slots_ok = true;
      for (int end = tiles, begin; end > 0; end = begin) {
        begin = segment_begin(end, seg);
        slots_ok = slots_ok && end - begin <= seg && begin < end;
        for (int ti = end - 1; ti >= begin; --ti) order.push_back(ti);
      }
      CHECK(slots_ok);
      bool reversed = static_cast<int>(order.size()) == tiles;
      for (int i = 0; reversed && i < tiles; ++i) reversed = order[i] == tiles - 1 - i;
      CHECK(reversed);
    }
  }
}

}  // namespace

int main() {
  test_step_order();
  test_persistent_invariants();
  test_persistent_choices();
  test_scan_threads();
  test_groups_spanned();
  test_scan_plans();
  test_segments();
  return rk_test::finish();
}
