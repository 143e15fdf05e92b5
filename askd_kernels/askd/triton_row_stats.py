"""Stage (a) — row statistics: streaming passes per token over the vocabulary (``docs/contract.md`` §2).

For every position (b, t) with a valid label y, :func:`row_stats` computes, in fp32 from raw logits,

    log q_t = z[y]/τ − logsumexp(z/τ)            (student, over its own V_s)
    log p_t = w[y]/τ − logsumexp(w/τ)            (teacher, over its own V_t; y ≥ V_t ⇒ −inf)
    ℓ_t     = log p_t − log q_t

and keeps the student's ``(max, log-sum)`` pair of :func:`row_logsumexp` for the backward pass. When
the caller already has the teacher's log-probs, the teacher pass is skipped (``TEACHER_LOGITS=False``)
and ``log p_t`` is read as given.

:func:`full_vocab_row_stats` is stage (a) of the ``rao_blackwell`` estimator: the same quantities plus
a second pass over both rows for the token's full-vocabulary divergence — skl_t = Σ_v p log(p/m) on a
TGO, srkl_t = Σ_v q log(q/m) on an SGO, over the student's vocabulary — and S_t = Σ_v a_v, the
statistic of its gradient (:func:`divergence_terms`). Each element of both rows is read twice (8
bytes per logit pair in bf16), the same traffic as the divergence family's forward.

Ignored positions visit no vocabulary block and write zeros. Nothing of size tokens × vocab is
allocated: the outputs are fp32 vectors of length B·T (the pairs: [B·T, 2]).
"""
import torch
import triton
import triton.language as tl

from .._triton_math import (NUM_WARPS, divergence_row_sums, log_softmax_at, row_logsumexp, row_vector, store_pair,
                            vocab_block)


@triton.jit
def _label_log_prob(X, row_off, stride_v, n_cols, label, valid, inv_tau, outside, BLOCK: tl.constexpr,
                    VEC: tl.constexpr):
    """``(m, s, log softmax(row/τ)[label])`` of the row at element offset ``row_off`` of ``X``; the row
    is not visited when not ``valid``. A label outside [0, n_cols) reads ``outside`` instead of the
    logit (NaN for the student, whose labels must lie in its vocabulary: a caller bug we cannot raise
    on without a host sync; −inf for the teacher, which cannot emit a label ≥ V_t: p = 0 exactly)."""
    m, s = row_logsumexp(X, row_off, stride_v, tl.where(valid, n_cols, 0), inv_tau, BLOCK, VEC)
    x_y = tl.load(X + row_off + label * stride_v, mask=valid & (label >= 0) & (label < n_cols), other=outside)
    return m, s, log_softmax_at(x_y, m, s, inv_tau)


@triton.jit
def _store_label_stats(LOG_Q, LOG_RATIO, LSE, row, valid, log_q, log_p, m_s, s_s):
    tl.store(LOG_Q + row, tl.where(valid, log_q, 0.0))
    tl.store(LOG_RATIO + row, tl.where(valid, log_p - log_q, 0.0))
    store_pair(LSE, row, valid, m_s, s_s)


@triton.jit
def _row_stats_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    W, stride_wb, stride_wt, stride_wv, V_t,        # teacher logits [B, T, V_t] (if TEACHER_LOGITS)
    LOGP_T,                                         # teacher log p(y) [B·T]   (if not TEACHER_LOGITS)
    LABELS, T, ignore_index, inv_tau,               # labels [B·T] contiguous
    LOG_Q, LOG_RATIO, LSE,                          # outputs [B·T], [B·T], [B·T, 2] fp32
    TEACHER_LOGITS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, VEC_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    m_s, s_s, log_q = _label_log_prob(S, b * stride_sb + t * stride_st, stride_sv, V_s, label, valid, inv_tau,
                                      float("nan"), BLOCK, VEC)
    if TEACHER_LOGITS:
        _m, _s, log_p = _label_log_prob(W, b * stride_wb + t * stride_wt, stride_wv, V_t, label, valid, inv_tau,
                                        float("-inf"), BLOCK, VEC_T)
    else:
        log_p = tl.load(LOGP_T + row, mask=valid, other=0.0).to(tl.float32)
    _store_label_stats(LOG_Q, LOG_RATIO, LSE, row, valid, log_q, log_p, m_s, s_s)


