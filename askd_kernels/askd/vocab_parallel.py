"""Stage (a) of the ASKD family with the vocabulary sharded over a process group.

Each rank holds a contiguous slice of the vocabulary columns of the student's (and the teacher's)
logits (:mod:`askd_kernels.distributed`: rank r holds ``[start_r, start_r + width_r)``). The label
statistics of stage (a) need three things per token from the whole row: the (max, log-sum) pair of
each model and the label's log-probability. Every rank computes them on its own shard with the
unchanged stage-(a) function of its backend, then one ``all_gather`` of a few fp32 numbers per token
gives every rank the same global values:

    M = max_r m_r,   S = log Σ_r exp(s_r + (m_r − M)/τ)                   (the row's pair)
    log q_t = log q_t^(r*) + (m_r* − M)/τ + (s_r* − S)                       (r* holds the label)

where ``log q^(r)`` is the label's log-probability within shard r (softmax over the shard's columns
only). The shift is a difference of nearby numbers, not ``z_y/τ − LSE`` rebuilt from a large
log-sum-exp, so it keeps the single-device accuracy. Everything after stage (a) — the coefficient
scan (stage b) — runs identically on every rank on these replicated per-token vectors, and stage (c)
writes each shard's columns of the gradient from the global pair with the shard's own labels
(:func:`askd_kernels.distributed.local_labels`): no collective in the backward.

Per-shard statistics come from running stage (a) with each model's shard in the student's place and
zero teacher log-probs (the teacher-log-probs variant, one pass over the row): its ``log_q`` is the
label's in-shard log-probability (NaN where another shard holds the label — masked out here) and its
``lse`` the shard's pair.

:class:`VocabParallelASKD` is ``askd_loss`` on such shards (``askd_loss(..., process_group=...)``):
stage (a) as above, the coefficient stage (b) on the replicated vectors, and a backward that is
stage (c) on the shard alone. ``rao_blackwell`` adds one ``all_reduce`` of two fp32 numbers per
token: the full-vocabulary value and S = Σ_v a_v, partial sums over each shard's columns under the
global pairs (:func:`full_vocab_sums`).
"""
import torch
from torch import Tensor

from .. import distributed
from ..divergence import ops as divergence_ops
from . import ops


def shard_label_stats(stage, logits: Tensor, local: Tensor, temperature: float) -> Tensor:
    """``[n, 4]`` fp32 per token of one model's shard ``logits`` ``[B, T, width]`` (any strides) with
    the shard's labels ``local`` (:func:`~askd_kernels.distributed.local_labels`, contiguous
    ``[B, T]``, −1 = ignored): the shard's ``(m, s)`` pair, the label's in-shard log-probability
    (0 where another shard holds the label) and 1.0 where this shard holds it (else 0)."""
    width = logits.shape[-1]
    zeros = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
    log_q, _ratio, pair = stage.row_stats(logits, local, None, zeros, temperature=temperature, ignore_index=-1)
    flat = local.reshape(-1)
    owner = (flat >= 0) & (flat < width)
    return torch.cat([pair, torch.where(owner, log_q, 0.0).unsqueeze(1), owner.float().unsqueeze(1)], 1)


def combine_label_stats(gathered: Tensor, inv_tau: float):
    """From the ranks' :func:`shard_label_stats` ``[P, n, 4]``: the row's global pair ``[n, 2]`` and the
    label's global log-probability ``[n]`` — 0 where no rank holds the label (ignored positions), NaN
    where a valid label lies in no shard (outside the vocabulary: the single-device NaN) or the
    owner's value is NaN."""
    pair = distributed.combine_pairs(gathered[..., :2], inv_tau)
    m, s, log_q_shard, owner = gathered.unbind(-1)
    shifted = log_q_shard + (m - pair[:, 0]) * inv_tau + (s - pair[:, 1])
    owners = owner.sum(0)
    log_q = torch.where(owner != 0, shifted, 0.0).sum(0)
    return pair, log_q, owners


def global_label_stats(stage, student_shard: Tensor, labels: Tensor, teacher_shard, *, temperature: float,
                       ignore_index: int, group):
    """Stage (a) of a vocabulary-sharded call: ``(log_q, log_p_or_None, lse, lse_t_or_None, local)``,
    fp32 ``[n]`` / ``[n, 2]``, the same on every rank, and this shard's labels ``local`` ``[B, T]``.
    One ``all_gather`` of 4 (student only) or 8 (with the teacher's shard) fp32 numbers per token.
    ``log_q`` / ``log_p`` are 0 at ignored positions and NaN at a valid label outside the vocabulary."""
    width = student_shard.shape[-1]
    start, _total = distributed.vocab_shard(width, group)
    local = distributed.local_labels(labels, start, width, ignore_index).contiguous()
    parts = [shard_label_stats(stage, student_shard, local, temperature)]
    if teacher_shard is not None:
        parts.append(shard_label_stats(stage, teacher_shard, local, temperature))
    log_q, log_p, lse, lse_t = gathered_label_stats(torch.cat(parts, 1), labels, ignore_index=ignore_index,
                                                    temperature=temperature, group=group)
    return log_q, log_p, lse, lse_t, local


