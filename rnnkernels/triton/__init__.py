"""Triton kernels, one module per family (recurrence.py, selective_scan.py, linear_scan.py), each
registered with torch.library.triton_op so that it traces under torch.compile."""

from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


def launchable(kernel):
    """``torch.library.wrap_triton(kernel)`` (traceable by torch.compile and make_fx), or the
    kernel itself where ``TRITON_INTERPRET=1`` made it an InterpretedFunction: torch 2.13's
    wrap_triton returns those as they are, torch 2.11's raises RuntimeError ("wrap_triton only
    works on functions annotated with triton.jit") whenever a dispatch mode or a trace enables
    it, so the interpreted kernels run unwrapped on every supported torch."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
