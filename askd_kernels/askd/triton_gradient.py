"""Stage (c) — the gradient with respect to the student logits (``docs/contract.md`` §4).

:func:`student_gradient`, for the sampled-token estimators:

    ∂loss/∂z[b,t,v] = g_b · coef_t · (softmax(z[b,t]/τ)_v − 1[v = y_t]) / τ

with ``coef_t = κ_b·w_t·λ_t`` from stage (b), ``g_b`` the upstream gradient of sequence b, and the
softmax rebuilt from the (max, log-sum) pair that stage (a) kept. One streaming pass per token writes
the row in the logits' dtype; a row whose factor is zero (ignored position, clipped sequence, λ = 0 at
a boundary α, zero upstream gradient) masks every load, so it writes zeros without reading the logits.

:func:`full_vocab_gradient`, for ``rao_blackwell``: the gradient of the token's full-vocabulary skl or
srkl plus the sampled-token future term,

    ∂loss/∂z[b,t,v] = g_b · [κ_b·(a_v − q_v·S_t) + coef_t·(q_v − 1[v = y_t])] / τ,

reading the student and the teacher row once (6 bytes per logit pair in bf16, with the write).
The only allocation is the gradient itself.
"""
import torch
import triton
import triton.language as tl

from .._triton_math import (LOG2E, NUM_WARPS, divergence_row_gradient, edge_columns, load_main, load_pair, main_len,
                            row_span, row_vector, vocab_block)


@triton.jit
def _softmax_gradient(xk, scale, c, is_label):
    """scale·(softmax_v − 1[v = label]) with softmax_v = exp2(xk − c), xk = (z_v − m)·log2(e)/τ (z − m
    exact, as in log_softmax_at) and c = s·log2(e): one exp2."""
    return scale * (tl.exp2(xk - c) - tl.where(is_label, 1.0, 0.0))


