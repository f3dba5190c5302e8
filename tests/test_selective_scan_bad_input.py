"""Bad arguments of selective_scan raise a named ValueError / TypeError before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from test_selective_scan import ARGS, make_inputs

from rnnkernels.ops import selective_scan
from rnnkernels.ops.selective_scan import _accepts, _check


def call(**changes):
    inputs = make_inputs(batch=2, dim=4, L=5, N=3, form="grouped", groups=2,
                         initial_state=True, dtype=torch.float32)
    inputs.update(changes)
    return selective_scan(*(inputs[k] for k in ARGS[:8]), initial_state=inputs["initial_state"])


BAD = [
    ("u_not_tensor", {"u": [[1.0]]}, TypeError, "u must be a torch.Tensor"),
    ("u_2d", {"u": torch.randn(2, 4)}, ValueError, "u must have 3 dimensions"),
    ("u_integer", {"u": torch.ones(2, 4, 5, dtype=torch.int64)}, TypeError, "u must be a floating"),
    ("u_empty_L", {"u": torch.randn(2, 4, 0)}, ValueError, "u must have at least one time step"),
    ("delta_shape", {"delta": torch.randn(2, 4, 6)}, ValueError, "delta must have shape"),
    ("delta_dtype", {"delta": torch.randn(2, 4, 5, dtype=torch.float64)}, TypeError,
     "delta must have dtype torch.float32"),
    ("A_complex", {"A": torch.randn(4, 3, dtype=torch.complex64)}, TypeError,
     "complex A is not supported"),
    ("A_rows", {"A": -torch.rand(5, 3)}, ValueError, "A must have shape"),
    ("N_above_limit", {"A": -torch.rand(4, 257)}, ValueError, "between 1 and 256"),
    ("B_rank", {"B": torch.randn(2, 2, 3, 5, 1)}, ValueError, "B must be \\(dim, N\\) fixed"),
    ("B_state_size", {"B": torch.randn(2, 2, 4, 5)}, ValueError, "B must have shape"),
    ("B_groups_not_dividing", {"B": torch.randn(2, 3, 3, 5), "C": torch.randn(2, 3, 3, 5)},
     ValueError, "B has 3 groups, which must divide dim = 4"),
    ("B_C_groups_differ", {"C": torch.randn(2, 4, 3, 5)}, ValueError,
     "B and C must have the same number of groups"),
    ("C_length", {"C": torch.randn(2, 3, 4)}, ValueError, "C must have shape"),
    ("C_complex", {"C": torch.randn(4, 3, dtype=torch.complex64)}, TypeError,
     "complex C is not supported"),
    ("D_shape", {"D": torch.randn(3)}, ValueError, "D must have shape"),
    ("delta_bias_integer", {"delta_bias": torch.ones(4, dtype=torch.int32)}, TypeError,
     "delta_bias must be a floating"),
    ("z_shape", {"z": torch.randn(2, 4, 4)}, ValueError, "z must have shape"),
    ("z_dtype", {"z": torch.randn(2, 4, 5, dtype=torch.bfloat16)}, TypeError,
     "z must have dtype torch.float32"),
    ("initial_state_shape", {"initial_state": torch.randn(2, 4, 2)}, ValueError,
     "initial_state must have shape"),
    ("A_wrong_device", {"A": -torch.rand(4, 3, device="meta")}, ValueError,
     "A must be on device cpu"),
]


@pytest.mark.parametrize("name,changes,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, changes, error, match):
    with pytest.raises(error, match=match):
        call(**changes)


# The common case, (batch, N, L) B and C, goes through selective_scan's fast acceptance test
# first (ops.selective_scan._accepts); every bad argument must fail it and then raise from the
# full checks.
VARIABLE_BAD = {
    "u_2d": {"u": torch.randn(2, 4)},
    "u_integer": {"u": torch.ones(2, 4, 5, dtype=torch.int64)},
    "u_no_channel": {"u": torch.randn(2, 0, 5)},
    "u_empty_L": {"u": torch.randn(2, 4, 0)},
    "delta_shape": {"delta": torch.randn(2, 4, 6)},
    "delta_dtype": {"delta": torch.randn(2, 4, 5, dtype=torch.float64)},
    "delta_device": {"delta": torch.randn(2, 4, 5, device="meta")},
    "A_list": {"A": [[-1.0] * 3] * 4},
    "A_complex": {"A": torch.randn(4, 3, dtype=torch.complex64)},
    "A_rows": {"A": -torch.rand(5, 3)},
    "A_device": {"A": -torch.rand(4, 3, device="meta")},
    "B_state_size": {"B": torch.randn(2, 4, 5)},
    "B_complex": {"B": torch.randn(2, 3, 5, dtype=torch.complex64)},
    "B_integer": {"B": torch.ones(2, 3, 5, dtype=torch.int32)},
    "C_length": {"C": torch.randn(2, 3, 4)},
    "C_device": {"C": torch.randn(2, 3, 5, device="meta")},
    "D_shape": {"D": torch.randn(3)},
    "D_integer": {"D": torch.ones(4, dtype=torch.int32)},
    "D_list": {"D": [1.0] * 4},
    "delta_bias_device": {"delta_bias": torch.randn(4, device="meta")},
    "z_shape": {"z": torch.randn(2, 4, 4)},
    "z_dtype": {"z": torch.randn(2, 4, 5, dtype=torch.bfloat16)},
    "z_device": {"z": torch.randn(2, 4, 5, device="meta")},
    "initial_state_shape": {"initial_state": torch.randn(2, 4, 2)},
    "initial_state_integer": {"initial_state": torch.ones(2, 4, 3, dtype=torch.int64)},
}


def variable_args(**changes):
    inputs = make_inputs(batch=2, dim=4, L=5, N=3, form="variable", initial_state=True,
                         dtype=torch.float32)
    inputs.update(changes)
    return [inputs[k] for k in ARGS[:8]] + [inputs["initial_state"]]


def test_fast_acceptance_of_good_arguments():
    args = variable_args()
    assert _accepts(*args)
    _check(*args)
    for optional in ("D", "z", "delta_bias", "initial_state"):  # None: accepted too
        assert _accepts(*variable_args(**{optional: None}))


@pytest.mark.parametrize("name", sorted(VARIABLE_BAD))
def test_fast_acceptance_refuses_bad_arguments(name):
    args = variable_args(**VARIABLE_BAD[name])
    assert not _accepts(*args)
    with pytest.raises((ValueError, TypeError)):
        _check(*args)
