"""python -m bench.roofline: the CPU's limits behind the recurrence suites' targets.

A CPU recurrence cannot be faster than the work it must do at the rate this machine does it:

- training step (forward + backward, one layer): six matmuls of T*B rows, each 2*T*B*G*H*H
  flops for input = hidden = H (input projection, its input gradient and weight gradient; the
  recurrent matmul forward, backward and weight gradient). The floor is six times one
  (T*B x H) @ (H x G*H) matmul, timed here with MKL (torch.mm), oneDNN and our packed panels
  (``rnnkernels::matmul`` forced onto them, csrc/cpu/panel_matmul.h), the fastest counted:
  the machine's rate on the big, efficient shape; the per-step recurrent matmuls have only B
  rows and run below it.
- inference at batch 1: per step a matrix-vector product that reads all of W_hh (G*H*H
  values) and the step's input projection (G*H*I multiply-adds; the kernel computes it in the
  recurrence's shadow, csrc/cpu/panel_gemm.h, RowProjection). Split over the threads, each
  thread reads its slice of W_hh per step from its own core's cache and does its share of the
  multiply-adds; the floor is T times the larger of the two: the slice's bytes over the rate at
  which each core streams a buffer of that size with every thread streaming at once, and the
  share's multiply-adds over the rate at which each core runs independent vector multiply-adds
  with every thread running them at once. Both rates from small C++ probes (compiled on first
  use with torch.utils.cpp_extension; AVX-512 or AVX2 as the compiler's -march=native gives).

- selective scan training step (forward + backward): every state update x = exp(dt A) x + dt B u
  of the batch * dim * L * N takes exp(dt A) at least twice, once in the forward and once in the
  backward, which cannot keep the batch * dim * L * N values (its memory must stay linear in L /
  chunk) and so forms them again. The floor is two passes of that exp and the update's
  multiply-add alone, at the rate the kernels' own exp (csrc/cpu/vec_math.h, compiled into a
  small probe) runs on every thread at once: nothing else of the step (the input gradients, B
  and C, the gate, any load or store) is counted.

Prints, per case, the floor, our time and the share of the floor's speed it reaches (floor / ours),
the baseline's time at the same shape in the same run (torch.nn for the recurrences, the PyTorch
loop for the scan; timed in turns with ours), our speed-up over it, the largest speed-up that the
floor allows, the round trip between two threads just before and after the row's timing (the
batch-1 recurrence's threads wait for each other at every step; on a virtual machine the trip
moves with where the host places the virtual CPUs), and the page faults per call of ours and of
the baseline while timed (in this fresh process, glibc maps a large buffer anew on every call
where a suite's run, after other cases, may reuse its heap: the PyTorch loop's large tensors can
fault here and not there, which slows the baseline). Our result is checked against the
baseline's before either is timed.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from rnnkernels import ops
from rnnkernels.ops import _linear

from . import check, configs, env
from .loops import selective_scan_loop
from .projection_effect import forced
from .recurrence import CPU_TARGETS, FAMILIES
from .scans import SELECTIVE_SCAN_CPU_TARGET, selective_scan_inputs
from .scans import _train_step as scan_train_step
from .timing import interleaved_times, median_time

_CPU_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cpu"

_PROBES = r"""
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "lanes.h"
#include "vec_math.h"

// Runs body(k) on `threads` threads at once (k = 0 on the caller's); body returns the seconds
// of its own timed part. Returns the slowest thread's seconds.
template <typename F>
double slowest_thread_seconds(int64_t threads, const F& body) {
  std::vector<double> seconds(threads);
  auto run = [&](int64_t k) { seconds[k] = body(k); };
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < threads; ++k) pool.emplace_back(run, k);
  run(0);
  for (auto& t : pool) t.join();
  return *std::max_element(seconds.begin(), seconds.end());
}

