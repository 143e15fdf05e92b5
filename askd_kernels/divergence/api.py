"""The public op of the divergence family: ``divergence_loss`` (``docs/contract.md`` §6)."""
import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _checks as check
from .ops import divergence_forward
from .triton import KINDS


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
        labels: ``[B, T]``, any integer dtype; only compared with ``ignore_index`` (ignored
            positions take no part: value 0, gradient 0, not counted by ``"mean"``). The label
            values are not read otherwise.
        kind: one of ``"fkl", "rkl", "skl", "srkl", "jsd", "tvd"``.
        alpha: the **student's** weight in m, ``[B]`` or a float in [0, 1]; required for ``skl`` /
            ``srkl`` (``ValueError`` if missing), ignored by the other kinds. Checked for floats and
            CPU tensors; on CUDA a value outside [0, 1] gives NaN for that sequence.
        beta: the teacher's weight in the jsd mixture M, a float in [0, 1] (checked for every kind).
        clip: ``[B]`` bool; True zeroes the whole sequence (value and gradient), whatever its source.
            Clipped sequences still count in the ``"mean"`` denominator.
        temperature: τ > 0, applied to both logits.
        ignore_index: a python int in int64's range (it need not fit the labels' dtype).
        reduction: ``"mean"`` (sum over tokens / N), ``"sum"``, or ``"none"`` (the per-token [B, T]
            values, 0 at ignored positions and in clipped sequences).
        num_items: N for ``"mean"``, divided by exactly as given: a finite number > 0 or a
            one-element tensor (checked > 0 on CPU; on CUDA or under ``torch.compile`` a tensor
            ≤ 0 gives ±inf/NaN, it is never clamped). Default: the number of valid labels (a device
            tensor, no sync); an all-ignored batch then gives 0.

    Returns the fp32 loss; its backward is the exact derivative of the value w.r.t. the student
    logits. The forward keeps O(B·T) memory (nothing of size tokens × vocab); the backward allocates
    only the gradient.
    """
    # ---- validation: everything before any kernel runs ----------------------------------------
    B, T, V_s = check.sequence_tensor("student_logits", student_logits)
    device = student_logits.device
    check.teacher_logits(teacher_logits, B, T)
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
    labels = check.index_labels(labels)  # any integer dtype → contiguous int64 (exact ignore_index test)
    value, _row_sum, _lse_s, _lse_t = divergence_forward(
        student_logits, teacher_logits.detach(), labels, kappa.float(), log_w, kind, temperature, ignore_index)
    return check.apply_reduction(value, labels, ignore_index, reduction, num_items)
