"""The ``@triton.jit`` building blocks shared by every kernel family, and the vocabulary block rule.

* :func:`vocab_block` — the block width every vocabulary loop uses (and ``NUM_WARPS``).
* :func:`row_logsumexp` — the one online log-sum-exp of the package: ``logsumexp(z/τ)`` of a row, as
  a (max, log-sum) pair, and :func:`log_softmax_at`, a log-probability from that pair.
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
    """Online log-sum-exp of ``row[0:n_cols] / τ`` in fp32, returned as a pair ``(m, s)``:

        m = max_v z_v  (of the raw logits)        s = log Σ_v exp((z_v − m)/τ)

    so that ``logsumexp(z/τ) = m/τ + s`` and a log-probability is ``(z_v − m)/τ − s``
    (:func:`log_softmax_at`). The pair is never folded into one number: with |m| large, ``m/τ + s``
    in fp32 would lose the low bits of ``s`` (at |m| = 10⁶ its ulp is 0.06), while ``z_v − m`` is
    exact for nearby values and ``(z_v − m)/τ`` cannot overflow for tiny τ the way ``z_v/τ`` can.
    So every result is invariant to adding a constant to the row, like a plain fp32 log_softmax.

    Visits ``n_blocks`` blocks of ``BLOCK`` columns (pass 0 to skip the row: m = s = −inf). The
    running maximum is a scalar per block while the rescaled sum stays a vector, so each element
    costs one ``exp``. Entries equal to −inf (masked vocabulary) contribute 0; a row that is −inf
    everywhere gives s = −inf; a NaN anywhere gives NaN.
    """
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_blocks):
        offs = i * BLOCK + cols
        x = tl.load(row_ptr + offs * stride_v, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While everything seen is −inf, shift by 0 instead of −inf to avoid (−inf) − (−inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp((m - shift) * inv_tau) + tl.exp((x - shift) * inv_tau)
        m = m_new
    return m, tl.log(tl.sum(acc, axis=0))


@triton.jit
def log_softmax_at(x, m, s, inv_tau):
    """``log softmax(z/τ)`` at raw logits ``x`` of a row with :func:`row_logsumexp` pair ``(m, s)``."""
    return (x.to(tl.float32) - m) * inv_tau - s


@triton.jit
def store_pair(PAIRS, row, keep, m, s):
    """Store a row's (max, log-sum) pair at ``PAIRS[row]`` of an fp32 [n, 2] tensor; (0, 0) where not
    ``keep`` (ignored rows: nothing reads them, and 0 keeps every output finite)."""
    tl.store(PAIRS + 2 * row, tl.where(keep, m, 0.0))
    tl.store(PAIRS + 2 * row + 1, tl.where(keep, s, 0.0))


@triton.jit
def load_pair(PAIRS, row, live):
    """A row's (max, log-sum) pair from an fp32 [n, 2] tensor; (0, 0) without reading where not ``live``."""
    return tl.load(PAIRS + 2 * row, mask=live, other=0.0), tl.load(PAIRS + 2 * row + 1, mask=live, other=0.0)


@triton.jit
def log_mixture(log_a, log_1ma, x):
    """``log(e^{log_a} + e^{log_1ma + x})``, i.e. ``log(α + (1−α)·e^x)`` (the mixture term u_t).

    ``log_a``/``log_1ma`` are log α and log(1−α) and may be −inf, which makes α = 0 and α = 1
    exact (u = x and u = 0). Returns −inf only when both terms are −inf, NaN when any input is NaN
    (and for log_1ma = −inf with x = +inf: callers where x can be +inf pass ``min(x, 0)`` at α = 1).
    """
    y = log_1ma + x
    # NaN in → NaN out: the default maximum/minimum would drop a NaN operand.
    hi = tl.maximum(log_a, y, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(log_a, y, propagate_nan=tl.PropagateNan.ALL)
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
    # 0·log 0 = 0 guards test "== 0", never "> 0", so that a NaN probability stays NaN.
    if KIND == 0:
        value = tl.where(p == 0.0, 0.0, p * (y - x))
        a = -p
    elif KIND == 1:
        value = tl.where(q == 0.0, 0.0, q * (x - y))
        a = value
    elif KIND == 5:
        value = 0.5 * tl.abs(p - q)
        # the last branch is 0·(q − p): 0 at ties, NaN when either probability is NaN
        a = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0 * (q - p)))
    else:
        log_m = log_mixture(la + x, lb, y)
        if KIND == 2:
            value = tl.where(p == 0.0, 0.0, p * (y - log_m))
            # α q/m; at α = 0 exp(−inf) = 0. Both p, q > 0 keeps log m finite.
            a = tl.where((p == 0.0) | (q == 0.0), 0.0, -p * tl.exp(la + x - log_m))
        elif KIND == 3:
            d = x - log_m
            skew = tl.where(p == 0.0, 0.0, tl.exp(lb + y - log_m))  # (1−α) p/m
            value = tl.where(q == 0.0, 0.0, q * d)
            a = tl.where(q == 0.0, 0.0, q * (d + skew))
        else:
            a = tl.where(q == 0.0, 0.0, tl.exp(la) * q * (x - log_m))
            value = tl.where(p == 0.0, 0.0, tl.exp(lb) * p * (y - log_m)) + a
    return value, a, q


