"""The autograd-aware custom ops that tie the three stages together.

``askd_kernels::askd_forward`` runs stage (a) then (b) and returns the per-sequence values κ_b·D_b
plus the per-token tensors the backward pass and ``return_stats`` need; its registered autograd
formula calls ``askd_kernels::askd_backward`` (stage (c)) with the upstream gradient of each
sequence. Both are ``torch.library`` custom ops with fake implementations, so
``torch.compile(fullgraph=True)`` traces through them. The reduction over sequences happens outside,
in ordinary differentiable torch ops, which is how upstream gradients other than 1 (``loss * 2``,
per-sequence weights for ``reduction="none"``) reach the kernel.

Backend choice, per call: ``ASKD_KERNELS_BACKEND=triton|torch`` forces one (``triton`` on CPU tensors
means the Triton interpreter, which needs ``TRITON_INTERPRET=1`` before import); otherwise CUDA
tensors use the Triton kernels and everything else the chunked PyTorch path.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from . import coefficients as _coefficients
from . import gradient as _gradient
from . import row_stats as _row_stats
from . import torch_impl

BACKEND_ENV = "ASKD_KERNELS_BACKEND"


class _TritonStages:
    row_stats = staticmethod(_row_stats.row_stats)
    coefficients = staticmethod(_coefficients.coefficients)
    student_gradient = staticmethod(_gradient.student_gradient)


def backend_for(device: torch.device):
    """The stage implementations to use for tensors on ``device`` (see module docstring)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {forced!r}")
    use_triton = forced == "triton" or (forced == "" and device.type == "cuda")
    return _TritonStages if use_triton else torch_impl


@torch.library.custom_op("askd_kernels::askd_forward", mutates_args=())
def askd_forward(
    student_logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], student_generated: Tensor, alpha: Tensor, kappa: Tensor,
    old_logprobs: Optional[Tensor], w_max: float, estimator: str, gamma: float,
    length_normalize: bool, temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stages (a)+(b). Returns ``value [B]`` and ``log_q, log_ratio, lam, coef, lse`` [B, T] (fp32).

    Expects validated inputs: contiguous [B, T] labels / log-prob tensors, fp32 ``alpha`` and
    ``kappa`` [B], int32 ``student_generated`` [B]. ``old_logprobs=None`` means importance weight 1.
    """
    stages = backend_for(student_logits.device)
    B, T = labels.shape
    log_q, log_ratio, lse = stages.row_stats(
        student_logits, labels, teacher_logits, teacher_logprobs,
        temperature=temperature, ignore_index=ignore_index)
    if old_logprobs is None:  # log q − log q = 0 ⇒ weight exp(0) = 1, whatever the cap
        old_logprobs, w_max = log_q, float("inf")
    lam, coef, value = stages.coefficients(
        log_q, log_ratio, old_logprobs.reshape(-1), labels, alpha, student_generated, kappa,
        estimator=estimator, gamma=gamma, w_max=w_max, length_normalize=length_normalize,
        ignore_index=ignore_index)
    shape = (B, T)
    return value, log_q.view(shape), log_ratio.view(shape), lam.view(shape), coef.view(shape), lse.view(shape)


@askd_forward.register_fake
def _(student_logits, labels, teacher_logits, teacher_logprobs, student_generated, alpha, kappa,
      old_logprobs, w_max, estimator, gamma, length_normalize, temperature, ignore_index):
    B, T = labels.shape
    per_token = [labels.new_empty((B, T), dtype=torch.float32) for _ in range(5)]
    return (labels.new_empty((B,), dtype=torch.float32), *per_token)


@torch.library.custom_op("askd_kernels::askd_backward", mutates_args=())
def askd_backward(student_logits: Tensor, labels: Tensor, coef: Tensor, lse: Tensor, grad_seq: Tensor,
                  temperature: float) -> Tensor:
    """Stage (c): the gradient w.r.t. the student logits for per-sequence upstream ``grad_seq``."""
    stages = backend_for(student_logits.device)
    return stages.student_gradient(student_logits, labels, coef.reshape(-1), lse.reshape(-1),
                                   grad_seq.float().contiguous(), temperature=temperature)


@askd_backward.register_fake
def _(student_logits, labels, coef, lse, grad_seq, temperature):
    return torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)


def _setup_context(ctx, inputs, output):
    student_logits, labels, *_, temperature, _ignore = inputs
    _value, _log_q, _log_ratio, _lam, coef, lse = output
    ctx.save_for_backward(student_logits, labels, coef, lse)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_value, *_unused_grads):
    student_logits, labels, coef, lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = askd_backward(student_logits, labels, coef, lse, grad_value, ctx.temperature)
    return (grad,) + (None,) * 13


askd_forward.register_autograd(_backward, setup_context=_setup_context)
