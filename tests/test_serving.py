"""Serving: torch.export of a model built on our modules, torch.save / torch.load of whole
modules, and one module called from two Python threads at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_close

import rnnkernels


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.lstm = rnnkernels.nn.LSTM(5, hidden, batch_first=True)
        self.gru = rnnkernels.nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.mamba = rnnkernels.nn.Mamba(2 * hidden, d_state=4)
        self.ssm = rnnkernels.nn.LinearSSM(2 * hidden, 4, mode="scan")
        self.head = torch.nn.Linear(2 * hidden, 2)

    def forward(self, x):
        return self.head(self.ssm(self.mamba(self.gru(self.lstm(x)[0])[0])))


def test_export_static_shapes_runs_with_autograd():
    """Exported with parameters requiring grad (the training graph's ops and their saved
    states): the exported module gives the eager outputs."""
    model = Net()
    x = torch.randn(3, 7, 5)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_export_dynamic_batch_and_length(grad):
    """An export with symbolic batch and length runs at other sizes (including the length past
    one scan chunk of 64 steps) and matches eager: for inference (no_grad) and with gradients
    enabled (the scan then saves its chunk-start states, whose count follows the length: a
    dimension of its own that was 1 at the example's length made the export fail)."""
    model = Net().eval()
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", max=4096)
    with torch.set_grad_enabled(grad):
        exported = torch.export.export(model, (torch.randn(3, 7, 5),),
                                       dynamic_shapes={"x": {0: batch, 1: length}})
        module = exported.module()
        for shape in [(1, 2, 5), (3, 7, 5), (5, 130, 5)]:
            x = torch.randn(shape)
            assert_close(module(x), model(x).double(), torch.float32)


def test_exported_program_save_load(tmp_path: Path):
    """torch.export.save / load: the deployment artefact reloads and runs our ops."""
    model = Net().eval()
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (x,)), tmp_path / "net.pt2")
        loaded = torch.export.load(tmp_path / "net.pt2")
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=0, atol=0)


def test_torch_save_load_whole_module(tmp_path: Path):
    """Whole modules pickle (torch.save(module)) and come back as our classes, with the same
    outputs and gradients."""
    model = Net()
    torch.save(model, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    assert isinstance(loaded.mamba, rnnkernels.nn.Mamba)
    assert isinstance(loaded.lstm, rnnkernels.nn.LSTM)
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    loaded(x).sum().backward()
    model(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def _concurrent(fn, inputs: list[torch.Tensor]) -> list:
    """fn over inputs, two Python threads at once (each its own half), started together."""
    results: list = [None] * len(inputs)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(part: int) -> None:
        try:
            start.wait()
            for i in range(part, len(inputs), 2):
                results[i] = fn(inputs[i])
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "input-gradient"])
def test_two_threads_share_one_module(grad):
    """H = 64, batch 4 makes the CPU recurrence use its multi-thread team (a barrier per step)
    in both calls at once."""
    model = Net(hidden=64)
    inputs = [torch.randn(4, 24, 5) for _ in range(4)]

    def fn(x):
        if not grad:
            with torch.no_grad():
                return model(x)
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(x).square().sum(), x)
        return g

    expected = [fn(x) for x in inputs]
    for got, want in zip(_concurrent(fn, inputs), expected):
        assert_close(got, want.double(), torch.float32)
