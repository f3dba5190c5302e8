"""The cache of large CPU buffers behind the recurrence ops (rnnkernels.cpu_cache_bytes,
set_cpu_cache_limit, empty_cpu_cache): freed buffers are kept and reused, buffers in use never
are, the limit holds, and results do not depend on whether a buffer came from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import assert_close

import rnnkernels
from rnnkernels import keep_cpu_lane_buffers

# An LSTM whose output (T, B, H) and saved gates (T, B, 4H) are 1 MiB and more in float32: the
# buffers the cache serves (smaller ones come from torch's allocator).
T, B, I, H = 64, 32, 24, 128


@pytest.fixture(autouse=True)
def _fresh_cache():
    limit = rnnkernels.set_cpu_cache_limit(256 << 20)
    rnnkernels.empty_cpu_cache()
    yield
    rnnkernels.set_cpu_cache_limit(limit)
    rnnkernels.empty_cpu_cache()


def _models():
    ours = rnnkernels.nn.LSTM(I, H)
    ref = torch.nn.LSTM(I, H).double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _train_step(model, x, gy):
    x = x.detach().requires_grad_()
    y, _ = model(x)
    grads = torch.autograd.grad(y, [x, *model.parameters()], gy)
    # a copy of y: y itself would keep its cached buffer from the next step (as a training loop
    # that drops y does not)
    return [y.detach().clone(), *grads]


def test_training_steps_reuse_cached_buffers_with_the_same_results():
    ours, ref = _models()
    x, gy = torch.randn(T, B, I), torch.randn(T, B, H)
    first = _train_step(ours, x, gy)
    cached = rnnkernels.cpu_cache_bytes()
    assert cached >= 4 * T * B * H * 4  # at least the saved gates came back to the cache
    second = _train_step(ours, x, gy)
    assert rnnkernels.cpu_cache_bytes() == cached  # the second step took no new buffer
    expected = _train_step(ref, x.double(), gy.double())
    for a, b, e in zip(first, second, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_close(a, e, torch.float32, scale=8)


def test_a_shorter_sequence_reuses_the_longer_ones_buffers():
    ours, ref = _models()
    _train_step(ours, torch.randn(T, B, I), torch.randn(T, B, H))
    cached = rnnkernels.cpu_cache_bytes()
    short = 5 * T // 8  # every cached buffer of the long step is at most twice what it needs
    x, gy = torch.randn(short, B, I), torch.randn(short, B, H)
    results = _train_step(ours, x, gy)
    assert rnnkernels.cpu_cache_bytes() == cached  # no buffer beyond the long step's
    expected = _train_step(ref, x.double(), gy.double())
    for a, e in zip(results, expected):
        assert_close(a, e, torch.float32, scale=8)


def test_buffers_in_use_are_neither_reused_nor_released():
    ours, _ = _models()
    with torch.no_grad():
        y1, _ = ours(torch.randn(T, B, I))
        kept = y1.clone()
        del _
        y2, _ = ours(torch.randn(T, B, I))  # same sizes: would take y1's buffer were it free
        assert y2.data_ptr() != y1.data_ptr()
        rnnkernels.empty_cpu_cache()
        assert rnnkernels.cpu_cache_bytes() == 0
        torch.testing.assert_close(y1, kept, rtol=0, atol=0)
        y1.add_(1.0)  # still writable memory of its own
        torch.testing.assert_close(y1, kept + 1.0, rtol=0, atol=0)


def test_limit_bounds_the_cache_and_zero_turns_it_off():
    ours, ref = _models()
    x, gy = torch.randn(T, B, I), torch.randn(T, B, H)
    assert rnnkernels.set_cpu_cache_limit(0) == 256 << 20
    results = _train_step(ours, x, gy)
    assert rnnkernels.cpu_cache_bytes() == 0
    expected = _train_step(ref, x.double(), gy.double())
    for a, e in zip(results, expected):
        assert_close(a, e, torch.float32, scale=8)

    limit = 5 << 20
    rnnkernels.set_cpu_cache_limit(limit)
    _train_step(ours, x, gy)
    assert 0 < rnnkernels.cpu_cache_bytes() <= limit
    rnnkernels.set_cpu_cache_limit(2 << 20)  # lowering the limit releases what is beyond it
    assert rnnkernels.cpu_cache_bytes() <= 2 << 20
    released = rnnkernels.empty_cpu_cache()
    assert released >= 0 and rnnkernels.cpu_cache_bytes() == 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("1", TypeError)])
def test_bad_limit_raises_named_error(bad, error):
    with pytest.raises(error, match="nbytes"):
        rnnkernels.set_cpu_cache_limit(bad)


def test_concurrent_calls_from_threads_get_their_own_buffers():
    ours, _ = _models()
    inputs = [torch.randn(T, B, I) for _ in range(4)]
    with torch.no_grad():
        expected = [ours(x)[0] for x in inputs]
    results: list[list[torch.Tensor]] = [[] for _ in inputs]

    def run(k: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[k].append(ours(inputs[k])[0])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, outs in enumerate(results):
        assert len(outs) == 5
        for y in outs:
            torch.testing.assert_close(y, expected[k], rtol=0, atol=0)


def _scan_step(op: str):
    """A training step of a CPU scan whose (batch, dim, L) tensors are 1 MiB in float32: its
    results (outputs and every input gradient)."""
    batch, dim, L, N = 2, 64, 2048, 4
    gen = torch.Generator().manual_seed(3)
    if op == "linear_scan":
        a = torch.rand(batch, dim, L, generator=gen) * 0.9
        inputs = [a, torch.randn(batch, dim, L, generator=gen)]
        fn = rnnkernels.ops.linear_scan
    else:
        inputs = [torch.randn(batch, dim, L, generator=gen),            # u
                  torch.randn(batch, dim, L, generator=gen) * 0.5,      # delta
                  -torch.rand(dim, N, generator=gen) - 0.5,             # A
                  torch.randn(batch, N, L, generator=gen),              # B
                  torch.randn(batch, N, L, generator=gen),              # C
                  torch.randn(batch, dim, L, generator=gen)]            # z

        def fn(u, delta, A, B, C, z):
            return rnnkernels.ops.selective_scan(u, delta, A, B, C, z=z, delta_softplus=True)
    inputs = [t.requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=gen))
    return [out.detach(), *grads]


@pytest.mark.parametrize("op", ["selective_scan", "linear_scan"])
def test_scans_reuse_cached_buffers_with_the_same_results(op):
    with rnnkernels.use_backend("cpu"):
        first = [t.clone() for t in _scan_step(op)]  # the step's own tensors freed
        cached = rnnkernels.cpu_cache_bytes()
        assert cached >= 2 << 20  # the output and the input gradients came back to the cache
        second = [t.clone() for t in _scan_step(op)]
        assert rnnkernels.cpu_cache_bytes() == cached
        rnnkernels.set_cpu_cache_limit(0)
        uncached = _scan_step(op)
    for a, b, c in zip(first, second, uncached):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_lane_buffers_kept_or_fresh_give_the_same_results():
    """keep_cpu_lane_buffers switches the kernels' threads between keeping their freed lane buffers
    (the default) and allocating them on every call, returning the previous setting; the
    results are the same bit for bit either way. A non-bool is refused by name."""
    with rnnkernels.use_backend("cpu"):
        kept = _scan_step("selective_scan")
        assert keep_cpu_lane_buffers(False) is True
        try:
            fresh = _scan_step("selective_scan")
        finally:
            assert keep_cpu_lane_buffers(True) is False
    for a, b in zip(kept, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="keep"):
        keep_cpu_lane_buffers(1)


def test_cached_buffers_show_in_the_memory_profiler():
    ours, _ = _models()
    x = torch.randn(T, B, I, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        y, _ = ours(x)
    usage = {e.name: e.cpu_memory_usage for e in prof.events()}
    # y (T, B, H) and the saved gates (T, B, 4H) of the forward, at the least
    assert usage["rnnkernels::recurrence_fwd"] >= 5 * T * B * H * 4


FORK_SCRIPT = """
import os, threading
import torch, rnnkernels
torch.set_num_threads(1)  # no OpenMP team for the forked children to inherit
lstm = rnnkernels.nn.LSTM(24, 128)
x = torch.randn(64, 32, 24)  # output (64, 32, 128): 1 MiB, a cached buffer
stop = threading.Event()

def work():
    with torch.no_grad():
        while not stop.is_set():
            lstm(x)

thread = threading.Thread(target=work)
thread.start()
statuses = []
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        with torch.no_grad():
            y, _ = lstm(x)
        os._exit(0 if tuple(y.shape) == (64, 32, 128) and rnnkernels.cpu_cache_bytes() >= 0 else 1)
    statuses.append(os.waitpid(pid, 0)[1])
stop.set()
thread.join()
with torch.no_grad():
    lstm(x)
print(statuses)
raise SystemExit(0 if all(s == 0 for s in statuses) else 1)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_allocates():
    """Forked children allocate from the cache, and the parent goes on, while another thread of
    the parent keeps allocating and freeing cached buffers (the cache's fork handlers take its
    lock around fork and release it on both sides)."""
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
