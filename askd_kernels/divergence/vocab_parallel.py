"""``divergence_loss`` with the vocabulary sharded over a process group (``process_group=``).

Each rank holds a contiguous slice of the vocabulary columns of both logits (rank r: columns
``[start_r, start_r + width_r)`` in rank order, :mod:`askd_kernels.distributed`; the student's and
the teacher's shards of a rank have the same width). Every per-token quantity of the divergences
is a function of two row statistics and of per-column terms (``docs/contract.md`` §6,
:mod:`.triton`):

* the rows' (max, log-sum) pairs, combined from the shards' pairs
  (:func:`askd_kernels.distributed.combine_pairs`), after which each column's log q_v / log p_v is
  local to the shard holding it;
* the value Σ_v f-terms and S = Σ_v a_v (the softmax Jacobian's row sum), sums over the columns:
  the sums of the shards' partial sums computed with the global pairs.

So the forward is

1. each rank: the first pass of the forward kernel only (``pairs``): its shard's two pairs;
2. **collective 1** — one ``all_gather`` of those 4 fp32 numbers per token, combined on every rank
   into the rows' global pairs;
3. each rank: the second pass only, with the global pairs (``forward_given_pairs``): the shard's
   partial value and S;
4. **collective 2** — one ``all_reduce`` (sum) of [value, S], 2 fp32 numbers per token; then tvd's
   clamp of ½ Σ|p − q| to 1.

Two collectives per forward: one would do only if the per-shard f-terms could be summed without
the global normaliser, and they cannot — log q_v = (z_v − M)/τ − S_z needs the whole row, and the
mixtures' log m = log(w_q q + w_p p) mixes the two normalisers inside the logarithm.

The backward needs no collective: each rank writes its columns of the gradient
(a_v − q_v·S)/τ · g from the global pairs and the global S with the unchanged backward op
(:func:`askd_kernels.divergence.ops.divergence_backward`). Inactive rows (ignored positions,
clipped sequences) read no column on any rank; they still occupy their (zero) slot in the two
collectives' buffers.

A ``ProcessGroup`` cannot be an argument of a ``torch.library`` custom op, so the autograd glue is a
``torch.autograd.Function`` (eager mode; ``torch.compile`` graph-breaks around it).
"""
import torch
from torch import Tensor

from .. import distributed
from .ops import _impl, divergence_backward


class _ShardedDivergence(torch.autograd.Function):
    """Per-token values ``[B, T]`` fp32 (the same on every rank) of the shards ``student_logits`` /
    ``teacher_logits`` ``[B, T, width]``; the backward gives the shard's columns of the gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kappa, log_w, kind, temperature, ignore_index, group):
        impl = _impl(student_logits.device)
        local_s, local_t = impl.pairs(student_logits, teacher_logits, labels, kappa, temperature=temperature,
                                      ignore_index=ignore_index)
        gathered = distributed.gather_rows(torch.cat([local_s, local_t], 1), group)  # [P, B·T, 4]
        inv_tau = 1.0 / temperature
        lse_s = distributed.combine_pairs(gathered[..., :2], inv_tau)
        lse_t = distributed.combine_pairs(gathered[..., 2:], inv_tau)
        partial = impl.forward_given_pairs(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t,
                                           kind=kind, temperature=temperature, ignore_index=ignore_index)
        value, row_sum = distributed.all_reduce_sum(torch.stack(partial), group).unbind(0)
        if kind == "tvd":
            value = value.clamp(max=1.0)  # as on one device: ½ Σ|p − q| ≤ 1; clamp keeps NaN
        ctx.save_for_backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum)
        ctx.options = (kind, temperature, ignore_index)
        return value.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_value):
        grad = None
        if ctx.needs_input_grad[0]:
            grad = divergence_backward(*ctx.saved_tensors, grad_value, *ctx.options)
        return grad, None, None, None, None, None, None, None, None


def sharded_forward(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kappa: Tensor, log_w: Tensor,
                    kind: str, temperature: float, ignore_index: int, group) -> Tensor:
    """The per-token values ``[B, T]`` (fp32, replicated) of a vocabulary-sharded call, differentiable
    w.r.t. ``student_logits`` (this rank's shard). Inputs as for
    :func:`askd_kernels.divergence.ops.divergence_forward` (validated; contiguous int64 labels),
    the shards of equal width, ``group`` a checked process group."""
    return _ShardedDivergence.apply(student_logits, teacher_logits, labels, kappa, log_w, kind, temperature,
                                    ignore_index, group)