@triton.jit
def _full_vocab_row_stats_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    W, stride_wb, stride_wt, stride_wv, V_t,        # teacher logits [B, T, V_t], any strides
    LABELS, T, ignore_index, inv_tau,               # labels [B·T] contiguous
    ALPHA, SGO, KAPPA,                              # [B] fp32, int32, fp32
    LOG_Q, LOG_RATIO, LSE, LSE_T,                   # outputs [B·T], [B·T], [B·T, 2], [B·T, 2] fp32
    FV_VALUE, FV_SUM,                               # outputs [B·T] fp32
    BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    s_off = b * stride_sb + t * stride_st
    w_off = b * stride_wb + t * stride_wt
    # VEC > 1 only when the two rows are congruent and V_t ≥ V_s (row_vector): the teacher's own pass
    # then aligns too, as its rows start at the student's offsets modulo VEC.
    m_s, s_s, log_q = _label_log_prob(S, s_off, stride_sv, V_s, label, valid, inv_tau, float("nan"), BLOCK, VEC)
    m_t, s_t, log_p = _label_log_prob(W, w_off, stride_wv, V_t, label, valid, inv_tau, float("-inf"), BLOCK, VEC)
    _store_label_stats(LOG_Q, LOG_RATIO, LSE, row, valid, log_q, log_p, m_s, s_s)
    store_pair(LSE_T, row, valid, m_t, s_t)

    # Pass 2 over the student's vocabulary (p = 0 beyond V_t; the teacher's columns beyond V_s are
    # tokens no label can be): the token's full-vocabulary divergence (skl on a TGO, srkl on an
    # SGO) and S for the backward.
    alpha = tl.load(ALPHA + b)
    la = tl.log(alpha)
    lb = tl.log(1.0 - alpha)
    active = valid & (tl.load(KAPPA + b) != 0.0)  # a clipped sequence has no value and no gradient
    n_s = tl.where(active, V_s, 0)
    n_t = tl.where(active, tl.minimum(V_s, V_t), 0)  # no teacher column past V_s counts
    if tl.load(SGO + b) != 0:
        value, row_sum = divergence_row_sums(S, s_off, stride_sv, n_s, W, w_off, stride_wv, n_t, inv_tau,
                                             m_s, s_s, m_t, s_t, la, lb, 3, BLOCK, VEC)
    else:
        value, row_sum = divergence_row_sums(S, s_off, stride_sv, n_s, W, w_off, stride_wv, n_t, inv_tau,
                                             m_s, s_s, m_t, s_t, la, lb, 2, BLOCK, VEC)
    tl.store(FV_VALUE + row, value)  # 0 for inactive rows: their loop is empty
    tl.store(FV_SUM + row, row_sum)


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
        TEACHER_LOGITS=has_teacher, BLOCK=block, VEC=row_vector(student_logits),
        VEC_T=row_vector(teacher_logits) if has_teacher else 1, num_warps=NUM_WARPS,
    )
    return log_q, log_ratio, lse


def full_vocab_row_stats(student_logits, labels, teacher_logits, alpha, sgo, kappa, *, temperature, ignore_index):
    """Launch stage (a) of the ``rao_blackwell`` estimator: :func:`row_stats`' outputs plus the
    teacher's (max, log-sum) pairs ``lse_t`` [B·T, 2] and, per token, the full-vocabulary divergence
    ``fv_value`` (skl on TGOs, srkl on SGOs, summed over the student's vocabulary [0, V_s) — the
    tokens a label can be —, each model normalised over its own) and ``fv_sum`` = S = Σ_v a_v
    (:func:`divergence_terms`), fp32 [B·T]; 0
    at ignored positions and in clipped sequences."""
    B, T, V_s = student_logits.shape
    V_t = teacher_logits.shape[2]
    n = B * T
    dev = student_logits.device
    log_q, log_ratio, fv_value, fv_sum = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4))
    lse, lse_t = (torch.empty((n, 2), dtype=torch.float32, device=dev) for _ in range(2))
    _full_vocab_row_stats_kernel[(n,)](
        student_logits, *student_logits.stride(), V_s,
        teacher_logits, *teacher_logits.stride(), V_t,
        labels, T, ignore_index, 1.0 / temperature, alpha, sgo, kappa,
        log_q, log_ratio, lse, lse_t, fv_value, fv_sum,
        BLOCK=vocab_block(max(V_s, V_t)), VEC=row_vector(student_logits, teacher_logits, same_extent=V_t >= V_s),
        num_warps=NUM_WARPS,
    )
    return log_q, log_ratio, lse, lse_t, fv_value, fv_sum