@triton.jit
def _gradient_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    LABELS, COEF, LSE, G_SEQ,                       # [B·T] int, [B·T] fp32, [B·T, 2] fp32; [B] fp32
    GRAD,                                           # output [B·T, V_s], contiguous, logits' dtype
    T, inv_tau,
    BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    scale = tl.load(COEF + row) * tl.load(G_SEQ + b) * inv_tau
    # int32 compare against the columns: clamped to [−1, V_s], no column matches a label outside the row
    label = tl.minimum(tl.maximum(tl.load(LABELS + row), -1), V_s).to(tl.int32)
    n_read = tl.where(scale != 0.0, V_s, 0)  # columns to read: none when the factor is zero
    # Not even the row's log-sum-exp: a zero-factor row with NaN logits must still write exact zeros.
    m, s = load_pair(LSE, row, n_read > 0)
    k = inv_tau * LOG2E
    s2 = s * LOG2E
    s_off = b * stride_sb + t * stride_st
    g_off = row * V_s
    start, h, L = row_span(s_off, V_s, VEC)
    g_start = (g_off + (VEC - 1)) // VEC * VEC  # = g_off + h: congruent rows (row_vector)
    L_read = main_len(h, n_read, VEC)
    if VEC > 1:
        ecols, eok = edge_columns(h, L, VEC)
        xe = tl.load(S + s_off + ecols * stride_sv, mask=eok & (ecols < n_read), other=float("-inf"))
        ge = _softmax_gradient((xe.to(tl.float32) - m) * k, scale, s2, ecols == label)
        tl.store(GRAD + g_off + ecols, ge.to(GRAD.dtype.element_ty), mask=eok & (ecols < V_s))
    cols = tl.arange(0, BLOCK)
    label_main = label - h
    if VEC > 1:
        # Full blocks without a per-column mask (L_read ∈ {0, L}: a per-row read predicate) and
        # without the label compare: the full block holding the label, if any, is skipped by the loop
        # and done after it, with the compare. Then the partial last block, masked.
        n_full = L // BLOCK
        in_full = (label_main >= 0) & (label_main < n_full * BLOCK)
        label_block = tl.where(in_full, label_main // BLOCK, n_full)
        for j in range(0, n_full - in_full.to(tl.int32)):
            i = j + (j >= label_block).to(tl.int32)
            x = load_main(S, start, i, L_read > 0, BLOCK, True)
            grad = scale * tl.exp2((x - m) * k - s2)  # _softmax_gradient of a block without the label
            tl.store(GRAD + g_start + i * BLOCK + cols, grad.to(GRAD.dtype.element_ty))
        if in_full:
            offs = label_block * BLOCK + cols
            x = load_main(S, start, label_block, L_read > 0, BLOCK, True)
            grad = _softmax_gradient((x - m) * k, scale, s2, offs == label_main)
            tl.store(GRAD + g_start + offs, grad.to(GRAD.dtype.element_ty))
        if n_full * BLOCK < L:
            _gradient_block(S, GRAD, start, g_start, n_full * BLOCK + cols, L, L_read, stride_sv, m, k, scale, s2,
                            label_main)
    else:
        for i in range(0, tl.cdiv(L, BLOCK)):
            _gradient_block(S, GRAD, start, g_start, i * BLOCK + cols, L, L_read, stride_sv, m, k, scale, s2,
                            label_main)


@triton.jit
def _gradient_block(S, GRAD, start, g_start, offs, L, L_read, stride_sv, m, k, scale, s2, label_main):
    """One masked block of stage (c)'s main region: columns ``offs``, read below ``L_read``, written
    below ``L``."""
    x = tl.load(S + start + offs * stride_sv, mask=offs < L_read, other=float("-inf"))
    grad = _softmax_gradient((x.to(tl.float32) - m) * k, scale, s2, offs == label_main)
    tl.store(GRAD + g_start + offs, grad.to(GRAD.dtype.element_ty), mask=offs < L)


@triton.jit
def _full_vocab_gradient_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    W, stride_wb, stride_wt, stride_wv, V_t,        # teacher logits [B, T, V_t], any strides
    LABELS, COEF, LSE, LSE_T, FV_SUM,               # [B·T] int, fp32; [B·T, 2] ×2; [B·T] fp32
    ALPHA, SGO, KAPPA, G_SEQ,                       # [B] fp32, int32, fp32, fp32
    GRAD,                                           # output [B·T, V_s], contiguous, logits' dtype
    T, ignore_index, inv_tau,
    BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(LABELS + row)
    g = tl.load(G_SEQ + b)
    scale_label = tl.load(COEF + row) * g * inv_tau         # the future term, c_t·g/τ (0 on TGOs)
    scale = tl.where(label != ignore_index, tl.load(KAPPA + b) * g * inv_tau, 0.0)
    # As in the divergence family: a zero factor reads nothing; an infinite S (an infinite value)
    # gives the full-vocabulary part a zero gradient instead of NaN.
    row_sum = tl.load(FV_SUM + row, mask=scale != 0.0, other=0.0)
    scale = tl.where((row_sum == float("inf")) | (row_sum == float("-inf")), 0.0, scale)
    live = (scale != 0.0) | (scale_label != 0.0)
    m_s, s_s = load_pair(LSE, row, live)
    m_t, s_t = load_pair(LSE_T, row, scale != 0.0)
    alpha = tl.load(ALPHA + b)
    la = tl.log(alpha)
    lb = tl.log(1.0 - alpha)
    s_off = b * stride_sb + t * stride_st
    w_off = b * stride_wb + t * stride_wt
    n_s = tl.where(live, V_s, 0)
    n_t = tl.where(scale != 0.0, tl.minimum(V_s, V_t), 0)
    if tl.load(SGO + b) != 0:
        divergence_row_gradient(GRAD, row * V_s, S, s_off, stride_sv, V_s, n_s, W, w_off, stride_wv, n_t, inv_tau,
                                m_s, s_s, m_t, s_t, la, lb, scale, row_sum, label, scale_label, 3, True, BLOCK, VEC)
    else:
        divergence_row_gradient(GRAD, row * V_s, S, s_off, stride_sv, V_s, n_s, W, w_off, stride_wv, n_t, inv_tau,
                                m_s, s_s, m_t, s_t, la, lb, scale, row_sum, label, scale_label, 2, True, BLOCK, VEC)


def student_gradient(student_logits, labels, coef, lse, grad_seq, *, temperature):
    """Launch stage (c); returns a new contiguous tensor shaped and typed like ``student_logits``."""
    B, T, V_s = student_logits.shape
    grad = torch.empty((B, T, V_s), dtype=student_logits.dtype, device=student_logits.device)
    _gradient_kernel[(B * T,)](
        student_logits, *student_logits.stride(), V_s,
        labels, coef, lse, grad_seq, grad,
        T, 1.0 / temperature,
        BLOCK=vocab_block(V_s), VEC=row_vector(student_logits, grad), num_warps=NUM_WARPS,
    )
    return grad


def full_vocab_gradient(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha, sgo, kappa, grad_seq,
                        *, temperature, ignore_index):
    """Launch stage (c) of the ``rao_blackwell`` estimator: per row, g_b·κ_b·(a_v − q_v·S_t)/τ (the
    gradient of the token's full-vocabulary skl or srkl, :func:`divergence_terms` kinds 2 and 3) plus
    g_b·coef_t·(q_v − 1[v = y_t])/τ (the sampled-token future term). Returns a new contiguous tensor
    shaped and typed like ``student_logits``."""
    B, T, V_s = student_logits.shape
    grad = torch.empty((B, T, V_s), dtype=student_logits.dtype, device=student_logits.device)
    _full_vocab_gradient_kernel[(B * T,)](
        student_logits, *student_logits.stride(), V_s,
        teacher_logits, *teacher_logits.stride(), teacher_logits.shape[2],
        labels, coef, lse, lse_t, fv_sum, alpha, sgo, kappa, grad_seq, grad,
        T, ignore_index, 1.0 / temperature,
        BLOCK=vocab_block(V_s), num_warps=NUM_WARPS,
        VEC=row_vector(student_logits, teacher_logits, grad, same_extent=teacher_logits.shape[2] >= V_s),
    )
    return grad
