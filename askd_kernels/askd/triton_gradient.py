"""Stage (c) — the gradient with respect to the student logits (``docs/contract.md`` §4).

    ∂loss/∂z[b,t,v] = g_b · coef_t · (softmax(z[b,t]/τ)_v − 1[v = y_t]) / τ

with ``coef_t = κ_b·w_t·λ_t`` from stage (b), ``g_b`` the upstream gradient of sequence b, and the
softmax rebuilt from the (max, log-sum) pair that stage (a) kept. One streaming pass per token writes the
row in the logits' dtype; a row whose factor is zero (ignored position, clipped sequence, λ = 0 at a
boundary α, zero upstream gradient) masks every load, so it writes zeros without reading the logits.
The only allocation is the gradient itself.
"""
import torch
import triton
import triton.language as tl

from .._triton_math import NUM_WARPS, log_softmax_at, vocab_block


@triton.jit
def _gradient_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    LABELS, COEF, LSE, G_SEQ,                       # [B·T] int, [B·T] fp32, [B·T, 2] fp32; [B] fp32
    GRAD,                                           # output [B·T, V_s], contiguous, logits' dtype
    T, inv_tau,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    scale = tl.load(COEF + row) * tl.load(G_SEQ + b) * inv_tau
    label = tl.load(LABELS + row)
    n_read = tl.where(scale != 0.0, V_s, 0)  # columns to read: none when the factor is zero
    # Not even the row's log-sum-exp: a zero-factor row with NaN logits must still write exact zeros.
    m = tl.load(LSE + 2 * row, mask=n_read > 0, other=0.0)
    s = tl.load(LSE + 2 * row + 1, mask=n_read > 0, other=0.0)
    s_row = S + b * stride_sb + t * stride_st
    g_row = GRAD + row * V_s
    cols = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(V_s, BLOCK)):
        offs = i * BLOCK + cols
        in_row = offs < V_s
        x = tl.load(s_row + offs * stride_sv, mask=offs < n_read, other=float("-inf"))
        prob = tl.exp(log_softmax_at(x, m, s, inv_tau))
        grad = scale * (prob - tl.where(offs == label, 1.0, 0.0))
        tl.store(g_row + offs, grad.to(GRAD.dtype.element_ty), mask=in_row)


def student_gradient(student_logits, labels, coef, lse, grad_seq, *, temperature):
    """Launch stage (c); returns a new contiguous tensor shaped and typed like ``student_logits``."""
    B, T, V_s = student_logits.shape
    grad = torch.empty((B, T, V_s), dtype=student_logits.dtype, device=student_logits.device)
    _gradient_kernel[(B * T,)](
        student_logits, *student_logits.stride(), V_s,
        labels, coef, lse, grad_seq, grad,
        T, 1.0 / temperature,
        BLOCK=vocab_block(V_s), num_warps=NUM_WARPS,
    )
    return grad
