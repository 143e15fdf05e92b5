"""The public op of the divergence family: ``divergence_loss`` (``docs/contract.md`` §6)."""
import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _checks as check
from .. import _packed, distributed
from .ops import divergence_forward
from .vocab_parallel import sharded_forward
from .triton import KINDS


def _log_weights(kind, alpha, beta, batch, device):
    """[B, 2] fp32 (log w_q, log w_p) of the mixture m = w_q·q + w_p·p; −inf at a zero weight."""
    if kind in ("skl", "srkl"):
        alpha = check.per_sequence_alpha(alpha, batch, device)
        return torch.stack([torch.log(alpha), torch.log1p(-alpha)], dim=1)
    pair = (math.log1p(-beta), math.log(beta)) if kind == "jsd" else (0.0, 0.0)  # jsd: M = β p + (1−β) q
    return torch.tensor(pair, dtype=torch.float32, device=device).expand(batch, 2).contiguous()


def _packed_sum(values, layout):
    """Σ of the per-token values summed as the padded ``[S, L]`` call sums them (its value tensor, 0
    at the pads): the same float additions in the same order, so the reduced loss is bit-identical."""
    padded = torch.zeros(layout.num_seqs * layout.max_len, dtype=values.dtype, device=values.device)
    return padded.index_put((layout.slot,), values.reshape(-1)).sum()


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
    cu_seqlens: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    process_group=None,
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
            gradient (in its own dtype). Flat ``[N, V_s]`` (with ``[N, V_t]`` and ``[N]`` labels, as
            Liger and TRL pass them) is one row of N tokens.
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
        cu_seqlens, position_ids, max_seqlen: packed rows, as for :func:`askd_kernels.askd_loss`:
            the S sequences are then what ``alpha`` and ``clip`` (``[S]``) index. Every value is per
            token, so the boundaries matter only for those two; ``"none"`` keeps the tokens' shape.
            The result equals, bit for bit, that of the padded ``[S, L, V]`` call (value, reduced
            loss and gradient).
        process_group: a ``torch.distributed.ProcessGroup`` for vocabulary parallelism (``TypeError``
            for anything else but None). Each rank then passes its contiguous shard of the columns of
            both logits (rank r holds columns [start_r, start_r + width_r) in rank order; widths may
            differ between ranks, but on a rank the student's and the teacher's shards have the same
            width) and the same labels, alpha, clip and options as every other rank. Every rank gets
            the same loss, and the backward gives each rank exactly its columns of the unsharded
            gradient. Two collectives per forward (an ``all_gather`` of 4 and an ``all_reduce`` of 2
            fp32 numbers per token), none in the backward (:mod:`askd_kernels.divergence.vocab_parallel`).
            Works with every layout above (``[B, T, V]``, flat, packed). The inputs are checked on
            each rank; a rank whose arguments are rejected raises before any collective, and the
            others then wait in theirs until the group's timeout.

    Returns the fp32 loss; its backward is the exact derivative of the value w.r.t. the student
    logits. The forward keeps O(B·T) memory (nothing of size tokens × vocab); the backward allocates
    only the gradient.
    """
    # ---- validation: everything before any kernel runs ----------------------------------------
    group = distributed.vocab_group(process_group)
    check.not_swapped(labels, teacher_logits)
    _packed.token_shapes("student_logits", student_logits, "labels", labels, flat_ok=True)
    tokens = tuple(labels.shape)
    device = student_logits.device
    check.teacher_logits(teacher_logits, tokens)
    if group is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"with process_group, teacher_logits must be this rank's shard of the same vocabulary "
                         f"columns as student_logits: width {teacher_logits.shape[-1]} != "
                         f"{student_logits.shape[-1]}")
    layout = None
    if cu_seqlens is not None or position_ids is not None:
        check.same_device(device, labels=labels)
        layout = _packed.layout(labels, device, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                max_seqlen=max_seqlen)
        B = layout.num_seqs
    elif max_seqlen is not None:
        raise ValueError("max_seqlen goes with cu_seqlens (or position_ids)")
    else:
        B = labels.shape[0] if labels.dim() == 2 else 1
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
    kappa = kappa.float()

    def values(student, teacher, rows, kappa, log_w):  # per-token [B, T] values, one device or sharded
        if group is None:
            return divergence_forward(student, teacher, rows, kappa, log_w, kind, temperature, ignore_index)[0]
        return sharded_forward(student, teacher, rows, kappa, log_w, kind, temperature, ignore_index, group)

    if layout is not None:
        # Every token its own row [N, 1, V]; per-sequence κ and weights gathered per token.
        n = labels.numel()
        value = values(
            _packed.per_token_view(student_logits, n), _packed.per_token_view(teacher_logits.detach(), n),
            labels.view(n, 1), kappa[layout.seq_of_token].contiguous(), log_w[layout.seq_of_token].contiguous())
        value = value.view(tokens)
        if reduction == "none":
            return value
        total = _packed_sum(value, layout)
        return total if reduction == "sum" else check.apply_reduction(total.view(1), labels, ignore_index,
                                                                      "mean", num_items)
    if labels.dim() == 1:  # flat [N, V]: one row of N tokens
        value = values(student_logits.unsqueeze(0), teacher_logits.detach().unsqueeze(0), labels.view(1, -1), kappa,
                       log_w)
        return check.apply_reduction(value.view(tokens), labels, ignore_index, reduction, num_items)
    value = values(student_logits, teacher_logits.detach(), labels, kappa, log_w)
    return check.apply_reduction(value, labels, ignore_index, reduction, num_items)
