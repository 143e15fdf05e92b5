"""The divergence family's Triton kernels: one forward, one backward (``docs/contract.md`` §6).

Per valid position, over the shared vocabulary [0, V), V = min(V_s, V_t), with both rows renormalised
there (x_v = log q_v = z_v/τ − logsumexp(z[:V]/τ), y_v = log p_v likewise), a per-token value
f(q, p) = Σ_v f-terms and its gradient w.r.t. the student logits. With a_v = q_v·∂f/∂q_v, the
softmax Jacobian gives

    ∂f/∂z_v = (a_v − q_v·S)/τ,     S = Σ_u a_u                                         (1)

so the work is two streaming passes per token in the forward kernel and one in the backward kernel:

* forward  — pass 1: ``row_pair_logsumexp``: both rows' log-sum-exps over [0, V) in one loop;
             pass 2: Σ_v f-terms (the value) and S, both fp32, stored per token with the two LSEs;
* backward — recomputes x, y and a_v block by block and writes g·(a_v − q_v·S)/τ in the logits'
             dtype; student columns in [V, V_s) get 0. A row whose factor is zero (ignored, clipped,
             zero upstream gradient) writes zeros without reading the logits.

With the vocabulary sharded over ranks (:mod:`.vocab_parallel`) the forward kernel runs its two
passes separately (a compile-time ``MODE``; the default, both passes, compiles as before):
:func:`pairs` (pass 1: the shard's pairs) and :func:`forward_given_pairs` (pass 2 from the global
pairs: the shard's partial sums).

The per-kind terms (f, a) are :func:`askd_kernels._triton_math.divergence_terms`, whose docstring
has the table of formulas. The forward allocates four fp32 vectors of length B·T; the backward only
the gradient.
"""
import torch
import triton
import triton.language as tl

from .._triton_math import (NUM_WARPS, divergence_row_gradient, divergence_row_sums, load_pair, row_pair_logsumexp,
                            row_vector, store_pair, vocab_block)

KINDS = {"fkl": 0, "rkl": 1, "skl": 2, "srkl": 3, "jsd": 4, "tvd": 5}


