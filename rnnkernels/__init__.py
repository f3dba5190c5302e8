"""rnnkernels: fused recurrence and selective-scan kernels for PyTorch.

``rnnkernels.nn`` has drop-in modules (LSTM, GRU, RNN), ``rnnkernels.ops`` the functional
forms; :func:`set_backend` / :func:`use_backend` force a backend.
"""

from . import (
    _kernels,  # noqa: F401  (loads the compiled ops first)
    nn,
    ops,
)
from ._backend import set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["nn", "ops", "set_backend", "use_backend", "__version__"]
