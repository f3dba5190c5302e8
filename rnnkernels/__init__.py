"""rnnkernels: fused recurrence and selective-scan kernels for PyTorch.

``rnnkernels.nn`` has drop-in modules (LSTM, GRU, RNN), ``rnnkernels.ops`` the functional
forms; :func:`set_backend` / :func:`use_backend` force a backend; :func:`cpu_cache_bytes`,
:func:`set_cpu_cache_limit` and :func:`empty_cpu_cache` manage the cache of large CPU buffers
the ops reuse from call to call, :func:`keep_cpu_lane_buffers` whether the CPU kernels' threads
keep their smaller scratch for their next call.
"""

from . import (
    _kernels,  # noqa: F401  (loads the compiled ops first)
    nn,
    ops,
)
from ._backend import set_backend, use_backend
from ._cpu_cache import (
    cpu_cache_bytes,
    empty_cpu_cache,
    keep_cpu_lane_buffers,
    set_cpu_cache_limit,
)

__version__ = "0.1.0"
__all__ = ["nn", "ops", "set_backend", "use_backend", "cpu_cache_bytes", "set_cpu_cache_limit",
           "empty_cpu_cache", "keep_cpu_lane_buffers", "__version__"]
