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
    row_stats: object             # (a) (log_q, log_ratio, lse) per token
    coefficients: object          # (b) (lam, coef, ret, value)
    student_gradient: object      # (c) the gradient w.r.t. the student logits
    full_vocab_row_stats: object  # (a) of rao_blackwell: + lse_t, fv_value, fv_sum
    full_vocab_gradient: object   # (c) of rao_blackwell


def stages(device: torch.device) -> Stages:
    """The three stage functions for tensors on ``device`` (looked up at call time)."""
    if backend.use_triton(device):
        return Stages(triton_row_stats.row_stats, triton_coefficients.coefficients, triton_gradient.student_gradient,
                      triton_row_stats.full_vocab_row_stats, triton_gradient.full_vocab_gradient)
    return Stages(cpu.row_stats, cpu.coefficients, cpu.student_gradient, cpu.full_vocab_row_stats,
                  cpu.full_vocab_gradient)


def leave_one_out_baseline(ret, labels, student_generated, kappa, groups, ignore_index):
    """Per-token baseline ``b[i, t]`` = mean of ``ret[j, t]`` over the other unclipped SGOs j of
    sequence i's group (``groups[i] == groups[j]``) whose position t is valid; 0 where there is none.
    It does not depend on sequence i's own sample, so subtracting it keeps the gradient unbiased.
    Plain torch, O(B²·T) through a [B, B] same-group matrix: no host sync."""
    B, T = labels.shape
    member = ((labels != ignore_index) & ((student_generated != 0) & (kappa != 0)).unsqueeze(1)).float()
    same = (groups.unsqueeze(0) == groups.unsqueeze(1)).float()
    own = ret.view(B, T) * member
    total, count = same @ own - own, same @ member - member
    return torch.where(count > 0, total / count.clamp(min=1.0), 0.0).reshape(-1)


def run_coefficients(stage: Stages, log_q, log_ratio, labels, student_generated, alpha, kappa, old_logprobs,
                     baseline_groups, w_max, estimator, gamma, length_normalize, ignore_index, fv_value=None):
    """Stage (b) on flat [B·T] ``log_q``/``log_ratio``; ``old_logprobs=None`` means importance
    weight 1 (log q − log q = 0, whatever the cap). With ``baseline_groups`` it runs twice: once for
    the SGO returns, then with their :func:`leave_one_out_baseline`. Returns ``(lam, coef, value)``."""
    if old_logprobs is None:
        old_logprobs, w_max = log_q, float("inf")

    def run(baseline=None):
        return stage.coefficients(
            log_q, log_ratio, old_logprobs.reshape(-1), labels, alpha, student_generated, kappa,
            estimator=estimator, gamma=gamma, w_max=w_max, length_normalize=length_normalize,
            ignore_index=ignore_index, fv_value=fv_value, baseline=baseline)

    lam, coef, ret, value = run()
    if baseline_groups is not None:
        lam, coef, _ret, value = run(leave_one_out_baseline(ret, labels, student_generated, kappa, baseline_groups,
                                                            ignore_index))
    return lam, coef, value


def _backward_fake(student_logits, *_args):
    return torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)


@custom_op("askd_backward", fake=_backward_fake)
def askd_backward(student_logits: Tensor, labels: Tensor, coef: Tensor, lse: Tensor, grad_seq: Tensor,
                  temperature: float) -> Tensor:
    """Stage (c): the gradient w.r.t. the student logits for per-sequence upstream ``grad_seq``."""
    return stages(student_logits.device).student_gradient(
        student_logits, labels, coef.reshape(-1), lse.reshape(-1, 2), grad_seq.float().contiguous(),
        temperature=temperature)


@custom_op("askd_full_vocab_backward", fake=_backward_fake)
def askd_full_vocab_backward(
    student_logits: Tensor, labels: Tensor, teacher_logits: Tensor, coef: Tensor, lse: Tensor, lse_t: Tensor,
    fv_sum: Tensor, alpha: Tensor, student_generated: Tensor, kappa: Tensor, grad_seq: Tensor,
    temperature: float, ignore_index: int,
) -> Tensor:
    """Stage (c) of ``rao_blackwell``: the full-vocabulary gradient plus the sampled-token future term."""
    return stages(student_logits.device).full_vocab_gradient(
        student_logits, labels, teacher_logits, coef.reshape(-1), lse.reshape(-1, 2), lse_t.reshape(-1, 2),
        fv_sum.reshape(-1), alpha, student_generated, kappa, grad_seq.float().contiguous(),
        temperature=temperature, ignore_index=ignore_index)


