"""python -m bench.matmul_effect: the training step with its float32 matmuls on our panels and not.

A recurrent layer's training step on the CPU spends most of its time in four matmuls over all
steps: the input projection, its input gradient and the two weight gradients
(``rnnkernels.ops._linear``, csrc/recurrence_weight_grads.h). On builds without AVX-512 they go
through our packed panels (csrc/cpu/panel_matmul.h), elsewhere through MKL or oneDNN;
``RNNKERNELS_PANEL_MATMUL`` forces either, and the ops read it on every call. This tool times,
for each cell at the recurrence suites' training shape (``--hidden`` sets the input and hidden
size), one forward and backward of ours in the default choice, forced to the panels and forced
off them, and of torch.nn's module, in turns in one process
(:func:`bench.timing.interleaved_times`). Every result (output and every gradient) is checked
against torch.nn's module in float64 before it is timed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import configs
from .projection_effect import Step, checked_times, effect_main, forced
from .recurrence import FAMILIES

VARIABLE = "RNNKERNELS_PANEL_MATMUL"
FORMS = {"panels": "1", "vendor": "0"}


def _train_step(module: torch.nn.Module, x: Tensor, grad: Tensor) -> Step:
    def step() -> list[Tensor]:
        y, _ = module(x)
        return [y, *torch.autograd.grad(y, [x, *module.parameters()], grad)]
    return step


def measure(suite: str, hidden: int, inputs: int, min_time_s: float) -> list[tuple[str, float]]:
    """(contender, median seconds) of ``suite``'s training step at the cpu profile's shape with
    ``inputs`` inputs and ``hidden`` units, each result checked against float64 first."""
    d = configs.RECURRENCE["cpu"].train
    family = FAMILIES[suite]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = family.ours(inputs, hidden)
        x = torch.randn(d["T"], d["B"], inputs, requires_grad=True)
        grad = torch.randn(d["T"], d["B"], hidden)
    theirs = family.torch(inputs, hidden)
    theirs.load_state_dict(ours.state_dict())
    f64 = family.torch(inputs, hidden).double()
    f64.load_state_dict(ours.state_dict())
    expected = _train_step(f64, x.detach().double().requires_grad_(), grad.double())()
    step = _train_step(ours, x, grad)
    return checked_times(f"{suite}, hidden {hidden}, inputs {inputs}",
                         {family.torch.__name__: _train_step(theirs, x, grad)},
                         {form: forced(step, value, VARIABLE) for form, value in FORMS.items()},
                         forced(step, None, VARIABLE), expected, min_time_s)


def main(argv: list[str] | None = None) -> int:
    return effect_main(argv, "python -m bench.matmul_effect", __doc__.split("\n\n")[0],
                       "Training step: float32 matmuls on our panels against MKL / oneDNN",
                       configs.RECURRENCE["cpu"].train, "forward and backward", measure)


if __name__ == "__main__":
    raise SystemExit(main())