def gathered_label_stats(shard_stats: Tensor, labels: Tensor, *, ignore_index: int, temperature: float, group):
    """One ``all_gather`` of this rank's ``[n, 4·k]`` :func:`shard_label_stats` (k = 1: the student;
    2: then the teacher), then the whole rows' ``(log_q, log_p_or_None, lse, lse_t_or_None)``, the
    same on every rank: log-probs 0 at ignored positions and NaN at a valid label that no shard holds
    exactly once; pairs (0, 0) at ignored positions, as on one device (the shards' zero pairs would
    combine to (0, log P)). Callers that gather their statistics chunk by chunk call it once."""
    gathered = distributed.gather_rows(shard_stats, group)
    inv_tau = 1.0 / temperature
    valid = labels.reshape(-1) != ignore_index
    out = []
    for i in range(shard_stats.shape[1] // 4):
        pair, log_prob, owners = combine_label_stats(gathered[..., 4 * i:4 * i + 4], inv_tau)
        out.append((torch.where(valid & (owners != 1), float("nan"), log_prob),
                    torch.where(valid.unsqueeze(1), pair, 0.0)))
    (log_q, lse), (log_p, lse_t) = out[0], (out[1] if len(out) > 1 else (None, None))
    return log_q, log_p, lse, lse_t


def full_vocab_weights(alpha: Tensor, sgo: Tensor, kappa: Tensor):
    """Per row, what ``rao_blackwell``'s partial sums pass to the divergence family's
    ``forward_given_pairs``: the mixture's log weights ``[n, 2]`` = (log α, log(1 − α)) (m = α q +
    (1 − α) p) and the κ of each kind, ``(("skl", κ on TGO rows), ("srkl", κ on SGO rows))`` — each row
    active under exactly one of them."""
    log_w = torch.stack([torch.log(alpha), torch.log1p(-alpha)], 1)
    is_sgo = sgo != 0
    return log_w, (("skl", torch.where(is_sgo, 0.0, kappa).contiguous()),
                   ("srkl", torch.where(is_sgo, kappa, 0.0).contiguous()))


def full_vocab_partial_sums(student_shard: Tensor, local: Tensor, teacher_shard: Tensor, lse: Tensor,
                            lse_t: Tensor, log_w: Tensor, kinds, *, temperature: float) -> Tensor:
    """``[n, 2]`` fp32: this shard's partial full-vocabulary value and S per row — skl on TGO rows,
    srkl on SGO rows (``log_w``, ``kinds`` from :func:`full_vocab_weights`, per row of
    ``student_shard``) over the shard's own columns, under the global pairs ``lse``/``lse_t``. 0 at
    ignored rows (``local`` = −1) and clipped sequences (κ = 0). No collective: callers add the
    shards' partial sums once (chunked callers after their last chunk)."""
    impl = divergence_ops._impl(student_shard.device)
    total = None
    # Each row is active under exactly one kind (the other's κ is 0, its value and sum exactly 0).
    for kind, k in kinds:
        value, row_sum = impl.forward_given_pairs(student_shard, teacher_shard, local, k, log_w, lse,
                                                  lse_t, kind=kind, temperature=temperature, ignore_index=-1)
        part = torch.stack([value.reshape(-1), row_sum.reshape(-1)], 1)
        total = part if total is None else total + part
    return total


def full_vocab_sums(student_shard: Tensor, local: Tensor, teacher_shard: Tensor, lse: Tensor, lse_t: Tensor,
                    alpha: Tensor, sgo: Tensor, kappa: Tensor, *, temperature: float, group):
    """``rao_blackwell``'s per-token full-vocabulary value and row sum S (fp32 ``[n]`` each, the same on
    every rank): :func:`full_vocab_partial_sums` added over the shards by one ``all_reduce``, as
    :func:`.cpu.full_vocab_row_stats` writes them on one device. ``alpha``, ``sgo``, ``kappa`` are
    per row of ``student_shard`` (its leading dimension)."""
    log_w, kinds = full_vocab_weights(alpha, sgo, kappa)
    total = full_vocab_partial_sums(student_shard, local, teacher_shard, lse, lse_t, log_w, kinds,
                                    temperature=temperature)
    total = distributed.all_reduce_sum(total, group)
    return total[:, 0].contiguous(), total[:, 1].contiguous()


class VocabParallelASKD(torch.autograd.Function):
    """``askd_forward`` (or ``askd_packed_forward``, with ``maps``) on a vocabulary shard.

    Forward: :func:`global_label_stats` (one ``all_gather``; plus :func:`full_vocab_sums`' one
    ``all_reduce`` for ``rao_blackwell``), then stage (b) — :func:`.ops.run_coefficients` — on the
    replicated per-token vectors: every rank computes the same values, λ and coefficients. Backward:
    stage (c) of the backend on this shard with the shard's labels (another shard's label is column
    ``width``, which matches no column) and the *global* (max, log-sum) pairs — exactly this shard's
    columns of the unsharded gradient, with no collective.

    A ``torch.autograd.Function`` rather than a custom op: a ``ProcessGroup`` is no custom-op
    argument. Inputs as the ops take them (validated ``labels`` etc.); ``maps`` is the packed rows'
    :class:`.ops._Layout` (then the shards are ``[N, 1, width]`` rows) or None. Returns
    ``(value, log_q, log_ratio, lam, coef)``, the last four non-differentiable.
    """

    @staticmethod
    def forward(ctx, student_shard, labels, teacher_shard, teacher_logprobs, student_generated, alpha, kappa,
                old_logprobs, baseline_groups, maps, w_max, estimator, gamma, length_normalize, temperature,
                ignore_index, group):
        stage = ops.stages(student_shard.device)
        full_vocab = estimator == "rao_blackwell"
        log_q, log_p, lse, lse_t, local = global_label_stats(
            stage, student_shard, labels, teacher_shard, temperature=temperature, ignore_index=ignore_index,
            group=group)
        valid = labels.reshape(-1) != ignore_index
        if log_p is None:
            log_p = teacher_logprobs.reshape(-1)
        log_ratio = torch.where(valid, log_p - log_q, 0.0)
        # per row of the shard: the sequence's α, flag, κ (packed rows: each token is its own row)
        seq = None if maps is None else maps.seq_of_token
        row_alpha, row_sgo, row_kappa = (x if seq is None else x[seq] for x in (alpha, student_generated, kappa))
        fv_value = fv_sum = None
        if full_vocab:
            fv_value, fv_sum = full_vocab_sums(student_shard, local, teacher_shard, lse, lse_t, row_alpha, row_sgo,
                                               row_kappa, temperature=temperature, group=group)
        options = (baseline_groups, w_max, estimator, gamma, length_normalize, ignore_index)
        if maps is None:
            lam, coef, value = ops.run_coefficients(stage, log_q, log_ratio, labels, student_generated, alpha, kappa,
                                                    old_logprobs, *options, fv_value=fv_value)
        else:  # as askd_packed_forward: stage (b) on the [S, L] layout, λ and the factor moved back
            seq_old = None if old_logprobs is None else maps.to_sequences(old_logprobs, 0.0)
            seq_fv = None if fv_value is None else maps.to_sequences(fv_value, 0.0).reshape(-1)
            lam, coef, value = ops.run_coefficients(
                stage, maps.to_sequences(log_q, 0.0).reshape(-1), maps.to_sequences(log_ratio, 0.0).reshape(-1),
                maps.to_sequences(labels, ignore_index), student_generated, alpha, kappa, seq_old, *options,
                fv_value=seq_fv)
            lam, coef = maps.to_tokens(lam), maps.to_tokens(coef)
        coef = coef.reshape(-1).contiguous()
        ctx.save_for_backward(student_shard, local, teacher_shard if full_vocab else None, coef, lse,
                              lse_t if full_vocab else None, fv_sum, row_alpha, row_sgo, row_kappa, seq)
        ctx.options = (full_vocab, temperature)
        per_token = tuple(x.reshape(labels.shape) for x in (log_q, log_ratio, lam, coef))
        ctx.mark_non_differentiable(*per_token)
        return (value, *per_token)

    @staticmethod
    def backward(ctx, grad_value, *_unused_grads):
        none = (None,) * 16
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        student_shard, local, teacher_shard, coef, lse, lse_t, fv_sum, alpha, sgo, kappa, seq = ctx.saved_tensors
        full_vocab, temperature = ctx.options
        stage = ops.stages(student_shard.device)
        grad = grad_value.float()
        grad = (grad if seq is None else grad[seq]).contiguous()  # packed rows: per token
        if full_vocab:
            grad_shard = stage.full_vocab_gradient(student_shard, local, teacher_shard, coef, lse, lse_t, fv_sum,
                                                   alpha, sgo, kappa, grad, temperature=temperature, ignore_index=-1)
        else:
            grad_shard = stage.student_gradient(student_shard, local, coef, lse, grad, temperature=temperature)
        return (grad_shard, *none)