# ---- shared row plumbing of the two kernels --------------------------------------------------
@triton.jit
def _row_setup(LABELS, KAPPA, LOG_W, T, ignore_index):
    """(b, t, active, log w_q, log w_p) of this program's row; inactive = ignored or clipped."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    active = (tl.load(LABELS + row) != ignore_index) & (tl.load(KAPPA + b) != 0.0)
    return row, b, t, active, tl.load(LOG_W + 2 * b), tl.load(LOG_W + 2 * b + 1)


@triton.jit
def _divergence_forward_kernel(
    S, stride_sb, stride_st, stride_sv,             # student logits [B, T, V_s], any strides
    W, stride_wb, stride_wt, stride_wv,             # teacher logits [B, T, V_t], any strides
    V,                                              # shared vocabulary min(V_s, V_t)
    LABELS, KAPPA, LOG_W,                           # [B·T] int; [B] fp32 (0 = clipped); [B, 2] fp32
    VALUE, ROW_SUM, LSE_S, LSE_T,                   # outputs [B·T], [B·T], [B·T, 2], [B·T, 2] fp32
    T, ignore_index, inv_tau,
    KIND: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, MODE: tl.constexpr = 0,
):
    """MODE 0: both passes (the whole row). The vocabulary-parallel modes split them (each rank's
    row is a shard of the vocabulary): MODE 1 = pass 1 only, the shard's two pairs into LSE_S /
    LSE_T (VALUE, ROW_SUM and LOG_W not touched); MODE 2 = pass 2 only, with the (global) pairs
    read from LSE_S / LSE_T: the shard's partial Σ f-terms and S, without tvd's clamp (a partial
    sum)."""
    row, b, t, active, la, lb = _row_setup(LABELS, KAPPA, LOG_W, T, ignore_index)
    n = tl.where(active, V, 0)  # inactive rows visit no vocabulary column
    s_off = b * stride_sb + t * stride_st
    w_off = b * stride_wb + t * stride_wt
    if MODE == 2:
        # inactive rows: (0, 0) without reading; their loop is empty
        m_s, s_s = load_pair(LSE_S, row, active)
        m_t, s_t = load_pair(LSE_T, row, active)
        # m_s through a block-wide max of its broadcast (the same value, NaN and ±inf included): with
        # no block reduction ahead of pass 2's loop, LLVM's SLP vectorizer in Triton 3.9's sm_90
        # pipeline crashes (segfault) on the jsd specialisation at BLOCK ≥ 1024. Once per row:
        # nothing next to the loop. tests/test_aot.py compiles every kind of this mode.
        m_s = tl.max(tl.full([BLOCK], m_s, tl.float32) + tl.zeros([BLOCK], tl.float32), axis=0)
    else:
        m_s, s_s, m_t, s_t = row_pair_logsumexp(S, s_off, stride_sv, W, w_off, stride_wv, n, inv_tau, BLOCK, VEC)
        # Inactive rows store 0, not −inf: the backward never reads them, but keep the outputs finite.
        # (Stored before pass 2 so that nothing but the two pairs stays live across its loop.)
        store_pair(LSE_S, row, active, m_s, s_s)
        store_pair(LSE_T, row, active, m_t, s_t)

    if MODE != 1:
        value, row_sum = divergence_row_sums(S, s_off, stride_sv, n, W, w_off, stride_wv, n, inv_tau,
                                             m_s, s_s, m_t, s_t, la, lb, KIND, BLOCK, VEC)
        if KIND == 5 and MODE == 0:  # ½ Σ|p − q| ≤ 1: the fp32 sum of a disjoint pair may round 1 ulp above
            value = tl.minimum(value, 1.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(VALUE + row, value)  # 0 for inactive rows: their loop is empty
        tl.store(ROW_SUM + row, row_sum)


@triton.jit
def _divergence_backward_kernel(
    S, stride_sb, stride_st, stride_sv, V_s,        # student logits [B, T, V_s], any strides
    W, stride_wb, stride_wt, stride_wv, V,          # teacher logits, V = min(V_s, V_t)
    LABELS, KAPPA, LOG_W,                           # as in the forward kernel
    LSE_S, LSE_T, ROW_SUM, G,                       # fp32: forward outputs, upstream gradient [B·T]
    GRAD,                                           # output [B·T, V_s], contiguous, logits' dtype
    T, ignore_index, inv_tau,
    KIND: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row, b, t, active, la, lb = _row_setup(LABELS, KAPPA, LOG_W, T, ignore_index)
    scale = tl.where(active, tl.load(G + row), 0.0) * inv_tau
    # A dead row's statistics are not read (they may be NaN from NaN logits): 0 keeps q = a = 0.
    row_sum = tl.load(ROW_SUM + row, mask=scale != 0.0, other=0.0)
    # An infinite S means an infinite value (rkl with q > 0 where p = 0): its gradient is 0, not NaN.
    live = (scale != 0.0) & (row_sum != float("inf")) & (row_sum != float("-inf"))
    n_read = tl.where(live, V, 0)  # columns to read: none when the factor is zero
    m_s, s_s = load_pair(LSE_S, row, live)
    m_t, s_t = load_pair(LSE_T, row, live)
    row_sum = tl.where(live, row_sum, 0.0)
    # Columns ≥ V: q = a = 0, gradient 0.
    divergence_row_gradient(GRAD, row * V_s, S, b * stride_sb + t * stride_st, stride_sv, V_s, n_read,
                            W, b * stride_wb + t * stride_wt, stride_wv, n_read, inv_tau,
                            m_s, s_s, m_t, s_t, la, lb, scale, row_sum, -1, 0.0, KIND, False, BLOCK, VEC)


def _launch_forward(student_logits, teacher_logits, labels, kappa, log_w, value, row_sum, lse_s, lse_t, *, kind,
                    temperature, ignore_index, mode):
    V = min(student_logits.shape[2], teacher_logits.shape[2])
    _divergence_forward_kernel[(labels.numel(),)](
        student_logits, *student_logits.stride(), teacher_logits, *teacher_logits.stride(), V,
        labels, kappa, log_w, value, row_sum, lse_s, lse_t,
        labels.shape[1], ignore_index, 1.0 / temperature,
        KIND=KINDS[kind], BLOCK=vocab_block(V), VEC=row_vector(student_logits, teacher_logits), MODE=mode,
        num_warps=NUM_WARPS,
    )


def forward(student_logits, teacher_logits, labels, kappa, log_w, *, kind, temperature, ignore_index):
    """Forward kernel. ``labels`` contiguous [B, T]; ``kappa`` [B] and ``log_w`` [B, 2] contiguous fp32.

    Returns fp32 ``(value [B·T], row_sum [B·T], lse_s [B·T, 2], lse_t [B·T, 2])``, the last two the
    (max, log-sum) pairs of both rows over the shared vocabulary.
    """
    n = labels.numel()
    value = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    row_sum = torch.empty_like(value)
    lse_s, lse_t = (torch.empty((n, 2), dtype=torch.float32, device=value.device) for _ in range(2))
    _launch_forward(student_logits, teacher_logits, labels, kappa, log_w, value, row_sum, lse_s, lse_t, kind=kind,
                    temperature=temperature, ignore_index=ignore_index, mode=0)
    return value, row_sum, lse_s, lse_t


def pairs(student_logits, teacher_logits, labels, kappa, *, temperature, ignore_index):
    """Pass 1 of the forward only (a vocabulary shard's statistics): fp32 ``(lse_s [B·T, 2],
    lse_t [B·T, 2])``, the (max, log-sum) pairs of both rows over the shared columns
    min(V_s, V_t); (0, 0) at inactive rows (ignored, or κ = 0). Arguments as for :func:`forward`."""
    n = labels.numel()
    lse_s, lse_t = (torch.empty((n, 2), dtype=torch.float32, device=student_logits.device) for _ in range(2))
    # VALUE / ROW_SUM / LOG_W are not accessed in this mode (LOG_W's loads are dead code; the
    # interpreter executes them, so it gets a valid fp32 buffer of at least [B, 2]: lse_s).
    _launch_forward(student_logits, teacher_logits, labels, kappa, lse_s, lse_s, lse_s, lse_s, lse_t, kind="fkl",
                    temperature=temperature, ignore_index=ignore_index, mode=1)
    return lse_s, lse_t


def forward_given_pairs(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, *, kind, temperature,
                        ignore_index):
    """Pass 2 of the forward only, with the rows' (max, log-sum) pairs given (contiguous fp32
    [B·T, 2]: the whole vocabulary's, when the logits are one shard of it): fp32 ``(value [B·T],
    row_sum [B·T])``, the partial Σ_v f-terms and S = Σ_v a_v over these columns; 0 at inactive
    rows. No tvd clamp (a partial sum). Other arguments as for :func:`forward`."""
    n = labels.numel()
    value = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    row_sum = torch.empty_like(value)
    _launch_forward(student_logits, teacher_logits, labels, kappa, log_w, value, row_sum, lse_s, lse_t, kind=kind,
                    temperature=temperature, ignore_index=ignore_index, mode=2)
    return value, row_sum


def backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value, *,
             kind, temperature, ignore_index):
    """Backward kernel; ``grad_value`` is the contiguous fp32 [B·T] upstream gradient of the values,
    ``lse_s``/``lse_t`` the contiguous [B·T, 2] pairs of the forward.

    Returns a new contiguous tensor shaped and typed like ``student_logits``.
    """
    B, T, V_s = student_logits.shape
    V = min(V_s, teacher_logits.shape[2])
    grad = torch.empty((B, T, V_s), dtype=student_logits.dtype, device=student_logits.device)
    _divergence_backward_kernel[(B * T,)](
        student_logits, *student_logits.stride(), V_s, teacher_logits, *teacher_logits.stride(), V,
        labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value, grad,
        T, ignore_index, 1.0 / temperature,
        KIND=KINDS[kind], BLOCK=vocab_block(V_s), num_warps=NUM_WARPS,
        VEC=row_vector(student_logits, teacher_logits, grad, same_extent=V == V_s),
    )
    return grad
