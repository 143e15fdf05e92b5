"""Stage (b) — per-sequence coefficients: suffix scans over the valid positions (``docs/contract.md`` §3–4).

From the per-token ``ℓ_t`` and ``log q_t`` of stage (a), one program per sequence computes

    u_t = log(α + (1−α)·e^{ℓ_t})          ρ_t = α q_t / m_t = exp(log α − u_t)
    G_t = Σ_{t'≥t} γ^k u_{t'}             (k counts valid positions; optional length normalisation
                                           divides by Σ_{t'≥t} γ^k)
    P_t = exp(Σ_{t'≥t} log ρ_{t'})
    X   = Σ_t ℓ_t + log(1−α) − log α      (``sequence`` estimator, via U = log α + softplus(X))

and from them λ_t for the chosen estimator (``exact``: TGO ρ_t, SGO G_t + ρ_t − 1; ``paper``: TGO P_t,
SGO G_t + P_t − 1; ``sequence``: TGO σ(−X), SGO U + σ(−X) − 1), the importance weight
w_t = min(exp(log q_t − log q_old,t), w_max) of SGOs, κ_b, and the per-sequence value

    D_b = Σ_t (ℓ_t − u_t) on a TGO, −Σ_t u_t on an SGO   (``sequence``: Σ_t ℓ_t − U, −U)   (§4)

A TGO's ℓ_t − u_t = log(p_t/m_t) is formed as −log((1−α) + α·e^{−ℓ_t}), not as a difference: a
student logit of −inf at the label (q_t = 0, ℓ_t = +inf) then gives the exact −log(1−α) instead of
∞ − ∞. Every min/max propagates NaN, so NaN inputs give NaN outputs.

Outputs ``lam`` (λ_t), ``coef`` (κ_b·w_t·λ_t, the factor of the gradient) and ``value`` (κ_b·D_b).
All sums run in fp32 over chunks of ``BLOCK_T`` positions from the end of the sequence backwards,
carrying the suffix state between chunks, so any T fits in registers.
"""
import torch
import triton
import triton.language as tl

from .._triton_math import discounted_add, log_mixture

ESTIMATORS = {"exact": 0, "paper": 1, "sequence": 2, "rao_blackwell": 3}
BLOCK_T = 1024
NUM_WARPS = 4


