"""The full-vocabulary divergence family (SPEC §6): ``divergence_loss`` and its custom ops.

``askd_kernels::divergence_forward`` returns the per-token values (0 at ignored positions and in
clipped sequences) plus the per-token fp32 row statistics its backward needs; its registered autograd
formula calls ``askd_kernels::divergence_backward``, the gradient w.r.t. the student logits only, for
per-token upstream gradients. Both are ``torch.library`` custom ops with fake implementations, so
``torch.compile(fullgraph=True)`` traces through them. The reduction happens outside, in ordinary
differentiable torch ops, as in :mod:`askd_kernels.ops`.

The backend follows the core op's choice (:func:`askd_kernels.ops.backend_for`): the Triton kernels of
:mod:`askd_kernels.divergences` or the chunked PyTorch path of :mod:`askd_kernels.divergences_torch`.
"""
import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _checks as check
from . import divergences, divergences_torch, torch_impl
from .divergences import KINDS
from .ops import backend_for


def _impl_for(device: torch.device):
    return divergences_torch if backend_for(device) is torch_impl else divergences


@torch.library.custom_op("askd_kernels::divergence_forward", mutates_args=())
def divergence_forward(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kappa: Tensor, log_w: Tensor,
    kind: str, temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``value`` and the backward's ``row_sum, lse_s, lse_t``, each fp32 [B, T].

    Expects validated inputs: contiguous [B, T] labels, fp32 ``kappa`` [B] (0 = clipped) and
    ``log_w`` [B, 2] (log weights of q and p in the mixture); ``kind`` a key of ``KINDS`` (jsd only
    for 0 < β < 1).
    """
    B, T = labels.shape
    outputs = _impl_for(student_logits.device).forward(
        student_logits, teacher_logits, labels, kappa, log_w,
        kind=kind, temperature=temperature, ignore_index=ignore_index)
    return tuple(x.view(B, T) for x in outputs)


@divergence_forward.register_fake
def _(student_logits, teacher_logits, labels, kappa, log_w, kind, temperature, ignore_index):
    return tuple(labels.new_empty(labels.shape, dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("askd_kernels::divergence_backward", mutates_args=())
def divergence_backward(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kappa: Tensor, log_w: Tensor,
    lse_s: Tensor, lse_t: Tensor, row_sum: Tensor, grad_value: Tensor,
    kind: str, temperature: float, ignore_index: int,
) -> Tensor:
    """The gradient w.r.t. the student logits for the per-token upstream gradient ``grad_value``."""
    flat = lambda x: x.float().contiguous().reshape(-1)  # noqa: E731
    return _impl_for(student_logits.device).backward(
        student_logits, teacher_logits, labels, kappa, log_w, flat(lse_s), flat(lse_t), flat(row_sum),
        flat(grad_value), kind=kind, temperature=temperature, ignore_index=ignore_index)


@divergence_backward.register_fake
def _(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value, kind,
      temperature, ignore_index):
    return torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)


def _setup_context(ctx, inputs, output):
    student_logits, teacher_logits, labels, kappa, log_w, kind, temperature, ignore_index = inputs
    _value, row_sum, lse_s, lse_t = output
    ctx.save_for_backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum)
    ctx.options = (kind, temperature, ignore_index)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_value, *_unused_grads):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = divergence_backward(*ctx.saved_tensors, grad_value, *ctx.options)
    return (grad,) + (None,) * 7


divergence_forward.register_autograd(_backward, setup_context=_setup_context)


def _log_weights(kind, alpha, beta, batch, device):
    """[B, 2] fp32 (log w_q, log w_p) of the mixture m = w_q·q + w_p·p; −inf at a zero weight."""
    if kind in ("skl", "srkl"):
        alpha = check.per_sequence_alpha(alpha, batch, device)
        return torch.stack([torch.log(alpha), torch.log1p(-alpha)], dim=1)
    pair = (math.log1p(-beta), math.log(beta)) if kind == "jsd" else (0.0, 0.0)  # jsd: M = β p + (1−β) q
    return torch.tensor(pair, dtype=torch.float32, device=device).expand(batch, 2).contiguous()


def divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kind: str,
    alpha: Optional[Union[Tensor, float]] = None,
    beta: float = 0.5,
    clip: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Optional[Union[int, float, Tensor]] = None,
) -> Tensor:
    """A full-vocabulary divergence between the student q = softmax(z/τ) and the teacher p = softmax(w/τ).

    Per valid position, over the shared vocabulary [0, min(V_s, V_t)) with both distributions
    renormalised there (student columns beyond get zero gradient), and m = α q + (1−α) p:

    * ``"fkl"``  Σ p log(p/q)               * ``"rkl"``  Σ q log(q/p)
    * ``"skl"``  Σ p log(p/m)  (α = 1: fkl; α = 0: 0; DistiLLM's skew λ is 1 − α)
    * ``"srkl"`` Σ q log(q/m)  (α = 0: rkl; α = 1: 0; differentiated through q inside m too)
    * ``"jsd"``  β KL(p‖M) + (1−β) KL(q‖M), M = β p + (1−β) q. Following TRL / Liger, β = 0 is
      defined as ``fkl`` and β = 1 as ``rkl`` (the formula itself vanishes at both ends).
    * ``"tvd"``  ½ Σ |p − q|  (subgradient 0 at ties)

    Args:
        student_logits: ``[B, T, V_s]`` fp32/bf16/fp16, any strides; the only input that receives a
            gradient (in its own dtype).
        teacher_logits: ``[B, T, V_t]`` fp32/bf16/fp16, any strides; detached.
        labels: ``[B, T]`` integer; only compared with ``ignore_index`` (ignored positions take no
            part: value 0, gradient 0, not counted by ``"mean"``). The label values are not read.
        kind: one of ``"fkl", "rkl", "skl", "srkl", "jsd", "tvd"``.
        alpha: the **student's** weight in m, ``[B]`` or a float in [0, 1]; required for ``skl`` /
            ``srkl`` (``ValueError`` if missing), ignored by the other kinds. Checked for floats and
            CPU tensors; on CUDA a value outside [0, 1] gives NaN for that sequence.
        beta: the teacher's weight in the jsd mixture M, a float in [0, 1] (checked for every kind).
        clip: ``[B]`` bool; True zeroes the whole sequence (value and gradient), whatever its source.
            Clipped sequences still count in the ``"mean"`` denominator.
        temperature: τ > 0, applied to both logits.
        reduction: ``"mean"`` (sum over tokens / N), ``"sum"``, or ``"none"`` (the per-token [B, T]
            values, 0 at ignored positions and in clipped sequences).
        num_items: N for ``"mean"``; default the number of valid labels (a device tensor, no sync).
            An all-ignored batch gives 0.

    Returns the fp32 loss; its backward is the exact derivative of the value w.r.t. the student
    logits. The forward keeps O(B·T) memory (nothing of size tokens × vocab); the backward allocates
    only the gradient.
    """
    # ---- validation: everything before any kernel runs ----------------------------------------
    check.tensor("student_logits", student_logits, ndim=3, floating=check.LOGIT_DTYPES)
    B, T, V_s = student_logits.shape
    if B == 0 or T == 0 or V_s == 0:
        raise ValueError(f"student_logits must be non-empty, got shape {(B, T, V_s)}")
    device = student_logits.device
    check.tensor("teacher_logits", teacher_logits, ndim=3, floating=check.LOGIT_DTYPES)
    if teacher_logits.shape[:2] != (B, T) or teacher_logits.shape[2] == 0:
        raise ValueError(f"teacher_logits must have shape [B={B}, T={T}, V_t > 0], "
                         f"got {tuple(teacher_logits.shape)}")
    check.tensor("labels", labels, shape=(B, T), integer=True)
    check.choice("kind", kind, tuple(KINDS))
    if kind in ("skl", "srkl") and alpha is None:
        raise ValueError(f"alpha is required for kind={kind!r} (the student's weight in the mixture)")
    beta = check.number("beta", beta, low=0.0, high=1.0)
    if clip is not None:
        check.tensor("clip", clip, ndim=1, shape=(B,), boolean=True)
    check.same_device(device, teacher_logits=teacher_logits, labels=labels, clip=clip)
    temperature = check.temperature(temperature)
    check.integer("ignore_index", ignore_index)
    num_items = check.reduction_and_num_items(reduction, num_items, device)
    if kind == "jsd" and beta in (0.0, 1.0):  # TRL / Liger convention: the endpoints are fkl / rkl
        kind = "fkl" if beta == 0.0 else "rkl"
    log_w = _log_weights(kind, alpha, beta, B, device)

    kappa = torch.where(clip, 0.0, 1.0) if clip is not None else torch.ones(B, device=device)
    labels = labels.contiguous()
    value, _row_sum, _lse_s, _lse_t = divergence_forward(
        student_logits, teacher_logits.detach(), labels, kappa.float(), log_w, kind, temperature, ignore_index)
    return check.apply_reduction(value, labels, ignore_index, reduction, num_items)
