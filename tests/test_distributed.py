"""DistributedDataParallel (gloo, two processes spawned here) over our LSTM, GRU and Mamba: the
averaged gradients equal one process's on the whole batch; torch.distributed.checkpoint and
state_dict save / load round-trip."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from conftest import assert_close
from torch.nn.parallel import DistributedDataParallel

import rnnkernels

WORLD = 2
BATCH, STEPS, FEATURES = 6, 9, 5


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = rnnkernels.nn.LSTM(FEATURES, 8, batch_first=True)
        self.gru = rnnkernels.nn.GRU(8, 8, batch_first=True)
        self.mamba = rnnkernels.nn.Mamba(8, d_state=4)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.mamba(self.gru(self.lstm(x)[0])[0]))


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, STEPS, FEATURES, generator=g),
            torch.randn(BATCH, STEPS, 2, generator=g))


def _loss(model, x, target):
    # A mean loss: DDP averages the gradients of the ranks' equal halves, which is the gradient
    # of the mean over the whole batch.
    return torch.nn.functional.mse_loss(model(x), target)


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank,
                            world_size=WORLD)
    try:
        # Different seeds per rank: DDP must broadcast rank 0's parameters.
        model = _net(seed=rank)
        ddp = DistributedDataParallel(model)
        x, target = _batch()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        _loss(ddp, x[part], target[part]).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out}/grads{rank}.pt")
        dcp.save({"model": model.state_dict()}, checkpoint_id=f"{out}/dcp")
        restored = _net(seed=100 + rank)
        state = {"model": restored.state_dict()}
        dcp.load(state, checkpoint_id=f"{out}/dcp")
        restored.load_state_dict(state["model"])
        torch.save(restored(x), f"{out}/restored{rank}.pt")
        dist.barrier()
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    # No teardown of gloo: torch 2.13's ProcessGroupGloo destructor can deadlock (it joins a
    # gloo thread that waits for the GIL to release a finished collective's tensors). The
    # results are on disk; the exit code tells mp.spawn whether the rank failed.
    sys.stderr.flush()
    os._exit(code)


def test_ddp_gradients_and_checkpoint(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    model = _net(seed=0)
    x, target = _batch()
    _loss(model, x, target).backward()
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, p in model.named_parameters():
            assert_close(grads[name], p.grad.double(), torch.float32, msg=f"{name}, rank {rank}")
        torch.testing.assert_close(torch.load(tmp_path / f"restored{rank}.pt"), model(x),
                                   rtol=0, atol=0)


def test_state_dict_round_trip(tmp_path: Path):
    """state_dict through torch.save / torch.load(weights_only=True) into a differently
    initialised model reproduces the outputs exactly."""
    model, other = _net(seed=0), _net(seed=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x, _ = _batch()
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.cuda
def test_ddp_state_dict_loads_on_cuda(tmp_path: Path):
    """A checkpoint written on the CPU loads onto the GPU (map_location) and runs there."""
    model = _net(seed=0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    gpu = _net(seed=1).cuda()
    gpu.load_state_dict(torch.load(tmp_path / "model.pt", map_location="cuda", weights_only=True))
    x, _ = _batch()
    assert_close(gpu(x.cuda()), model(x).double(), torch.float32)