@triton.jit
def block_log_probs(s_row, stride_sv, n_s, w_row, stride_wv, n_t, offs, inv_tau, m_s, s_s, m_t, s_t):
    """log q and log p at the columns ``offs`` of a student row and a teacher row, from their
    (max, log-sum) pairs; student columns ≥ ``n_s`` and teacher columns ≥ ``n_t`` are not read and
    give −inf (probability 0)."""
    z = tl.load(s_row + offs * stride_sv, mask=offs < n_s, other=float("-inf"))
    w = tl.load(w_row + offs * stride_wv, mask=offs < n_t, other=float("-inf"))
    return log_softmax_at(z, m_s, s_s, inv_tau), log_softmax_at(w, m_t, s_t, inv_tau)


@triton.jit
def divergence_row_sums(s_row, stride_sv, n_s, w_row, stride_wv, n_t, n_blocks, inv_tau, m_s, s_s, m_t, s_t,
                        la, lb, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """``(Σ_v f-terms, S = Σ_v a_v)`` of :func:`divergence_terms` over ``n_blocks`` blocks of a row
    pair (see :func:`block_log_probs` for ``n_s``/``n_t``): a token's full-vocabulary value and the
    statistic its gradient needs. Scalar accumulators (one reduction per block): vector ones would
    keep 2·BLOCK/threads more registers live, which spills the heaviest kinds at the largest block."""
    cols = tl.arange(0, BLOCK)
    value = tl.zeros([], dtype=tl.float32)
    row_sum = tl.zeros([], dtype=tl.float32)
    for i in range(0, n_blocks):
        x, y = block_log_probs(s_row, stride_sv, n_s, w_row, stride_wv, n_t, i * BLOCK + cols, inv_tau,
                               m_s, s_s, m_t, s_t)
        v, a, _q = divergence_terms(x, y, la, lb, KIND)
        value += tl.sum(v, axis=0)
        row_sum += tl.sum(a, axis=0)
    return value, row_sum


@triton.jit
def divergence_row_gradient(g_row, s_row, stride_sv, V_s, n_s, w_row, stride_wv, n_t, inv_tau, m_s, s_s, m_t, s_t,
                            la, lb, scale, row_sum, label, scale_label, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Write one gradient row ``scale·(a_v − q_v·S) + scale_label·(q_v − 1[v = label])`` over the
    student's ``V_s`` columns into ``g_row`` (in its dtype), with a_v, q_v of :func:`divergence_terms`
    and S = ``row_sum``: the full-vocabulary divergence's gradient (``scale`` = g/τ) plus a
    sampled-token REINFORCE term (``scale_label`` = c/τ; pass 0 and label −1 for none). The
    divergence part is exactly 0 where ``scale`` is 0 (a dead row, or an infinite S whose a_v are
    infinite). Columns ≥ ``n_s`` / ``n_t`` are not read (see :func:`block_log_probs`)."""
    cols = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(V_s, BLOCK)):
        offs = i * BLOCK + cols
        x, y = block_log_probs(s_row, stride_sv, n_s, w_row, stride_wv, n_t, offs, inv_tau, m_s, s_s, m_t, s_t)
        _v, a, q = divergence_terms(x, y, la, lb, KIND)
        grad = tl.where(scale != 0.0, scale * (a - q * row_sum), 0.0)
        grad += scale_label * (q - tl.where(offs == label, 1.0, 0.0))
        tl.store(g_row + offs, grad.to(g_row.dtype.element_ty), mask=offs < V_s)
