"""The ``@triton.jit`` building blocks shared by every kernel family, and the vocabulary block rule.

* :func:`vocab_block` — the block width every vocabulary loop uses (and ``NUM_WARPS``).
* :func:`row_logsumexp` — the one online log-sum-exp of the package: ``logsumexp(z/τ)`` of a row.
* :func:`log_mixture` — ``log(α·e^a + (1−α)·e^b)`` in log space, exact at α ∈ {0, 1}
  (``docs/contract.md`` §2: the mixture term u_t, and log m of the divergences).
* :func:`discounted_add` — the combine of a discounted suffix sum (``docs/contract.md`` §3: G_t).
* :func:`divergence_terms` — per-column value and gradient terms of the full-vocabulary divergences
  (``docs/contract.md`` §6).

:mod:`askd_kernels._torch_math` holds the same math in PyTorch for the CPU paths.
"""
import triton
import triton.language as tl

# Largest vocabulary block one program streams per loop iteration; tests lower it to exercise the
# multi-block loop on small vocabularies under the interpreter.
MAX_BLOCK = 4096
NUM_WARPS = 8


def vocab_block(n_cols: int) -> int:
    """Block width for a row of ``n_cols`` entries: a power of two in [16, MAX_BLOCK]."""
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(n_cols)))


@triton.jit
def row_logsumexp(row_ptr, stride_v, n_cols, n_blocks, inv_tau, BLOCK: tl.constexpr):
    """Online log-sum-exp of ``row[0:n_cols] * inv_tau`` in fp32.

    Visits ``n_blocks`` blocks of ``BLOCK`` columns (pass 0 to skip the row: the result is then
    −inf). The running maximum is a scalar per block (one reduction per block) while the rescaled
    sum stays a vector, so each element costs one ``exp``. Entries equal to −inf (masked
    vocabulary) contribute 0; a row that is −inf everywhere returns −inf, never NaN.
    """
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_blocks):
        offs = i * BLOCK + cols
        x = tl.load(row_ptr + offs * stride_v, mask=offs < n_cols, other=float("-inf"))
        x = x.to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While everything seen is −inf, shift by 0 instead of −inf to avoid (−inf) − (−inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift + tl.log(tl.sum(acc, axis=0))


@triton.jit
def log_mixture(log_a, log_1ma, x):
    """``log(e^{log_a} + e^{log_1ma + x})``, i.e. ``log(α + (1−α)·e^x)`` (the mixture term u_t).

    ``log_a``/``log_1ma`` are log α and log(1−α) and may be −inf, which makes α = 0 and α = 1
    exact (u = x and u = 0). Returns −inf only when both terms are −inf.
    """
    y = log_1ma + x
    hi = tl.maximum(log_a, y)
    lo = tl.minimum(log_a, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi + tl.log(1.0 + tl.exp(lo - hi_safe))


@triton.jit
def discounted_add(v_later, f_later, v_earlier, f_earlier):
    """Combine of the suffix recurrence ``G_t = v_t + f_t · G_{t+1}`` for a reverse scan.

    A segment is summarised by ``(v, f)`` with ``G_start = v + f · G_after``; composing an earlier
    segment with the later one that follows it gives ``(v_e + f_e · v_l, f_e · f_l)``.
    """
    return v_earlier + f_earlier * v_later, f_earlier * f_later


@triton.jit
def divergence_terms(x, y, la, lb, KIND: tl.constexpr):
    """``(f-terms, a, q)`` of a block of columns for the divergence ``KIND``.

    ``x = log q``, ``y = log p`` (−inf for a probability of 0), ``la``/``lb`` the log weights of q
    and p in the mixture m = w_q·q + w_p·p, with log m = log_mixture(la + x, lb, y) — never
    log(p + q) — and (w_q, w_p) = (α, 1−α) for skl/srkl, (1−β, β) for jsd. The value of a token is
    Σ_v f-terms; its gradient w.r.t. the student logits follows from a_v = q_v·∂f/∂q_v by the
    softmax Jacobian: ∂f/∂z_v = (a_v − q_v·Σ_u a_u)/τ.

        KIND      f-terms of column v                        a_v
        0 fkl     p (y − x)                                  −p
        1 rkl     q (x − y)                                  q (x − y)
        2 skl     p (y − log m)                              −p · α q/m
        3 srkl    q (x − log m)                              q (x − log m + (1−α) p/m)
        4 jsd     β p (y − log M) + (1−β) q (x − log M)      (1−β) q (x − log M)
        5 tvd     ½ |p − q|                                  ½ q sign(q − p)

    rkl drops the constant 1 of ∂f/∂q_v (adding c·q_v to every a_v leaves the gradient unchanged);
    srkl's a_v is the full q·∂f/∂q including the dependence of m on q, with 1 − α q/m written as
    (1−α) p/m so that α = 1 gives exactly 0; jsd is for 0 < β < 1 only; tvd's subgradient is 0 at
    ties. Every term is guarded so that 0·log 0 = 0 (p_v = 0 or q_v = 0 from −inf logits or from
    the padding of a block), and ratios like α q/m are formed as exp(log α + x − log m), exact at
    α ∈ {0, 1}. Columns with x = y = −inf give (0, 0, 0).

    KIND is a ``tl.constexpr``: each kind compiles to its own specialisation holding only its own
    math (no per-element selects over six formulas, fewer live registers).
    """
    q = tl.exp(x)
    p = tl.exp(y)
    if KIND == 0:
        value = tl.where(p > 0.0, p * (y - x), 0.0)
        a = -p
    elif KIND == 1:
        value = tl.where(q > 0.0, q * (x - y), 0.0)
        a = value
    elif KIND == 5:
        value = 0.5 * tl.abs(p - q)
        a = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    else:
        log_m = log_mixture(la + x, lb, y)
        if KIND == 2:
            value = tl.where(p > 0.0, p * (y - log_m), 0.0)
            # α q/m; at α = 0 exp(−inf) = 0. Both p, q > 0 keeps log m finite.
            a = tl.where((p > 0.0) & (q > 0.0), -p * tl.exp(la + x - log_m), 0.0)
        elif KIND == 3:
            d = x - log_m
            skew = tl.where(p > 0.0, tl.exp(lb + y - log_m), 0.0)  # (1−α) p/m
            value = tl.where(q > 0.0, q * d, 0.0)
            a = tl.where(q > 0.0, q * (d + skew), 0.0)
        else:
            a = tl.where(q > 0.0, tl.exp(la) * q * (x - log_m), 0.0)
            value = tl.where(p > 0.0, tl.exp(lb) * p * (y - log_m), 0.0) + a
    return value, a, q
