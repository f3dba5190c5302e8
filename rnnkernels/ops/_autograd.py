"""Autograd and torch.func support shared by the op families: the Autograd kernel of a forward
op, the test for a backward that must itself be differentiable, and vmap helpers.

Why not ``torch.library.register_autograd``: in torch 2.13 it wraps the backward in an
autograd.Function whose forward takes ``ctx``, which every torch.func transform refuses ("must
override the setup_context staticmethod", pytorch/pytorch#168393). :func:`register_autograd`
registers the same thing, an Autograd kernel that runs the op below autograd and records a
backward, through an autograd.Function with a separate ``setup_context``, so ``torch.func.grad``,
``vjp`` and ``jacrev`` work as well as eager autograd and ``torch.compile``. This leans on
private torch APIs (``_SingleLevelFunction``, ``enable_single_level_autograd_function``,
``torch._C._functorch``, ``_AutoDispatchBelowAutograd``), as functorch's own handling of
autograd.Function does; tests/test_func.py checks them on the pinned torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._C import _functorch as _ft
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad

# Python-side kernel registrations of this package (a Library must outlive its kernels).
_LIBS: dict[str, torch.library.Library] = {}
# Per registered forward op, the autograd.Function that :func:`call` applies in plain eager
# autograd (see there).
_EAGER: dict[torch._ops.OpOverload, type] = {}


def overload(op: object) -> torch._ops.OpOverload:
    """The OpOverload of an op given as "ns::name", a torch.ops packet or a custom op."""
    if isinstance(op, str):
        namespace, name = op.split("::")
        return getattr(getattr(torch.ops, namespace), name).default
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default
    if isinstance(op, torch._ops.OpOverload):
        return op
    return op._opoverload


def _library(op: torch._ops.OpOverload) -> torch.library.Library:
    namespace = op.namespace
    if namespace not in _LIBS:
        _LIBS[namespace] = torch.library.Library(namespace, "IMPL")
    return _LIBS[namespace]


def register_autograd(op: object, backward: Callable, setup_context: Callable) -> None:
    """Registers ``backward`` / ``setup_context`` (the signatures of
    ``torch.library.register_autograd``) as the Autograd kernel of ``op``."""
    fwd = overload(op)

    def below_autograd(keyset, args):
        # As a built-in op's Autograd kernel: autograd excluded for the kernel's own ATen calls,
        # redispatch with the call's keyset. Under a torch.func grad transform this goes down
        # to the next level, which records its own backward.
        with torch._C._AutoDispatchBelowAutograd():
            return fwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def forward(keyset, *args):
        # Function.apply turns grad mode off for the forward; the levels below (outer torch.func
        # grad transforms) need it back, as the kernel is only applied with grad mode on.
        with torch.enable_grad():
            return below_autograd(keyset, args)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs[1:], output)

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]  # as the op's arguments, without the keyset
        try:
            return None, *backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs

    # A single-level Function: the kernel runs inside the dispatcher, at the Autograd key of
    # whichever autograd level (plain, or one torch.func grad transform) is processing the op,
    # so it records the backward at that level only.
    function = type(f"{fwd._opname}_function", (torch.autograd.function._SingleLevelFunction,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward_),
    })

    def autograd_kernel(keyset, *args):
        if _has_tangent(args):
            raise NotImplementedError(
                f"rnnkernels: {fwd._opname} has no forward-mode derivative (torch.func.jvp, "
                "jacfwd, hessian); use reverse mode: vjp, jacrev, jacrev(jacrev(f)) for a "
                "Hessian")
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad
                                           for a in args):
            with enable_single_level_autograd_function():
                return function.apply(keyset, *args)
        return below_autograd(keyset, args)

    # Plain eager autograd (see call): the same backward on a Function whose forward runs the
    # op below autograd and calls setup_context itself.
    def eager_forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = fwd(*args)
        setup_context(ctx, args, output)
        return output

    _EAGER[fwd] = type(f"{fwd._opname}_eager", (torch.autograd.function._SingleLevelFunction,), {
        "forward": staticmethod(eager_forward),
        "backward": staticmethod(backward),
    })

    with warnings.catch_warnings():
        # torch.library.triton_op already put a placeholder Autograd kernel on the Triton ops;
        # replacing it is the point, not a mistake the warning should report. torch 2.11's
        # Library.impl refuses to replace a kernel registered from Python unless allow_override
        # is given (2.13 allows it by default): without it, import failed there.
        warnings.filterwarnings("ignore", "(?s).*Overriding a previously registered kernel")
        _library(fwd).impl(fwd, autograd_kernel, "Autograd", with_keyset=True,
                           allow_override=True)


def plain_eager() -> bool:
    """Whether a call is plain eager autograd: no torch.compile tracing, no forward-mode AD
    level, no torch.func transform above it."""
    return not (torch.compiler.is_compiling() or forward_ad._current_level >= 0
                or _ft.maybe_current_level() is not None)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call(op: Callable, record: bool, *args):
    """``op(*args)`` for an op registered with :func:`register_autograd`. In plain eager mode
    without the Python Autograd kernel, whose round trip from the dispatcher back into Python
    costs microseconds per call (a decoding loop calls a layer once per token; a training step
    pays it in the forward): when ``record`` is False (the caller found that no gradient is
    needed) straight below autograd, else through an autograd.Function with the same backward
    that runs the op below autograd. Through the Autograd kernel as usual where something above
    plain eager autograd must see the call: a torch.func transform, a forward-mode AD level (the
    kernel refuses tangents), or tracing by torch.compile."""
    if not plain_eager():
        return op(*args)
    if record:
        return _EAGER[overload(op)].apply(*args)
    return below_autograd(op, *args)


def below_autograd(op: Callable, *args):
    """``op(*args)`` straight below autograd, for a caller that has found that no gradient is
    needed and the call plain eager (see :func:`call`)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _has_tangent(args: tuple) -> bool:
    """Whether forward-mode AD (a dual level, torch.func.jvp) carries a tangent on an argument:
    the op would drop it silently."""
    return forward_ad._current_level >= 0 and any(
        isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def _grad_levels(t: Tensor) -> list[int]:
    """The autograd levels that record operations on t: each torch.func grad transform that
    wraps it, and 0 for plain autograd."""
    levels = []
    while _ft.is_functorch_wrapped_tensor(t):
        if _ft.is_gradtrackingtensor(t):
            levels.append(_ft.maybe_get_level(t))
        t = _ft.get_unwrapped(t)
    if t.requires_grad:
        levels.append(0)
    return levels


def graph_needed(*tensors: Tensor | None) -> bool:
    """Whether a backward over these tensors (its saved tensors and incoming gradients) must
    build a differentiable graph: ``create_graph=True`` with plain autograd, or a transform
    outside the torch.func grad transform whose backward this is (grad of grad, jacrev of grad).
    A single ``torch.func.grad`` runs its backward with grad mode on as well, but nothing
    differentiates the result, so it keeps the fused backward."""
    if not torch.is_grad_enabled():
        return False
    levels = [_grad_levels(t) for t in tensors if t is not None]
    own = max((max(ls) for ls in levels if ls), default=0)
    return any(level < own or level == own == 0 for ls in levels for level in ls)


def differentiable_vjp(fn: Callable, inputs: Sequence[Tensor | None],
                       grads: Sequence[Tensor | None], needs: Sequence[bool]
                       ) -> list[Tensor | None]:
    """Vector-Jacobian product of ``fn(*inputs)`` (a tuple of tensors or None) with ``grads``,
    as a graph that can be differentiated again: the gradient w.r.t. each input whose ``needs``
    is set, None for the others."""
    with torch.enable_grad():
        # Fresh aliases, so that autograd.grad gives the partial derivatives: an input may
        # depend on another (Mamba's delta on u), and the derivative w.r.t. the original would
        # add that path, which the caller's graph adds again.
        inputs = [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]
        outputs = fn(*inputs)
    pairs = [(o, g) for o, g in zip(outputs, grads)
             if o is not None and g is not None and o.requires_grad]
    wrt = [i for i, t in enumerate(inputs) if needs[i] and t is not None and t.requires_grad]
    result: list[Tensor | None] = [None] * len(inputs)
    if pairs and wrt:
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt],
                                    [g.to(o.dtype) for o, g in pairs], create_graph=True,
                                    allow_unused=True)
        for i, g in zip(wrt, found):
            result[i] = g
    return result


