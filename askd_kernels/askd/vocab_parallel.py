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
"""
import torch
from torch import Tensor

from .. import distributed


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
    gathered = distributed.gather_rows(torch.cat(parts, 1), group)
    inv_tau = 1.0 / temperature
    valid = (labels.reshape(-1) != ignore_index)
    out = []
    for i in range(len(parts)):
        pair, log_prob, owners = combine_label_stats(gathered[..., 4 * i:4 * i + 4], inv_tau)
        # ignored rows: pair (0, 0) as on one device (the shards' zero pairs would combine to (0, log P))
        out.append((torch.where(valid.unsqueeze(1), pair, 0.0),
                    torch.where(valid & (owners != 1), float("nan"), log_prob)))
    (lse, log_q), teacher = out[0], (out[1] if len(out) > 1 else (None, None))
    return log_q, teacher[1], lse, teacher[0], local