@triton.jit
def _coefficients_kernel(
    LOG_Q, LOG_RATIO, LOG_Q_OLD, LABELS,            # [B·T]; LOG_Q_OLD may alias LOG_Q (weight 1)
    FV_VALUE, BASELINE,                             # [B·T] fp32 (FV_VALUE read only for rao_blackwell)
    ALPHA, SGO, KAPPA,                              # [B] fp32, int32, fp32
    LAM, COEF, RET, VALUE,                          # outputs [B·T], [B·T], [B·T], [B]
    T, ignore_index, gamma, w_max, estimator, length_normalize,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    alpha = tl.load(ALPHA + b)
    sgo = tl.load(SGO + b) != 0
    kappa = tl.load(KAPPA + b)
    log_a = tl.log(alpha)          # −inf at α = 0: keeps the boundaries exact
    log_1ma = tl.log(1.0 - alpha)  # −inf at α = 1
    pos = tl.arange(0, BLOCK_T)
    base = b * T
    n_chunks = tl.cdiv(T, BLOCK_T)

    # Pass 1: Σ_t ℓ_t for the sequence-level estimator (O(T) reads of one fp32 vector).
    sum_l = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c in range(0, n_chunks):
        offs = c * BLOCK_T + pos
        lab = tl.load(LABELS + base + offs, mask=offs < T, other=ignore_index)
        sum_l += tl.load(LOG_RATIO + base + offs, mask=(offs < T) & (lab != ignore_index), other=0.0)
    sum_l = tl.sum(sum_l, axis=0)
    sum_l_m = tl.where(log_1ma == float("-inf"), tl.minimum(sum_l, 0.0, propagate_nan=tl.PropagateNan.ALL), sum_l)
    u_seq = log_mixture(log_a, log_1ma, sum_l_m)  # α = 1: as ell_m below
    sig_seq = tl.exp(log_a - u_seq)

    # Pass 2: suffix scans, last chunk first, carrying G, Σγ^k and Σ log ρ of everything after it.
    g_after = 0.0
    n_after = 0.0
    log_p_after = 0.0
    sum_d = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c in range(0, n_chunks):
        offs = (n_chunks - 1 - c) * BLOCK_T + pos
        lab = tl.load(LABELS + base + offs, mask=offs < T, other=ignore_index)
        valid = (offs < T) & (lab != ignore_index)
        ell = tl.load(LOG_RATIO + base + offs, mask=valid, other=0.0)
        # At α = 1 the mixture ignores ℓ (u = 0), even ℓ = +inf (q = 0 at the label): min(ℓ, 0) keeps
        # u exact there and still carries a NaN.
        ell_m = tl.where(log_1ma == float("-inf"), tl.minimum(ell, 0.0, propagate_nan=tl.PropagateNan.ALL), ell)
        u = tl.where(valid, log_mixture(log_a, log_1ma, ell_m), 0.0)
        log_rho = tl.where(valid, log_a - u, 0.0)
        rho = tl.exp(log_rho)
        factor = tl.where(valid, gamma, 1.0)
        g_in, f_in = tl.associative_scan((u, factor), axis=0, combine_fn=discounted_add, reverse=True)
        n_in, _ = tl.associative_scan((valid.to(tl.float32), factor), axis=0, combine_fn=discounted_add,
                                      reverse=True)
        g = g_in + f_in * g_after
        n_rem = n_in + f_in * n_after
        log_p = tl.cumsum(log_rho, axis=0, reverse=True) + log_p_after
        if length_normalize:
            g = g / tl.where(valid, n_rem, 1.0)

        # The return that multiplies ∇log q(y_t) on an SGO: G_t, or F_t = G_t − u_t for rao_blackwell
        # (whose t' = t part is the full-vocabulary term of stage (a)); minus the baseline if any.
        ret = tl.where(estimator == 3, g - u, tl.where(estimator == 2, 0.0, g))
        baseline = tl.load(BASELINE + base + offs, mask=valid, other=0.0)
        lam_tgo = tl.where(estimator == 0, rho, tl.where(estimator == 1, tl.exp(log_p),
                                                         tl.where(estimator == 2, sig_seq, 0.0)))
        lam_sgo = tl.where(estimator == 0, ret - baseline + rho - 1.0,
                           tl.where(estimator == 1, g + tl.exp(log_p) - 1.0,
                                    tl.where(estimator == 2, u_seq + sig_seq - 1.0, ret - baseline)))
        log_q = tl.load(LOG_Q + base + offs, mask=valid, other=0.0)
        log_q_old = tl.load(LOG_Q_OLD + base + offs, mask=valid, other=0.0)
        weight = tl.minimum(tl.exp(log_q - log_q_old), w_max, propagate_nan=tl.PropagateNan.ALL)
        weight = tl.where(log_q == log_q_old, 1.0, weight)  # a ratio of 1, even for q = q_old = 0
        lam = tl.where(sgo, lam_sgo, lam_tgo)
        coef = tl.where(sgo, weight, 1.0) * lam * kappa
        tl.store(LAM + base + offs, tl.where(valid, lam, 0.0), mask=offs < T)
        tl.store(RET + base + offs, tl.where(valid, ret, 0.0), mask=offs < T)
        tl.store(COEF + base + offs, tl.where(valid, tl.where(kappa != 0.0, coef, 0.0), 0.0), mask=offs < T)

        first = pos == 0
        g_after = tl.sum(tl.where(first, g_in + f_in * g_after, 0.0), axis=0)
        n_after = tl.sum(tl.where(first, n_rem, 0.0), axis=0)
        log_p_after = tl.sum(tl.where(first, log_p, 0.0), axis=0)
        d_tok = tl.where(sgo, -u, -log_mixture(log_1ma, log_a, -ell))
        if estimator == 3:  # the value never reads the label: a NaN log q (label out of range) must show
            d_tok = tl.load(FV_VALUE + base + offs, mask=valid, other=0.0)
            d_tok = tl.where(log_q != log_q, log_q, d_tok)
        sum_d += tl.where(valid, d_tok, 0.0)

    d_seq = tl.where(sgo, -u_seq, -log_mixture(log_1ma, log_a, -sum_l))
    d = tl.where(estimator == 2, d_seq, tl.sum(sum_d, axis=0))
    tl.store(VALUE + b, tl.where(kappa != 0.0, kappa * d, 0.0))


def coefficients(log_q, log_ratio, log_q_old, labels, alpha, sgo, kappa, *, estimator, gamma, w_max,
                 length_normalize, ignore_index, fv_value=None, baseline=None):
    """Launch stage (b). Inputs are contiguous; ``fv_value`` [B·T] (stage (a)'s full-vocabulary
    values) is required by ``rao_blackwell``; ``baseline`` [B·T] is subtracted from the SGO return.
    Returns ``(lam [B·T], coef [B·T], ret [B·T], value [B])``, ``ret`` the SGO return before the
    baseline (G_t, or F_t for ``rao_blackwell``; 0 for ``sequence``)."""
    B, T = labels.shape
    lam, coef, ret = (torch.empty_like(log_q) for _ in range(3))
    value = torch.empty(B, dtype=torch.float32, device=log_q.device)
    block_t = min(BLOCK_T, max(16, triton.next_power_of_2(T)))
    _coefficients_kernel[(B,)](
        log_q, log_ratio, log_q_old, labels,
        log_ratio if fv_value is None else fv_value,  # an unread placeholder unless rao_blackwell
        torch.zeros_like(log_q) if baseline is None else baseline,
        alpha, sgo, kappa, lam, coef, ret, value,
        T, ignore_index, float(gamma), float(w_max), ESTIMATORS[estimator], int(length_normalize),
        BLOCK_T=block_t, num_warps=NUM_WARPS,
    )
    return lam, coef, ret, value
