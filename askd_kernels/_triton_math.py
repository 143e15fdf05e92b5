"""Small ``@triton.jit`` building blocks shared by every kernel family.

* :func:`row_logsumexp` — the one online log-sum-exp of the package (SPEC §2: ``logsumexp(z/τ)``).
* :func:`log_mixture` — ``log(α·e^a + (1−α)·e^b)`` in log space, exact at α ∈ {0, 1} (SPEC §2).
* :func:`discounted_add` — the combine of a discounted suffix sum (SPEC §3's G_t).
"""
import triton
import triton.language as tl


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
    """``log(e^{log_a} + e^{log_1ma + x})``, i.e. ``log(α + (1−α)·e^x)`` (SPEC §2's u_t).

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
