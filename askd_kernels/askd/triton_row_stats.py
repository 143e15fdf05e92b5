"""Stage (a) — row statistics: one streaming pass per token over the vocabulary (``docs/contract.md`` §2).

For every position (b, t) with a valid label y it computes, in fp32 and from raw logits,

    log q_t = z[y]/τ − logsumexp(z/τ)            (student, over its own V_s)
    log p_t = w[y]/τ − logsumexp(w/τ)            (teacher, over its own V_t; y ≥ V_t ⇒ −inf)
    ℓ_t     = log p_t − log q_t

and keeps the student's ``(max, log-sum)`` pair of :func:`row_logsumexp` for the backward pass. When the caller already has the teacher's
log-probs, the teacher pass is skipped (``TEACHER_LOGITS=False``) and ``log p_t`` is read as given.
Ignored positions visit no vocabulary block and write zeros. Nothing of size tokens × vocab is
allocated: the outputs are fp32 vectors of length B·T (the pair: [B·T, 2]).
"""
import torch
import triton
import triton.language as tl

from .._triton_math import NUM_WARPS, log_softmax_at, row_logsumexp, vocab_block


@triton.jit
def _row_stats_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    W, stride_wb, stride_wt, stride_wv, V_t,        # teacher logits [B, T, V_t] (if TEACHER_LOGITS)
    LOGP_T,                                         # teacher log p(y) [B·T]   (if not TEACHER_LOGITS)
    LABELS, T, ignore_index, inv_tau,               # labels [B·T] contiguous
    LOG_Q, LOG_RATIO, LSE,                          # outputs [B·T], [B·T], [B·T, 2] fp32
    TEACHER_LOGITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(LABELS + row)
    valid = label != ignore_index

    s_row = S + b * stride_sb + t * stride_st
    m_s, s_s = row_logsumexp(s_row, stride_sv, V_s, tl.where(valid, tl.cdiv(V_s, BLOCK), 0), inv_tau, BLOCK)
    # A label outside [0, V_s) that is not ignore_index is a caller bug we cannot raise on without a
    # host sync: it poisons log q with NaN instead of reading out of bounds.
    z_y = tl.load(s_row + label * stride_sv, mask=valid & (label >= 0) & (label < V_s), other=float("nan"))
    log_q = log_softmax_at(z_y, m_s, s_s, inv_tau)

    if TEACHER_LOGITS:
        w_row = W + b * stride_wb + t * stride_wt
        m_t, s_t = row_logsumexp(w_row, stride_wv, V_t, tl.where(valid, tl.cdiv(V_t, BLOCK), 0), inv_tau, BLOCK)
        # y ≥ V_t: the teacher cannot emit y, p = 0 exactly (log p = −inf).
        w_y = tl.load(w_row + label * stride_wv, mask=valid & (label >= 0) & (label < V_t), other=float("-inf"))
        log_p = log_softmax_at(w_y, m_t, s_t, inv_tau)
    else:
        log_p = tl.load(LOGP_T + row, mask=valid, other=0.0).to(tl.float32)

    tl.store(LOG_Q + row, tl.where(valid, log_q, 0.0))
    tl.store(LOG_RATIO + row, tl.where(valid, log_p - log_q, 0.0))
    # Ignored rows store (0, 0), not −inf: the gradient kernel never reads them, keep them finite.
    tl.store(LSE + 2 * row, tl.where(valid, m_s, 0.0))
    tl.store(LSE + 2 * row + 1, tl.where(valid, s_s, 0.0))


def row_stats(student_logits, labels, teacher_logits, teacher_logprobs, *, temperature, ignore_index):
    """Launch stage (a). Returns fp32 ``(log_q [B·T], log_ratio [B·T], lse [B·T, 2])``, ``lse`` holding
    the student's (max, log-sum) pair per token.

    ``labels`` and ``teacher_logprobs`` must be contiguous [B, T]; the logits may have any strides.
    """
    B, T, V_s = student_logits.shape
    n = B * T
    dev = student_logits.device
    log_q = torch.empty(n, dtype=torch.float32, device=dev)
    log_ratio = torch.empty_like(log_q)
    lse = torch.empty((n, 2), dtype=torch.float32, device=dev)
    has_teacher = teacher_logits is not None
    if has_teacher:
        W, V_t = teacher_logits, teacher_logits.shape[2]
        w_strides = teacher_logits.stride()
        logp_t = log_q  # unused placeholder pointer
    else:
        W, V_t, w_strides = student_logits, 0, (0, 0, 0)
        logp_t = teacher_logprobs
    block = vocab_block(max(V_s, V_t))
    _row_stats_kernel[(n,)](
        student_logits, *student_logits.stride(), V_s,
        W, *w_strides, V_t,
        logp_t, labels, T, ignore_index, 1.0 / temperature,
        log_q, log_ratio, lse,
        TEACHER_LOGITS=has_teacher, BLOCK=block, num_warps=NUM_WARPS,
    )
    return log_q, log_ratio, lse