// Seconds for every one of `threads` threads to read its own buffer of `bytes` bytes `passes`
// times, all threads at once (each buffer written once first, so it sits in that core's cache
// when it fits). 16 independent float sums: the compiler vectorises them, and they never wait
// on an add's latency, so the loads are the limit.
double stream_seconds(int64_t bytes, int64_t passes, int64_t threads) {
  const int64_t n = std::max<int64_t>(64, bytes / 4 / 64 * 64);
  std::vector<float> sink(threads);
  return slowest_thread_seconds(threads, [&](int64_t k) {
    std::vector<float> buf(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = 1e-3f * static_cast<float>(i % 7);
    float acc[64] = {};
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t p = 0; p < passes; ++p) {
      for (int64_t i = 0; i < n; i += 64) {
        for (int j = 0; j < 64; ++j) acc[j] += buf[i + j];
      }
    }
    const auto t1 = std::chrono::steady_clock::now();
    float s = 0;
    for (float a : acc) s += a;
    sink[k] = s;
    return std::chrono::duration<double>(t1 - t0).count();
  });
}

// The sum of every lane of the n vectors of v: what a probe keeps of its results, so that the
// compiler cannot drop the timed loop. Added up in registers first: passed to a function that is
// not inlined, the array's address escaped and GCC stored every vector of it to the stack on
// every iteration of the timed loop, which then ran at the rate of those stores (the multiply-
// add probe at half the multiply-add units' rate on an AVX2 machine).
template <int64_t n>
float lane_sum(const at::vec::Vectorized<float> (&v)[n]) {
  at::vec::Vectorized<float> total = v[0];
  for (int64_t j = 1; j < n; ++j) total = total + v[j];
  float lanes[at::vec::Vectorized<float>::size()];
  total.store(lanes);
  float s = 0;
  for (float x : lanes) s += x;
  return s;
}

// Seconds for every one of `threads` threads to run `fmas / threads` vector multiply-adds of
// W lanes (counted in lanes), all threads at once: independent accumulators, so that the
// multiply-add units, not their latency, are the limit, as many as the vector registers hold
// beside the two operands (16 of AVX-512's 32; 12 of AVX2's 16).
double fma_seconds(int64_t fmas, int64_t threads) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size(), kAcc = rnnkernels::cpu::lanes::kVectorRegisters >= 32 ? 16 : 12;
  const int64_t iters = std::max<int64_t>(1, fmas / threads / (W * kAcc));
  std::vector<float> sink(threads);
  return slowest_thread_seconds(threads, [&](int64_t k) {
    V acc[kAcc];
    for (int j = 0; j < kAcc; ++j) acc[j] = V(1e-3f * static_cast<float>(j));
    const V a(0.999f), b(1e-4f);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) {
      for (int j = 0; j < kAcc; ++j) acc[j] = at::vec::fmadd(acc[j], a, b);
    }
    const auto t1 = std::chrono::steady_clock::now();
    sink[k] = lane_sum(acc);
    return std::chrono::duration<double>(t1 - t0).count();
  });
}

// Seconds for every one of `threads` threads to run `updates / threads` selective-scan state
// updates x = exp(dt A) x + b, a vector of W lanes at a time, four independent states per
// thread (as the CPU kernel keeps them), dt cycling through 64 vectors in L1.
double exp_update_seconds(int64_t updates, int64_t threads) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size(), kStates = 4, kDt = 64;
  const int64_t iters = std::max<int64_t>(1, updates / threads / (W * kStates));
  std::vector<float> sink(threads);
  return slowest_thread_seconds(threads, [&](int64_t k) {
    float dt_buf[kDt * W];
    for (int64_t i = 0; i < kDt * W; ++i) dt_buf[i] = 1e-3f * static_cast<float>(1 + i % 97);
    V x[kStates], a2[kStates];
    for (int j = 0; j < kStates; ++j) {
      x[j] = V(0.f);
      a2[j] = V(-1.4427f * static_cast<float>(j + 1));
    }
    const V b(1e-3f);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) {
      const V dt = V::loadu(dt_buf + (i % kDt) * W);
      for (int j = 0; j < kStates; ++j) {
        x[j] = at::vec::fmadd(rnnkernels::cpu::fast_exp2<float>(dt * a2[j]), x[j], b);
      }
    }
    const auto t1 = std::chrono::steady_clock::now();
    sink[k] = lane_sum(x);
    return std::chrono::duration<double>(t1 - t0).count();
  });
}

