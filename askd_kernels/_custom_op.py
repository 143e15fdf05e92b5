"""One helper for the ``torch.library`` custom ops of every family.

Each public op is a custom op (so ``torch.compile(fullgraph=True)`` traces through it without looking
inside) with a fake implementation (shapes only) and, for the forward ops, a registered autograd
formula. A backward formula must return one entry per input of the op; the inputs after the
differentiable tensors are options (flags, floats, strings) whose gradient is ``None``. The helper
takes a backward that returns the gradients of the *leading* inputs only and pads the rest with
``None``, counting the inputs from the op's signature, so nobody counts them by hand.

The ops are registered as ``torch.library.custom_op`` registers them (a library fragment per op, the
schema inferred from the signature, a ``CompositeExplicitAutograd`` kernel, the fake implementation,
an ``Autograd`` kernel built by ``torch.library.register_autograd``, the outputs checked not to alias
the inputs) but through the lower-level public calls, for one reason: ``custom_op`` wraps every kernel
in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (0.7 s on the idle 2-core
machine of ``bench/results/cpu``, 1.4–2.6 s there under load: a fixed cost of every process that runs
one op, compiled or not). Here the kernel is wrapped the same way only once ``torch._dynamo`` has
been imported by someone else; before that no ``torch.compile`` can be tracing, so there is nothing
to disable.
"""
import inspect
import sys

import torch

NAMESPACE = "askd_kernels"

try:  # what torch.library.custom_op uses: registering askd_kernels::<name> again replaces the old one
    from torch._library.custom_ops import get_library_allowing_overwrite as _fresh_library
except ImportError:  # pragma: no cover - older or newer torch without it
    _LIBRARIES = {}

    def _fresh_library(namespace, name):
        qualname = f"{namespace}::{name}"
        if qualname in _LIBRARIES:
            _LIBRARIES.pop(qualname)._destroy()
        _LIBRARIES[qualname] = lib = torch.library.Library(namespace, "FRAGMENT")
        return lib

try:
    from torch.library import infer_schema as _infer_schema
except ImportError:  # pragma: no cover - torch < 2.5
    from torch._library.infer_schema import infer_schema as _infer_schema


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _check_no_alias(qualname, args, result):
    """``custom_op``'s rule: no output may share memory with an input or with another output."""
    def storages(values):
        for tensor in _tensors(values):
            storage = tensor.untyped_storage()
            if storage.nbytes():  # empty tensors share no memory
                yield storage.data_ptr()

    taken = set(storages(args))
    for key in storages(result if isinstance(result, tuple) else (result,)):
        if key in taken:
            raise RuntimeError(f"{qualname}: an output aliases an input or another output; return a copy")
        taken.add(key)


def _kernel(qualname, fn):
    """``fn`` as the op's kernel: under ``torch._disable_dynamo`` once ``torch._dynamo`` is loaded,
    called directly before (see the module's docstring)."""
    disabled = None

    def kernel(*args, **kwargs):
        nonlocal disabled
        if disabled is not None:
            result = disabled(*args, **kwargs)
        elif "torch._dynamo" in sys.modules:
            disabled = torch._disable_dynamo(fn)
            result = disabled(*args, **kwargs)
        else:
            result = fn(*args, **kwargs)
        _check_no_alias(qualname, (*args, *kwargs.values()), result)
        return result

    kernel.__name__, kernel.__qualname__, kernel.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    kernel.__module__ = fn.__module__
    return kernel


def custom_op(name, *, fake, backward=None, setup_context=None):
    """Decorator: register ``fn`` as the custom op ``askd_kernels::<name>`` (no input is mutated),
    with ``fake`` as its fake implementation and, if given, ``backward``/``setup_context`` as its
    autograd formula (``backward`` may return fewer gradients than the op has inputs). Returns the
    op, ``torch.ops.askd_kernels.<name>.default``."""

    def register(fn):
        qualname = f"{NAMESPACE}::{name}"
        n_inputs = len(inspect.signature(fn).parameters)
        lib = _fresh_library(NAMESPACE, name)
        lib.define(name + _infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        lib.impl(name, _kernel(qualname, fn), "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, fake, lib=lib)
        if backward is not None:
            def padded_backward(ctx, *grads):
                leading = tuple(backward(ctx, *grads))
                return leading + (None,) * (n_inputs - len(leading))
        else:
            def padded_backward(ctx, *grads):
                raise RuntimeError(f"{qualname} has no autograd formula: it is only called inside a backward pass")
        torch.library.register_autograd(qualname, padded_backward, setup_context=setup_context, lib=lib)
        return getattr(getattr(torch.ops, NAMESPACE), name).default

    return register
