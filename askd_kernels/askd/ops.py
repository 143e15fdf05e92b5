"""The ASKD family's custom ops over the three stages: ``askd_kernels::askd_forward`` and
``askd_kernels::askd_backward``.

``askd_forward`` runs stage (a) then (b) and returns the per-sequence values κ_b·D_b plus the
per-token tensors the backward pass and ``return_stats`` need; its registered autograd formula calls
``askd_backward`` (stage (c)) with the upstream gradient of each sequence. Both have fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them. The reduction over
sequences happens outside, in ordinary differentiable torch ops, which is how upstream gradients
other than 1 (``loss * 2``, per-sequence weights for ``reduction="none"``) reach the kernel.

:func:`stages` picks, per call, the Triton launchers (``triton_row_stats``, ``triton_coefficients``,
``triton_gradient``) or the chunked PyTorch path (:mod:`.cpu`), as
:func:`askd_kernels.backend.use_triton` decides; :mod:`.fused_linear` uses the same stages.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backend
from .._custom_op import custom_op
from . import cpu, triton_coefficients, triton_gradient, triton_row_stats


class Stages(NamedTuple):
    row_stats: object         # (a) (log_q, log_ratio, lse) per token
    coefficients: object      # (b) (lam, coef, value)
    student_gradient: object  # (c) the gradient w.r.t. the student logits


def stages(device: torch.device) -> Stages:
    """The three stage functions for tensors on ``device`` (looked up at call time)."""
    if backend.use_triton(device):
        return Stages(triton_row_stats.row_stats, triton_coefficients.coefficients,
                      triton_gradient.student_gradient)
    return Stages(cpu.row_stats, cpu.coefficients, cpu.student_gradient)


def run_coefficients(stage: Stages, log_q, log_ratio, labels, student_generated, alpha, kappa, old_logprobs,
                     w_max, estimator, gamma, length_normalize, ignore_index):
    """Stage (b) on flat [B·T] ``log_q``/``log_ratio``; ``old_logprobs=None`` means importance
    weight 1 (log q − log q = 0, whatever the cap). Returns ``(lam, coef, value)``."""
    if old_logprobs is None:
        old_logprobs, w_max = log_q, float("inf")
    return stage.coefficients(
        log_q, log_ratio, old_logprobs.reshape(-1), labels, alpha, student_generated, kappa,
        estimator=estimator, gamma=gamma, w_max=w_max, length_normalize=length_normalize,
        ignore_index=ignore_index)


def _backward_fake(student_logits, labels, coef, lse, grad_seq, temperature):
    return torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)


@custom_op("askd_backward", fake=_backward_fake)
def askd_backward(student_logits: Tensor, labels: Tensor, coef: Tensor, lse: Tensor, grad_seq: Tensor,
                  temperature: float) -> Tensor:
    """Stage (c): the gradient w.r.t. the student logits for per-sequence upstream ``grad_seq``."""
    return stages(student_logits.device).student_gradient(
        student_logits, labels, coef.reshape(-1), lse.reshape(-1, 2), grad_seq.float().contiguous(),
        temperature=temperature)


def forward_fake(labels):
    """Fake outputs of a forward op: ``value [B]``, ``log_q, log_ratio, lam, coef`` [B, T] and the
    (max, log-sum) pairs ``lse`` [B, T, 2], all fp32."""
    per_token = [labels.new_empty(labels.shape, dtype=torch.float32) for _ in range(4)]
    lse = labels.new_empty((*labels.shape, 2), dtype=torch.float32)
    return (labels.new_empty(labels.shape[:1], dtype=torch.float32), *per_token, lse)


def _forward_fake(student_logits, labels, *_options):
    return forward_fake(labels)


def _setup_context(ctx, inputs, output):
    student_logits, labels, *_, temperature, _ignore = inputs
    _value, _log_q, _log_ratio, _lam, coef, lse = output
    ctx.save_for_backward(student_logits, labels, coef, lse)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_value, *_unused_grads):
    if not ctx.needs_input_grad[0]:
        return (None,)
    student_logits, labels, coef, lse = ctx.saved_tensors
    return (askd_backward(student_logits, labels, coef, lse, grad_value, ctx.temperature),)


@custom_op("askd_forward", fake=_forward_fake, backward=_backward, setup_context=_setup_context)
def askd_forward(
    student_logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], student_generated: Tensor, alpha: Tensor, kappa: Tensor,
    old_logprobs: Optional[Tensor], w_max: float, estimator: str, gamma: float,
    length_normalize: bool, temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stages (a)+(b). Returns ``value [B]``, ``log_q, log_ratio, lam, coef`` [B, T] and ``lse``
    [B, T, 2] (the student's (max, log-sum) pair per token), all fp32.

    Expects validated inputs: contiguous [B, T] labels / log-prob tensors, fp32 ``alpha`` and
    ``kappa`` [B], int32 ``student_generated`` [B]. ``old_logprobs=None`` means importance weight 1.
    """
    stage = stages(student_logits.device)
    log_q, log_ratio, lse = stage.row_stats(
        student_logits, labels, teacher_logits, teacher_logprobs,
        temperature=temperature, ignore_index=ignore_index)
    lam, coef, value = run_coefficients(stage, log_q, log_ratio, labels, student_generated, alpha, kappa,
                                        old_logprobs, w_max, estimator, gamma, length_normalize, ignore_index)
    return (value, *(x.view(labels.shape) for x in (log_q, log_ratio, lam, coef)), lse.view(*labels.shape, 2))
