"""Loads ``mamba_ssm.selective_scan_fn``, the selective-scan anchor, when it is installed.

``import mamba_ssm`` runs the package's ``__init__``, which imports its language-model code and
with it ``transformers``; the GPU machine has no ``transformers``, and the scan needs none of
that. So when the plain import fails, the ops module is imported under a bare package object
that skips ``__init__`` (the ops module itself needs only torch, einops, triton and the compiled
``selective_scan_cuda``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable

OPS_MODULE = "mamba_ssm.ops.selective_scan_interface"


@functools.cache
def load() -> tuple[Callable | None, str]:
    """(selective_scan_fn, version) when importable, else (None, why not)."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return None, "mamba_ssm is not installed"
    version = importlib.metadata.version("mamba-ssm")
    try:
        return importlib.import_module(OPS_MODULE).selective_scan_fn, version
    except ImportError as plain_error:
        sys.modules.pop("mamba_ssm", None)
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations or [])
        sys.modules["mamba_ssm"] = package
        try:
            fn = importlib.import_module(OPS_MODULE).selective_scan_fn
        except ImportError as error:
            sys.modules.pop("mamba_ssm", None)
            return None, f"mamba_ssm {version} is not importable: {plain_error}; {error}"
        return fn, f"{version} (ops module only)"