def forward_fake(labels, full_vocab=False):
    """Fake outputs of a forward op: ``value [B]``, ``log_q, log_ratio, lam, coef`` [B, T], the
    student's (max, log-sum) pairs ``lse`` [B, T, 2], then for ``rao_blackwell`` (``full_vocab``) the
    teacher's pairs ``lse_t`` [B, T, 2] and ``fv_sum`` [B, T] (else two empty tensors); all fp32."""
    def new(*shape):
        return labels.new_empty(shape, dtype=torch.float32)
    B, T = labels.shape
    extra = (new(B, T, 2), new(B, T)) if full_vocab else (new(0), new(0))
    return (new(B), new(B, T), new(B, T), new(B, T), new(B, T), new(B, T, 2), *extra)


def _forward_fake(student_logits, labels, teacher_logits, teacher_logprobs, student_generated, alpha, kappa,
                  old_logprobs, baseline_groups, w_max, estimator, *_options):
    return forward_fake(labels, estimator == "rao_blackwell")


def _setup_context(ctx, inputs, output):
    (student_logits, labels, teacher_logits, _tlp, student_generated, alpha, kappa, _old, _groups, _w_max,
     estimator, _gamma, _norm, temperature, ignore_index) = inputs
    _value, _log_q, _log_ratio, _lam, coef, lse, lse_t, fv_sum = output
    ctx.save_for_backward(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha,
                          student_generated, kappa)
    ctx.options = (estimator, temperature, ignore_index)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_value, *_unused_grads):
    if not ctx.needs_input_grad[0]:
        return (None,)
    student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha, sgo, kappa = ctx.saved_tensors
    estimator, temperature, ignore_index = ctx.options
    if estimator == "rao_blackwell":
        return (askd_full_vocab_backward(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha,
                                         sgo, kappa, grad_value, temperature, ignore_index),)
    return (askd_backward(student_logits, labels, coef, lse, grad_value, temperature),)


