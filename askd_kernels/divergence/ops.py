"""The divergence family's custom ops: ``askd_kernels::divergence_forward`` and
``askd_kernels::divergence_backward``.

The forward returns the per-token values (0 at ignored positions and in clipped sequences) plus the
per-token fp32 row statistics its backward needs; its registered autograd formula calls the backward
op, the gradient w.r.t. the student logits only, for per-token upstream gradients. Both have fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them. The reduction happens
outside, in ordinary differentiable torch ops (:func:`askd_kernels._checks.apply_reduction`).

Each call runs the Triton kernels of :mod:`.triton` or the chunked PyTorch path of :mod:`.cpu`, as
:func:`askd_kernels.backend.use_triton` decides.
"""
import torch
from torch import Tensor

from .. import backend
from .._custom_op import custom_op
from . import cpu, triton


def _impl(device: torch.device):
    return triton if backend.use_triton(device) else cpu


def _backward_fake(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value,
                   kind, temperature, ignore_index):
    return torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)


@custom_op("divergence_backward", fake=_backward_fake)
def divergence_backward(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kappa: Tensor, log_w: Tensor,
    lse_s: Tensor, lse_t: Tensor, row_sum: Tensor, grad_value: Tensor,
    kind: str, temperature: float, ignore_index: int,
) -> Tensor:
    """The gradient w.r.t. the student logits for the per-token upstream gradient ``grad_value``."""
    def flat(x, *shape):
        return x.float().contiguous().reshape(-1, *shape)

    return _impl(student_logits.device).backward(
        student_logits, teacher_logits, labels, kappa, log_w, flat(lse_s, 2), flat(lse_t, 2), flat(row_sum),
        flat(grad_value), kind=kind, temperature=temperature, ignore_index=ignore_index)


def _forward_fake(student_logits, teacher_logits, labels, kappa, log_w, kind, temperature, ignore_index):
    per_token = [labels.new_empty(shape, dtype=torch.float32) for shape in (labels.shape, labels.shape)]
    pairs = [labels.new_empty((*labels.shape, 2), dtype=torch.float32) for _ in range(2)]
    return (*per_token, *pairs)


def _setup_context(ctx, inputs, output):
    student_logits, teacher_logits, labels, kappa, log_w, kind, temperature, ignore_index = inputs
    _value, row_sum, lse_s, lse_t = output
    ctx.save_for_backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum)
    ctx.options = (kind, temperature, ignore_index)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_value, *_unused_grads):
    if not ctx.needs_input_grad[0]:
        return (None,)
    return (divergence_backward(*ctx.saved_tensors, grad_value, *ctx.options),)


@custom_op("divergence_forward", fake=_forward_fake, backward=_backward, setup_context=_setup_context)
def divergence_forward(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kappa: Tensor, log_w: Tensor,
    kind: str, temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``value`` and the backward's ``row_sum`` (fp32 [B, T]) and (max, log-sum) pairs
    ``lse_s, lse_t`` (fp32 [B, T, 2]).

    Expects validated inputs: contiguous [B, T] labels, fp32 ``kappa`` [B] (0 = clipped) and
    ``log_w`` [B, 2] (log weights of q and p in the mixture); ``kind`` a key of
    :data:`askd_kernels.divergence.triton.KINDS` (jsd only for 0 < β < 1).
    """
    B, T = labels.shape
    outputs = _impl(student_logits.device).forward(
        student_logits, teacher_logits, labels, kappa, log_w,
        kind=kind, temperature=temperature, ignore_index=ignore_index)
    value, row_sum, lse_s, lse_t = outputs
    return value.view(B, T), row_sum.view(B, T), lse_s.view(B, T, 2), lse_t.view(B, T, 2)