// Seconds of one round trip between two threads: the caller stores a count, the other thread
// sees it and answers with the same count, `trips` times; the median over blocks of 1000 trips
// (a step of the batch-1 recurrence waits for the other thread's part of the state once, a one-
// way trip of its flag and of the state's cache lines).
double round_trip_seconds(int64_t trips) {
  alignas(64) std::atomic<int64_t> ping{0};
  alignas(64) std::atomic<int64_t> pong{0};
  std::thread other([&] {
    for (int64_t i = 1; i <= trips; ++i) {
      while (ping.load(std::memory_order_acquire) < i) {}
      pong.store(i, std::memory_order_release);
    }
  });
  constexpr int64_t kBlock = 1000;
  std::vector<double> blocks;
  for (int64_t i = 1; i <= trips;) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t end = std::min(trips, i + kBlock - 1);
    for (; i <= end; ++i) {
      ping.store(i, std::memory_order_release);
      while (pong.load(std::memory_order_acquire) < i) {}
    }
    blocks.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
                     / kBlock);
  }
  other.join();
  std::nth_element(blocks.begin(), blocks.begin() + blocks.size() / 2, blocks.end());
  return blocks[blocks.size() / 2];
}
"""

# torch's CPU capability -> the defines the package's kernels are compiled with (setup.py), so the
# exp probe runs the same exp.
_CAPABILITY_DEFINES = {"AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
                       "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]}

_probes = None


def _compiled_probes():
    """The C++ probes, compiled on first use (torch.utils.cpp_extension) in a build directory of
    this process's own, removed at exit. torch's default one is shared by every torch release
    with the same Python and CUDA, whose builds then replace each other's, and a run killed while
    it builds leaves a lock there on which every later run waits forever (as one did here)."""
    global _probes
    if _probes is None:
        capability = torch.backends.cpu.get_cpu_capability()
        defines = _CAPABILITY_DEFINES.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
        build = tempfile.mkdtemp(prefix="rnnkernels-roofline-")
        atexit.register(shutil.rmtree, build, ignore_errors=True)
        _probes = load_inline("rnnkernels_bench_roofline", cpp_sources=_PROBES,
                              functions=["stream_seconds", "exp_update_seconds",
                                         "fma_seconds", "round_trip_seconds"],
                              extra_include_paths=[str(_CPU_SOURCES)],
                              extra_cflags=["-O3", "-march=native", *defines],
                              build_directory=build, verbose=False)
    return _probes


def exp_update_seconds(updates: int, threads: int) -> float:
    """Seconds for ``threads`` threads at once to run ``updates`` selective-scan state updates
    (exp(dt A) and the multiply-add) between them: the best of five runs."""
    probe = _compiled_probes()
    return min(probe.exp_update_seconds(updates, threads) for _ in range(5))


def scan_floor(threads: int) -> float:
    """Seconds of the selective-scan training-step floor at the cpu profile's shape: two passes
    of exp(dt A) and the update over batch * dim * L * N state updates."""
    d = configs.SELECTIVE_SCAN["cpu"].train
    updates = d["batch"] * d["dim"] * d["L"] * d["N"]
    return 2 * exp_update_seconds(updates, threads)


def _check_close(name: str, ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    """Refuses to time ours when its results differ from the baseline's beyond the benchmark's
    float32 gate (bench.check.compare, the baseline's results standing in for the expected
    values)."""
    verdict = check.compare([f"result {i}" for i in range(len(theirs))], ours,
                            [t.double() for t in theirs], check.tolerance("cpu", torch.float32))
    if not verdict.ok:
        raise RuntimeError(f"{name}: ours differs from the baseline: {verdict.reason}; not timed")


def round_trip_seconds(trips: int = 20000) -> float | None:
    """Seconds of a round trip between two threads (the median over blocks of trips), or None
    with fewer than two threads (the probe's threads spin: on one core each trip would wait for
    the scheduler). On a virtual machine it depends on where the host places the two virtual
    CPUs, and it moves during a run."""
    if torch.get_num_threads() < 2:
        return None
    return _compiled_probes().round_trip_seconds(trips)


# What _ours_and_baseline measures: our median seconds, the baseline's, the threads' round trips
# just before and just after the timing, and the minor page faults per call of ours and of the
# baseline during it.
Measured = tuple[float, float, tuple[float | None, float | None], tuple[float, float]]


def _ours_and_baseline(name: str, ours, theirs) -> Measured:
    """Median seconds of the steps ``ours`` and ``theirs`` (each returning its results), timed in
    turns after their results are compared, the threads' round trip just before and just after
    the timing, and each step's page faults per call (in this process's allocator state: a fresh
    process maps a large buffer anew on every call, where the suite's run, after other cases,
    may not)."""
    _check_close(name, [t.detach() for t in ours()], [t.detach() for t in theirs()])
    before = round_trip_seconds()
    mine, base = interleaved_times([ours, theirs], "cpu", 1.0)
    return (mine.median_s, base.median_s, (before, round_trip_seconds()),
            (mine.faults_per_call or 0.0, base.faults_per_call or 0.0))


def scan_seconds() -> Measured:
    """Median seconds of our selective scan's and the PyTorch loop's training step (the
    selective_scan suite's contenders) at the cpu profile's shape, the round trips around
    their timing and the page faults per call."""
    inputs, grad_out = selective_scan_inputs(configs.SELECTIVE_SCAN["cpu"].train, "cpu",
                                             torch.float32, torch.Generator().manual_seed(0),
                                             True)
    ours = scan_train_step(lambda *a: ops.selective_scan(*a, delta_softplus=True), inputs,
                           grad_out, None)
    loop = scan_train_step(lambda *a: selective_scan_loop(*a, delta_softplus=True), inputs,
                           grad_out, None)
    return _ours_and_baseline("selective scan train", ours, loop)


def stream_rate(slice_bytes: int, threads: int, min_bytes: float = 1e9) -> float:
    """Bytes per second one core reads a buffer of ``slice_bytes`` with ``threads`` threads
    streaming at once: the best of five runs (on a shared machine a run can lose its core)."""
    probe = _compiled_probes()
    passes = max(1, int(min_bytes / max(slice_bytes, 1)))
    seconds = min(probe.stream_seconds(slice_bytes, passes, threads) for _ in range(5))
    return slice_bytes * passes / seconds


def fma_rate(threads: int, fmas: float = 4e9) -> float:
    """Multiply-adds (lanes) per second one core runs with ``threads`` threads running them at
    once: the best of five runs."""
    probe = _compiled_probes()
    seconds = min(probe.fma_seconds(int(fmas), threads) for _ in range(5))
    return fmas / threads / seconds


def mm_seconds(rows: int, inner: int, cols: int) -> float:
    """Median seconds of the fastest of torch.mm (MKL), oneDNN's matmul and our panels on
    (rows x inner) @ (inner x cols): on AMD CPUs MKL runs AVX2, at half oneDNN's AVX-512 rate on
    Zen 5; without AVX-512 the panels ran faster than both."""
    a = torch.randn(rows, inner)
    b = torch.randn(cols, inner)
    out = torch.empty(rows, cols)
    seconds = median_time(lambda: torch.mm(a, b.t(), out=out), "cpu", 0.5).median_s
    if _linear._onednn_matmul_available():
        seconds = min(seconds, median_time(lambda: _linear._onednn_linear(a, b, None), "cpu",
                                           0.5).median_s)
    panels = forced(lambda: [torch.ops.rnnkernels.matmul(a, b.t())], "1",
                    "RNNKERNELS_PANEL_MATMUL")
    return min(seconds, median_time(panels, "cpu", 0.5).median_s)


def _module_step(module: torch.nn.Module, x: torch.Tensor, train: bool):
    def step() -> list[torch.Tensor]:
        if train:
            y = module(x)[0]
            return [y, *torch.autograd.grad(y, [x, *module.parameters()], torch.ones_like(y))]
        with torch.no_grad():
            return [module(x)[0]]
    return step


def module_seconds(suite: str) -> dict[str, Measured]:
    """Median seconds of our module and torch.nn's (the suites' torch.nn contender), the same
    weights, at the cpu profile's training step and batch-1 inference: mode -> (ours, theirs,
    the round trips around their timing, the page faults per call), timed here so that floor
    and times come from one run."""
    family = FAMILIES[suite]
    out = {}
    for mode, dims in (("train", configs.RECURRENCE["cpu"].train),
                       ("inference", configs.RECURRENCE["cpu"].inference)):
        theirs = family.torch(dims["I"], dims["H"])
        ours = family.ours(dims["I"], dims["H"])
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(dims["T"], dims["B"], dims["I"], requires_grad=mode == "train")
        train = mode == "train"
        out[mode] = _ours_and_baseline(f"{family.title} {mode}", _module_step(ours, x, train),
                                       _module_step(theirs, x, train))
    return out


def floors(suite: str, threads: int) -> dict[str, float]:
    """Seconds of the training-step and batch-1 inference floors of ``suite`` at the cpu
    profile's shapes, and the per-core stream and multiply-add rates used."""
    G = FAMILIES[suite].gates
    train, infer = configs.RECURRENCE["cpu"].train, configs.RECURRENCE["cpu"].inference
    H, TB = train["H"], train["T"] * train["B"]
    train_floor = 6 * mm_seconds(TB, H, G * H)
    Hi, Ii, T = infer["H"], infer["I"], infer["T"]
    w_bytes = G * Hi * Hi * 4
    rate, fmas = stream_rate(w_bytes // threads, threads), fma_rate(threads)
    per_step = max((w_bytes / threads) / rate, G * Hi * (Hi + Ii) / threads / fmas)
    return {"train": train_floor, "inference": T * per_step, "rate": rate, "fma": fmas}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline",
                                description=__doc__.split("\n\n")[0])
    choices = [*FAMILIES, "selective_scan"]
    p.add_argument("--suite", default=",".join(choices),
                   help=f"comma-separated among {', '.join(choices)}")
    args = p.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in choices]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}; choose among {', '.join(choices)}")
    threads = torch.get_num_threads()
    print(f"# CPU floors of the speed targets\n\n{env.cpu_model()}, {threads} threads, "
          f"float32, torch {torch.__version__}, commit {env.commit()}\n")
    print("Ours: rnnkernels' module (recurrences) or op (scan) on the CPU kernels; floor / ours: "
          "the share of the floor's speed ours reaches. Baseline: torch.nn's module for the "
          "recurrences, the PyTorch loop for the scan, timed in turns with ours in this run. "
          "Round trip: between two threads, measured just before and just after the row's "
          "timing (the batch-1 recurrence's two threads exchange their parts of the state at "
          "every step). Faults: minor page faults per call of ours and of the baseline while "
          "timed, in this fresh process's allocator state (the suite's run, after other cases, "
          "can differ: its `faults` column).\n")
    print("| case | floor | per-core stream rate | per-core multiply-adds | ours | floor / ours | "
          "baseline | our speed-up | largest speed-up | target | round trip | faults |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def row(case: str, floor: float, rate: str, fma: str, ours: float, base: float,
            trips: tuple[float | None, float | None], faults: tuple[float, float],
            target: float) -> None:
        trip = "-" if None in trips else f"{trips[0] * 1e9:.0f} / {trips[1] * 1e9:.0f} ns"
        print(f"| {case} | {floor * 1e3:.3g} ms | {rate} | {fma} | {ours * 1e3:.3g} ms | "
              f"{floor / ours:.0%} | {base * 1e3:.4g} ms | {base / ours:.2f}x | "
              f"{base / floor:.2f}x | {target:g}x | {trip} | "
              f"{faults[0]:.0f} / {faults[1]:.0f} |")

    for suite in suites:
        if suite == "selective_scan":
            floor = scan_floor(threads)
            row("Selective scan train", floor, "-", "-", *scan_seconds(),
                SELECTIVE_SCAN_CPU_TARGET)
            continue
        f, times = floors(suite, threads), module_seconds(suite)
        title = FAMILIES[suite].title
        for mode, target in zip(("train", "inference"), CPU_TARGETS[suite]):
            rate = f"{f['rate'] / 1e9:.0f} GB/s" if mode == "inference" else "-"
            fma = f"{f['fma'] / 1e9:.0f} G/s" if mode == "inference" else "-"
            row(f"{title} {mode}", f[mode], rate, fma, *times[mode], target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