@custom_op("askd_forward", fake=_forward_fake, backward=_backward, setup_context=_setup_context)
def askd_forward(
    student_logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], student_generated: Tensor, alpha: Tensor, kappa: Tensor,
    old_logprobs: Optional[Tensor], baseline_groups: Optional[Tensor], w_max: float, estimator: str,
    gamma: float, length_normalize: bool, temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stages (a)+(b). Returns ``value [B]``, ``log_q, log_ratio, lam, coef`` [B, T], ``lse``
    [B, T, 2] (the student's (max, log-sum) pair per token), and for ``rao_blackwell`` the teacher's
    pairs ``lse_t`` [B, T, 2] and the full-vocabulary ``fv_sum`` [B, T] (else empty), all fp32.

    Expects validated inputs: contiguous [B, T] labels / log-prob tensors, fp32 ``alpha`` and
    ``kappa`` [B], int32 ``student_generated`` [B], int64 ``baseline_groups`` [B] or None.
    ``old_logprobs=None`` means importance weight 1.
    """
    stage = stages(student_logits.device)
    fv_value = None
    if estimator == "rao_blackwell":
        log_q, log_ratio, lse, lse_t, fv_value, fv_sum = stage.full_vocab_row_stats(
            student_logits, labels, teacher_logits, alpha, student_generated, kappa,
            temperature=temperature, ignore_index=ignore_index)
        extra = (lse_t.view(*labels.shape, 2), fv_sum.view(labels.shape))
    else:
        log_q, log_ratio, lse = stage.row_stats(
            student_logits, labels, teacher_logits, teacher_logprobs,
            temperature=temperature, ignore_index=ignore_index)
        extra = forward_fake(labels)[6:]
    lam, coef, value = run_coefficients(stage, log_q, log_ratio, labels, student_generated, alpha, kappa,
                                        old_logprobs, baseline_groups, w_max, estimator, gamma, length_normalize,
                                        ignore_index, fv_value=fv_value)
    per_token = (x.view(labels.shape) for x in (log_q, log_ratio, lam, coef))
    return (value, *per_token, lse.view(*labels.shape, 2), *extra)


# ---- packed rows: per-token stages on the tokens, the coefficient stage on the [S, L] layout ------------

class _Layout:
    """The index maps of :class:`askd_kernels._packed.Layout` as the packed op receives them."""

    def __init__(self, seq_of_token, slot, gather):
        self.seq_of_token, self.slot, self.gather = seq_of_token, slot, gather

    def to_sequences(self, per_token, fill):
        return torch.cat([per_token.reshape(-1), per_token.new_full((1,), fill)])[self.gather]

    def to_tokens(self, per_place):
        return per_place.reshape(-1)[self.slot]


def _packed_forward_fake(student_logits, labels, teacher_logits, teacher_logprobs, student_generated, alpha, kappa,
                         old_logprobs, baseline_groups, seq_of_token, slot, gather, w_max, estimator, *_options):
    value, *rest = forward_fake(labels, estimator == "rao_blackwell")
    return (value.new_empty(gather.shape[0]), *rest)


def _packed_setup_context(ctx, inputs, output):
    (student_logits, labels, teacher_logits, _tlp, student_generated, alpha, kappa, _old, _groups, seq_of_token,
     _slot, _gather, _w_max, estimator, _gamma, _norm, temperature, ignore_index) = inputs
    _value, _log_q, _log_ratio, _lam, coef, lse, lse_t, fv_sum = output
    ctx.save_for_backward(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha,
                          student_generated, kappa, seq_of_token)
    ctx.options = (estimator, temperature, ignore_index)
    ctx.mark_non_differentiable(*output[1:])


def _packed_backward(ctx, grad_value, *_unused_grads):
    if not ctx.needs_input_grad[0]:
        return (None,)
    student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha, sgo, kappa, seq = ctx.saved_tensors
    estimator, temperature, ignore_index = ctx.options
    # Every token is its own row: its sequence's upstream gradient, α, flag and κ, gathered per token.
    grad_token = grad_value.float()[seq]
    if estimator == "rao_blackwell":
        return (askd_full_vocab_backward(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha[seq],
                                         sgo[seq], kappa[seq], grad_token, temperature, ignore_index),)
    return (askd_backward(student_logits, labels, coef, lse, grad_token, temperature),)


@custom_op("askd_packed_forward", fake=_packed_forward_fake, backward=_packed_backward,
           setup_context=_packed_setup_context)
def askd_packed_forward(
    student_logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], student_generated: Tensor, alpha: Tensor, kappa: Tensor,
    old_logprobs: Optional[Tensor], baseline_groups: Optional[Tensor], seq_of_token: Tensor, slot: Tensor,
    gather: Tensor, w_max: float, estimator: str, gamma: float, length_normalize: bool, temperature: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stages (a)+(b) of packed rows: ``askd_forward`` with the N tokens as ``[N, 1, V]`` rows
    (``labels``, ``teacher_logprobs`` ``[N, 1]``, ``old_logprobs`` ``[N]``) and the per-sequence
    ``student_generated``, ``alpha``, ``kappa``, ``baseline_groups`` ``[S]``. Stage (a) runs per token
    (rao_blackwell's α, flag and κ gathered per token); its fp32 statistics are moved to the ``[S, L]``
    layout of ``gather`` (token index, N past the end) for stage (b) — exactly the inputs stage (b)
    gets from the padded ``[S, L]`` call — and its λ and coefficients moved back with ``slot``.
    Returns ``value [S]`` and the per-token outputs of ``askd_forward`` with ``[N, 1]`` in place of
    ``[B, T]``."""
    stage = stages(student_logits.device)
    maps = _Layout(seq_of_token, slot, gather)
    fv_value = None
    if estimator == "rao_blackwell":
        log_q, log_ratio, lse, lse_t, fv_value, fv_sum = stage.full_vocab_row_stats(
            student_logits, labels, teacher_logits, alpha[seq_of_token], student_generated[seq_of_token],
            kappa[seq_of_token], temperature=temperature, ignore_index=ignore_index)
        extra = (lse_t.view(*labels.shape, 2), fv_sum.view(labels.shape))
        fv_value = maps.to_sequences(fv_value, 0.0).reshape(-1)
    else:
        log_q, log_ratio, lse = stage.row_stats(
            student_logits, labels, teacher_logits, teacher_logprobs,
            temperature=temperature, ignore_index=ignore_index)
        extra = forward_fake(labels)[6:]
    # Ignored positions of the padded call hold ignore_index and zero statistics: so do the pads here.
    seq_labels = maps.to_sequences(labels, ignore_index)
    seq_log_q = maps.to_sequences(log_q, 0.0).reshape(-1)
    seq_old = None if old_logprobs is None else maps.to_sequences(old_logprobs, 0.0)
    lam, coef, value = run_coefficients(stage, seq_log_q, maps.to_sequences(log_ratio, 0.0).reshape(-1), seq_labels,
                                        student_generated, alpha, kappa, seq_old, baseline_groups, w_max, estimator,
                                        gamma, length_normalize, ignore_index, fv_value=fv_value)
    per_token = (x.view(labels.shape) for x in (log_q, log_ratio, maps.to_tokens(lam), maps.to_tokens(coef)))
    return (value, *per_token, lse.view(*labels.shape, 2), *extra)