# ------------------------------------------------------------------ vmap helpers

def fold(t: Tensor | None, bdim: int | None, dim: int, size: int) -> Tensor | None:
    """t with the vmapped dimension (at bdim; broadcast when None) merged into its dimension
    ``dim``, vmap index major: (..., V * n, ...)."""
    if t is None:
        return None
    t = t.movedim(bdim, dim) if bdim is not None else t.unsqueeze(dim).expand(
        *t.shape[:dim], size, *t.shape[dim:])
    return t.flatten(dim, dim + 1)


def unfold(t: Tensor, dim: int, size: int) -> Tensor:
    """Inverse of :func:`fold`: splits dimension ``dim`` into (V, n)."""
    return t.unflatten(dim, (size, -1))


def vmap_by_loop(op: Callable, info, in_dims: tuple, *args) -> tuple:
    """A vmap rule that runs ``op`` once per index of the vmapped dimension and stacks the
    outputs (at dimension 0). For arguments that cannot share one kernel call: per-sample
    weights, or gradients that the kernel sums over the batch."""
    runs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(runs[0], Tensor):
        return torch.stack(runs), 0
    return tuple(torch.stack(outs) for outs in zip(*runs)), (0,) * len(runs[0])


def batched(in_dims: tuple, *positions: int) -> bool:
    """Whether any of the arguments at ``positions`` carries the vmapped dimension."""
    return any(in_dims[p] is not None for p in positions)


__all__ = ["batched", "differentiable_vjp", "fold", "graph_needed", "overload",
           "register_autograd", "unfold", "vmap_by_loop"]
