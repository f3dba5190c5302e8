"""Resource leaks: 1000 training iterations (and inference calls) of a small model on our three
kernel families leave memory flat: resident set size on the CPU, peak allocated memory on a
GPU."""

from __future__ import annotations

import os

import pytest
import torch

import rnnkernels

ITERATIONS = 1000
WARMUP = 100
# Each iteration keeps tens of KB of states and workspaces and its autograd graph alive until
# its backward: a leak of either grows the process by tens to hundreds of MB over the run;
# allocator noise stays well under this bound.
RSS_GROWTH_LIMIT = 8 * 2**20


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = rnnkernels.nn.LSTM(8, 16, batch_first=True)
        self.mamba = rnnkernels.nn.Mamba(16, d_state=4)
        self.ssm = rnnkernels.nn.LinearSSM(16, 4, mode="scan")
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.ssm(self.mamba(self.lstm(x)[0])))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _train(device: str, iterations: int, on_warm) -> None:
    model = Net().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, target = torch.randn(4, 16, 8, device=device), torch.randn(4, 16, 1, device=device)
    for i in range(iterations):
        if i == WARMUP:
            on_warm()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()
        with torch.no_grad():
            model(x[:1])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_cpu_rss_flat_over_training():
    # One intra-op thread: the kernels' parallel regions over tiny work cost a scheduler slice
    # each on a loaded machine; what leaks does not depend on the thread count.
    marks: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train("cpu", ITERATIONS, lambda: marks.append(_rss()))
    finally:
        torch.set_num_threads(threads)
    growth = _rss() - marks[0]
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MB"


@pytest.mark.cuda
def test_cuda_peak_memory_flat_over_training():
    """The peak over iterations 100..1000 is no higher than over one warm iteration."""

    def reset():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    _train("cuda", WARMUP + 1, reset)
    warm_peak = torch.cuda.max_memory_allocated()
    _train("cuda", ITERATIONS, reset)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= warm_peak + 2**20
