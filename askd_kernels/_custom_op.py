"""One helper for the ``torch.library`` custom ops of every family.

Each public op is a custom op (so ``torch.compile(fullgraph=True)`` traces through it without looking
inside) with a fake implementation (shapes only) and, for the forward ops, a registered autograd
formula. A backward formula must return one entry per input of the op; the inputs after the
differentiable tensors are options (flags, floats, strings) whose gradient is ``None``. The helper
takes a backward that returns the gradients of the *leading* inputs only and pads the rest with
``None``, counting the inputs from the op's signature, so nobody counts them by hand.
"""
import inspect

import torch


def custom_op(name, *, fake, backward=None, setup_context=None):
    """Decorator: register ``fn`` as the custom op ``askd_kernels::<name>`` (no input is mutated),
    with ``fake`` as its fake implementation and, if given, ``backward``/``setup_context`` as its
    autograd formula (``backward`` may return fewer gradients than the op has inputs)."""

    def register(fn):
        n_inputs = len(inspect.signature(fn).parameters)
        op = torch.library.custom_op(f"askd_kernels::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        if backward is not None:
            def padded_backward(ctx, *grads):
                leading = tuple(backward(ctx, *grads))
                return leading + (None,) * (n_inputs - len(leading))

            op.register_autograd(padded_backward, setup_context=setup_context)
        return op

    return register
