"""The ``@triton.jit`` building blocks shared by every kernel family, and the vocabulary block rule.

* :func:`vocab_block` — the block width every vocabulary loop uses (and ``NUM_WARPS``).
* :func:`row_logsumexp` — the one online log-sum-exp of the package: ``logsumexp(z/τ)`` of a row, as
  a (max, log-sum) pair (:func:`row_pair_logsumexp`: two rows in one pass), and
  :func:`log_softmax_at` / :func:`log2_softmax_at`, a (base-2) log-probability from that pair.
* :func:`row_vector`, :func:`row_span`, :func:`edge_columns` — the aligned main loop of every
  vocabulary pass: rows at any offset (V % 16 != 0) start their loop at the first 16-byte boundary,
  so its loads and stores are 128-bit; the head before it and the tail after it (< 2·VEC columns)
  are one masked edge block.
* :func:`log_mixture` — ``log(α·e^a + (1−α)·e^b)`` in log space, exact at α ∈ {0, 1}
  (``docs/contract.md`` §2: the mixture term u_t); :func:`log2_mixture`, log2 m = log2(α·q + (1−α)·p)
  of the divergences, summed directly, exact at α ∈ {0, 1} by the row's :func:`mixture_weights`.
* :func:`discounted_add` — the combine of a discounted suffix sum (``docs/contract.md`` §3: G_t).
* :func:`divergence_terms` — per-column value and gradient terms of the full-vocabulary divergences
  (``docs/contract.md`` §6), in base 2; :func:`divergence_row_sums` / :func:`divergence_row_gradient`
  stream them over a row pair.

The vocabulary loops work in base 2 (``exp2``/``log2`` with log2(e)/τ folded into one per-row scale)
and convert to natural units once per row.

:mod:`askd_kernels._torch_math` holds the same math in PyTorch for the CPU paths.
"""
import os

import triton
import triton.language as tl

# Largest vocabulary block one program streams per loop iteration; tests lower it to exercise the
# multi-block loop on small vocabularies under the interpreter.
MAX_BLOCK = 4096
NUM_WARPS = 8


def vocab_block(n_cols: int) -> int:
    """Block width for a row of ``n_cols`` entries: a power of two in [16, MAX_BLOCK]."""
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(n_cols)))


# log2(e) and ln 2: the vocabulary loops work in base 2 (one MUFU.EX2 per exp2, where a
# natural exp is a multiply plus a non-flushing ex2 with its subnormal fix-up), the scale folded into
# one per-row constant; results are converted back to natural units once per row.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# −2^100: a floor for base-2 logs (of the mixture, in ratios) far below any finite log-probability a
# ratio can use, so that exp2(−inf − floor) = 0 where exp2(−inf − (−inf)) would be NaN
LOG2_FLOOR: tl.constexpr = tl.constexpr(-1.2676506002282294e30)


# log2 by the hardware's approximation (one MUFU.LG2, ``lg2.approx.ftz.f32``) in the divergence terms
# where the kernels are compiled; the interpreter has no inline assembly and uses np.log2.
# tests/test_fast_log.py runs the divergence checks against the fp64 oracle with the approximation's
# documented error injected at its worst sign.
FAST_LOG2: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"))


@triton.jit
def fast_log2(v):
    """``log2(v)`` of a non-negative fp32 (−inf at 0, NaN for NaN): one MUFU.LG2 where compiled
    (absolute error ≤ 2^-22 for v in [0.5, 2], ≤ 2 ulp of the result elsewhere: CUDA C Programming
    Guide, ``__log2f``), np.log2 under the interpreter."""
    if FAST_LOG2:
        r = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = tl.log2(v)
    return r


def row_vector(anchor, *others, same_extent: bool = True) -> int:
    """``VEC`` of the kernels' aligned main loop: the elements of 16 bytes of ``anchor``'s dtype when
    its innermost stride is 1 and every tensor of ``others`` that is streamed in the same loop (same
    dtype size, innermost stride 1) starts each row at the same offset modulo 16 bytes — its outer
    strides congruent to the anchor's modulo VEC —, so that one head count aligns them all; 1 (a plain
    masked loop, any strides) otherwise, or when the tensors' extents in the loop differ
    (``same_extent=False``). Host-side, from strides only: no sync."""
    vec = 16 // anchor.element_size()
    if not same_extent or anchor.stride(-1) != 1:
        return 1
    for t in others:
        if t.element_size() != anchor.element_size() or t.stride(-1) != 1:
            return 1
        if any((a - b) % vec for a, b in zip(t.stride()[:-1], anchor.stride()[:-1])):
            return 1
    return vec


@triton.jit
def row_span(row_off, n_cols, VEC: tl.constexpr):
    """``(start, h, L)`` of a row at element offset ``row_off`` (int64) of a 16-byte aligned base, with
    ``n_cols`` columns: ``start`` = the first offset ≥ ``row_off`` that is a multiple of ``VEC`` (the
    compiler reads that from the arithmetic: no hint to trust), ``h`` = start − row_off the head
    columns before it (≤ n_cols), ``L`` the length, a multiple of VEC, of the aligned main region
    [h, h + L). The columns left, [0, h) and [h + L, n_cols) (fewer than 2·VEC), are the edge
    (:func:`edge_columns`). VEC = 1: start = row_off, h = 0, L = n_cols (no edge)."""
    start = (row_off + (VEC - 1)) // VEC * VEC
    h = tl.minimum((start - row_off).to(tl.int32), n_cols)
    return start, h, (n_cols - h) // VEC * VEC


@triton.jit
def main_len(h, n, VEC: tl.constexpr):
    """Length of the aligned main region of a stream with ``n`` columns to read in a row whose span has
    head ``h``: a multiple of VEC (0 when n ≤ h)."""
    return tl.maximum(n - h, 0) // VEC * VEC


@triton.jit
def edge_columns(h, L, VEC: tl.constexpr):
    """The 2·VEC edge lanes of a row: lanes [0, VEC) are the head columns (valid below ``h``), lanes
    [VEC, 2·VEC) the tail columns h + L + j (valid below the stream's column count). Returns
    ``(cols, head_or_tail)``; a lane reads where ``head_or_tail & (cols < n)``."""
    lanes = tl.arange(0, 2 * VEC)
    tail = lanes >= VEC
    cols = tl.where(tail, h + L + lanes - VEC, lanes)
    return cols, tail | (lanes < h)


@triton.jit
def load_main(X, start, i, read, BLOCK: tl.constexpr, MASKED: tl.constexpr = False):
    """Block ``i`` of a row's aligned main region — columns start + i·BLOCK + [0, BLOCK), all inside the
    row; ``start`` a multiple of 16 bytes, innermost stride 1 — in fp32: no per-column mask, 128-bit
    loads. ``MASKED``: only where the scalar ``read`` holds (−inf elsewhere), a per-row predicate.
    bf16 is read as 32-bit words, each split into its two columns by one shift and one AND (the
    bf16 bits are the fp32's high half): 2 instructions per pair where a per-element conversion
    takes 3."""
    if X.dtype.element_ty == tl.bfloat16:
        lanes = tl.arange(0, BLOCK // 2)
        ptrs = X.to(tl.pointer_type(tl.int32), bitcast=True) + start // 2 + i * (BLOCK // 2) + lanes
        if MASKED:  # the mask is loop-invariant: computed once, outside the loop
            words = tl.load(ptrs, mask=lanes < tl.where(read, BLOCK // 2, 0), other=-8323200)  # 0xff80ff80: 2 × −inf
        else:
            words = tl.load(ptrs)
        lo = (words << 16).to(tl.float32, bitcast=True)
        hi = (words & -65536).to(tl.float32, bitcast=True)
        x = tl.join(lo, hi).reshape([BLOCK])
    else:
        lanes = tl.arange(0, BLOCK)
        ptrs = X + start + i * BLOCK + lanes
        if MASKED:
            x = tl.load(ptrs, mask=lanes < tl.where(read, BLOCK, 0), other=float("-inf")).to(tl.float32)
        else:
            x = tl.load(ptrs).to(tl.float32)
    return x


@triton.jit
def _lse_block(m, acc, x, k):
    """One online log-sum-exp step of a block ``x`` (fp32) with base-2 scale ``k`` = log2(e)/τ."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While everything seen is −inf, shift by 0 instead of −inf to avoid (−inf) − (−inf).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, acc * tl.exp2((m - shift) * k) + tl.exp2((x - shift) * k)


@triton.jit
def _lse_edge(X, row_off, stride_v, n_cols, h, L, k, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """(m, acc) of the online log-sum-exp after the edge columns of a row (acc: a [BLOCK] vector
    holding their rescaled sum in lane 0), or the empty state when VEC = 1 (no edge)."""
    m = tl.full([], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if VEC > 1:
        ecols, eok = edge_columns(h, L, VEC)
        xe = tl.load(X + row_off + ecols * stride_v, mask=eok & (ecols < n_cols),
                     other=float("-inf")).to(tl.float32)
        m, acc_e = _lse_block(m, tl.zeros([2 * VEC], dtype=tl.float32), xe, k)
        acc = tl.where(tl.arange(0, BLOCK) == 0, tl.sum(acc_e, axis=0), 0.0)
    return m, acc


@triton.jit
def row_logsumexp(X, row_off, stride_v, n_cols, inv_tau, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Online log-sum-exp of ``row[0:n_cols] / τ`` in fp32 (the row at element offset ``row_off`` of
    ``X``), returned as a pair ``(m, s)``:

        m = max_v z_v  (of the raw logits)        s = log Σ_v exp((z_v − m)/τ)

    so that ``logsumexp(z/τ) = m/τ + s`` and a log-probability is ``(z_v − m)/τ − s``
    (:func:`log_softmax_at`). The pair is never folded into one number: with |m| large, ``m/τ + s``
    in fp32 would lose the low bits of ``s`` (at |m| = 10⁶ its ulp is 0.06), while ``z_v − m`` is
    exact for nearby values and ``(z_v − m)/τ`` cannot overflow for tiny τ the way ``z_v/τ`` can.
    So every result is invariant to adding a constant to the row, like a plain fp32 log_softmax.

    Pass ``n_cols`` = 0 to skip the row (m = s = −inf). The edge columns (:func:`row_span`) go first,
    then the aligned main loop, whose loads are VEC-wide (128-bit) for any row length. The running
    maximum is a scalar per block while the rescaled sum stays a vector, so each element costs one
    ``exp2`` (the scale log2(e)/τ folded in). Entries equal to −inf (masked vocabulary) contribute 0;
    a row that is −inf everywhere gives s = −inf; a NaN anywhere gives NaN.
    """
    k = inv_tau * LOG2E
    start, h, L = row_span(row_off, n_cols, VEC)
    m, acc = _lse_edge(X, row_off, stride_v, n_cols, h, L, k, BLOCK, VEC)
    cols = tl.arange(0, BLOCK)
    if VEC > 1:  # full blocks unmasked, then the partial last block
        n_full = L // BLOCK
        for i in range(0, n_full):
            m, acc = _lse_block(m, acc, load_main(X, start, i, True, BLOCK), k)
        if n_full * BLOCK < L:
            offs = n_full * BLOCK + cols
            x = tl.load(X + start + offs, mask=offs < L, other=float("-inf")).to(tl.float32)
            m, acc = _lse_block(m, acc, x, k)
    else:
        for i in range(0, tl.cdiv(L, BLOCK)):
            offs = i * BLOCK + cols
            x = tl.load(X + start + offs * stride_v, mask=offs < L, other=float("-inf")).to(tl.float32)
            m, acc = _lse_block(m, acc, x, k)
    return m, tl.log(tl.sum(acc, axis=0))


@triton.jit
def row_pair_logsumexp(S, s_off, stride_sv, W, w_off, stride_wv, n_cols, inv_tau, BLOCK: tl.constexpr,
                       VEC: tl.constexpr):
    """:func:`row_logsumexp` of a student row and a teacher row of the same length in one pass (both
    rows' loads of a block issued together): ``(m_s, s_s, m_t, s_t)``. With VEC > 1 the two rows
    must start at the same offset modulo VEC (:func:`row_vector`)."""
    k = inv_tau * LOG2E
    start, h, L = row_span(s_off, n_cols, VEC)
    w_start = (w_off + (VEC - 1)) // VEC * VEC  # = w_off + h: congruent rows (row_vector)
    m_s, acc_s = _lse_edge(S, s_off, stride_sv, n_cols, h, L, k, BLOCK, VEC)
    m_t, acc_t = _lse_edge(W, w_off, stride_wv, n_cols, h, L, k, BLOCK, VEC)
    cols = tl.arange(0, BLOCK)
    if VEC > 1:  # full blocks unmasked, then the partial last block
        n_full = L // BLOCK
        for i in range(0, n_full):
            z = load_main(S, start, i, True, BLOCK)
            w = load_main(W, w_start, i, True, BLOCK)
            m_s, acc_s = _lse_block(m_s, acc_s, z, k)
            m_t, acc_t = _lse_block(m_t, acc_t, w, k)
        if n_full * BLOCK < L:
            offs = n_full * BLOCK + cols
            z = tl.load(S + start + offs, mask=offs < L, other=float("-inf")).to(tl.float32)
            w = tl.load(W + w_start + offs, mask=offs < L, other=float("-inf")).to(tl.float32)
            m_s, acc_s = _lse_block(m_s, acc_s, z, k)
            m_t, acc_t = _lse_block(m_t, acc_t, w, k)
    else:
        for i in range(0, tl.cdiv(L, BLOCK)):
            offs = i * BLOCK + cols
            z = tl.load(S + start + offs * stride_sv, mask=offs < L, other=float("-inf")).to(tl.float32)
            w = tl.load(W + w_start + offs * stride_wv, mask=offs < L, other=float("-inf")).to(tl.float32)
            m_s, acc_s = _lse_block(m_s, acc_s, z, k)
            m_t, acc_t = _lse_block(m_t, acc_t, w, k)
    return m_s, tl.log(tl.sum(acc_s, axis=0)), m_t, tl.log(tl.sum(acc_t, axis=0))


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
def mixture_weights(la, lb):
    """Per-row weights ``(w_q, w_p)`` = (α, 1−α) of :func:`log2_mixture` from the base-2 log weights
    ``la`` = log2 α, ``lb`` = log2(1−α): (2^la, 2^lb) when both are finite (0 < α < 1), (0, 0) at the
    endpoints α ∈ {0, 1} (one of them −inf), or when either is NaN. Once per row, before the loop."""
    interior = (la > float("-inf")) & (lb > float("-inf"))
    return tl.where(interior, tl.exp2(la), 0.0), tl.where(interior, tl.exp2(lb), 0.0)


@triton.jit
def log2_mixture(x, y, q, p, la, lb, wq, wp):
    """``log2 m``, m = α·q + (1−α)·p, of a block of columns: ``x = log2 q``, ``y = log2 p`` (−inf for a
    probability of 0) and q = 2^x, p = 2^y; ``la`` / ``lb`` the row's base-2 log weights log2 α,
    log2(1−α) and ``(wq, wp)`` its :func:`mixture_weights`. Five instructions a column past the
    additions, no per-element branch or endpoint test:

        log2 m ≈ max(fast_log2(wq·q + wp·p), la + x, lb + y)        (maxima propagating NaN)

    *Exact at the endpoints.* At α = 1 (la = 0, lb = −inf) and α = 0 (la = −inf, lb = 0) the row's
    weights are (0, 0): the direct term is fast_log2(0) = −inf (NaN if q or p is NaN) and the result
    is la + x = x, resp. lb + y = y, bit for bit — the same value the divergences' limits (fkl, rkl,
    0) compute, including x = −inf or y = −inf.

    *Never an infinity or a NaN from underflow.* The two bounds la + x = log2(α q) and lb + y =
    log2((1−α) p) are each ≤ log2 m (up to the half-ulp rounding of the addition), so the maximum
    is never further from log2 m than the direct term, and it is finite as soon as q > 0 or p > 0
    with 0 < α < 1, whatever wq·q + wp·p does in fp32: when both products fall below 2^-126 (FTZ,
    or tiny α / 1−α: α·q + (1−α)·p of 2^-127 flushes on the GPU, and 2^la itself flushes for
    α < 2^-126) the direct term is −inf or inexact and the bounds take over. −inf only for
    q = p = 0 (the callers' 0·log 0 guards cover it); NaN in any of x, y, la, lb gives NaN.

    *Error bound (0 < α < 1, m ≥ 2^-100).* wq, wp are α, 1−α to ≤ 2^-22 relative (one ex2.approx of
    the row's log weight: the rounding of la / lb itself is the input's, as in 2^(la + x)), q and p
    likewise (ex2.approx of x, y), and the FMUL + FFMA add two roundings of 2^-24: m to a relative
    2^-20.7, i.e. ≤ 2^-20.2 absolute in log2 m. A product that flushed (< 2^-126) changes m by
    ≤ 2^-26·m. The fast log2 adds ≤ 2^-22 for m ∈ [0.5, 2] and ≤ 2 ulp of the result
    (≤ 2^-22·|log2 m|) elsewhere (CUDA C Programming Guide, ``__log2f``). So
    |error| ≤ 2^-20.2 + 2 ulp(log2 m) ≤ 2^-19.6·max(1, |log2 m|) — against ≈ 2^-21 + 1 ulp for the
    two-term form log2(2^hi + 2^lo) = hi + log2(1 + 2^(lo − hi)) it replaces, and the order of the
    rounding that x and y already carry. Below 2^-100 the result is within 1 of log2 m (the bounds,
    max(αq, (1−α)p) ≥ m/2, where the direct term flushed; a denormal product's rounding, < 2^-149,
    where it did not), and the columns involved hold p, q ≤ 2^-100 / min(α, 1−α): nothing an fp32
    sum keeps. tests/test_mixture_numerics.py checks this against fp64 on adversarial inputs, with
    the compiled code's flushes and approximation errors emulated."""
    direct = fast_log2(wq * q + wp * p)
    hi = tl.maximum(direct, la + x, propagate_nan=tl.PropagateNan.ALL)
    return tl.maximum(hi, lb + y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def discounted_add(v_later, f_later, v_earlier, f_earlier):
    """Combine of the suffix recurrence ``G_t = v_t + f_t · G_{t+1}`` for a reverse scan.

    A segment is summarised by ``(v, f)`` with ``G_start = v + f · G_after``; composing an earlier
    segment with the later one that follows it gives ``(v_e + f_e · v_l, f_e · f_l)``.
    """
    return v_earlier + f_earlier * v_later, f_earlier * f_later


@triton.jit
def value_unit(KIND: tl.constexpr):
    """Natural units per unit of :func:`divergence_terms`' value: ln 2 for the log-ratio kinds, 1 for tvd."""
    if KIND == 5:
        return 1.0
    return LN2


@triton.jit
def a_unit(KIND: tl.constexpr):
    """Natural units per unit of :func:`divergence_terms`' a_v: ln 2 where a_v carries a log ratio
    (rkl, srkl, jsd), 1 where it is a probability (fkl, skl, tvd)."""
    if KIND == 1 or KIND == 3 or KIND == 4:
        return LN2
    return 1.0


@triton.jit
def _log_ratio_or_zero(prob, log_prob, log_other):
    """``log_prob − log_other``, or 0 where ``prob`` (= 2^log_prob) is 0: the factor of a 0·log 0 = 0
    f-term ``prob·(log_prob − log_other)``. The guard sits on the factor, not on the product, so that
    the product and the accumulation after it are one FFMA. It tests "== 0", never "> 0", so that a
    NaN probability stays NaN."""
    return tl.where(prob == 0.0, 0.0, log_prob - log_other)


@triton.jit
def _jsd_terms(x, y, la, lb):
    """jsd's two f-terms, ``(β p (y − log M), (1−β) q (x − log M))`` in base 2 (the second is also its
    a), 0 < β < 1: no endpoint to keep exact, so M = (1−β) q + β p directly — one exp2 per weighted
    probability, one fast log2 — and 0·log 0 = 0 by floors instead of tests: (1−β) q > 0 implies
    x ≥ −126 − la and log M ≥ log2((1−β) q) ≥ −126, both far above LOG2_FLOOR, where the floors
    change nothing; where (1−β) q = 0 (x = −inf, or a flushed product) the floored difference is finite
    and the term 0. Likewise for p. A NaN input leaves a NaN weight, hence a NaN log M (its floor
    propagates NaN) and both terms NaN, as the guards gave. Three maxima where the guards took two
    tests and two selects."""
    wq = tl.exp2(la + x)
    wp = tl.exp2(lb + y)
    log_m = tl.maximum(fast_log2(wq + wp), LOG2_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    return wp * (tl.maximum(y, LOG2_FLOOR) - log_m), wq * (tl.maximum(x, LOG2_FLOOR) - log_m)


@triton.jit
def divergence_terms(x, y, la, lb, wq, wp, KIND: tl.constexpr):
    """``(f-terms, a, q)`` of a block of columns for the divergence ``KIND``, in base 2.

    ``x = log2 q``, ``y = log2 p`` (−inf for a probability of 0), ``la``/``lb`` the base-2 log weights
    of q and p in the mixture m = w_q·q + w_p·p, with log2 m = log2_mixture(x, y, q, p, la, lb, wq, wp)
    — never log(p + q) — and (w_q, w_p) = (α, 1−α) for skl/srkl, (1−β, β) for jsd; ``wq``/``wp`` the
    row's :func:`mixture_weights` (used by skl/srkl only). The value of a token is
    value_unit(KIND)·Σ_v f-terms and a_v (natural) = a_unit(KIND)·a; its gradient w.r.t. the student
    logits follows from a_v = q_v·∂f/∂q_v by the softmax Jacobian: ∂f/∂z_v = (a_v − q_v·Σ_u a_u)/τ.
    In natural units (ln 2 · base-2 log = natural log):

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
    the padding of a block), and ratios like α q/m are formed as exp2(log2 α + x − log2 m), exact at
    α ∈ {0, 1}. Columns with x = y = −inf give (0, 0, 0). Probabilities below 2⁻¹²⁶ flush to 0
    (exp2 is one flushing MUFU.EX2): they contribute nothing an fp32 sum would keep.

    KIND is a ``tl.constexpr``: each kind compiles to its own specialisation holding only its own
    math (no per-element selects over six formulas, fewer live registers).
    """
    q = tl.exp2(x)
    p = tl.exp2(y)
    # 0·log 0 = 0 guards test "== 0", never "> 0", so that a NaN probability stays NaN.
    if KIND == 0:
        value = p * _log_ratio_or_zero(p, y, x)
        a = -p
    elif KIND == 1:
        value = q * _log_ratio_or_zero(q, x, y)
        a = value
    elif KIND == 4:
        pv, a = _jsd_terms(x, y, la, lb)
        value = pv + a
    elif KIND == 5:
        value = 0.5 * tl.abs(p - q)
        # the last branch is 0·(q − p): 0 at ties, NaN when either probability is NaN
        a = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0 * (q - p)))
    else:
        value, a = _mixture_terms(x, y, q, p, la, lb, wq, wp, KIND, False)
        if KIND == 3:
            a = value + a * LOG2E
    return value, a, q


@triton.jit
def _mixture_terms(x, y, q, p, la, lb, wq, wp, KIND: tl.constexpr, GRADIENT: tl.constexpr):
    """skl (KIND 2): the f-term and a of :func:`divergence_terms`; srkl (KIND 3): the f-term and
    q·(1−α)p/m, whose a is ``f + log2(e)·q·(1−α)p/m`` (a row sum can add the two parts' sums).

    ``GRADIENT``: srkl's f-term for a gradient row, q·(max(x, F) − max(log m, F)) with F = −2^100
    instead of the guarded q·(x − log m): the same value wherever q > 0 and log m is finite, 0 where
    q = 0, and finite instead of +inf where q > 0 = p at α = 0 — a column whose a_v, hence the row's
    S, is +inf: the gradient kernels give such a row a zero divergence gradient without reading a_v
    (``live``). One maximum in place of a test and a select."""
    log_m = log2_mixture(x, y, q, p, la, lb, wq, wp)
    # The ratios α q/m and (1−α) p/m as exp2(la + x − log m), exp2(lb + y − log m): ≤ 1 since
    # log m ≥ la + x, lb + y (log2_mixture), and exactly 1 / 0 at α ∈ {0, 1}. log m is −inf only
    # where the numerator's log is −inf too (q = p = 0, or an endpoint with that probability 0):
    # against a floor of −2^100 instead, the exponent is −inf and the ratio 0, not NaN — one
    # maximum in place of a test and a select per guard. The ratio is finite (NaN only from a NaN
    # input), so −p·ratio and q·ratio are 0 where p = 0, q = 0: no guard.
    log_m_floor = tl.maximum(log_m, LOG2_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    if KIND == 2:
        value = p * _log_ratio_or_zero(p, y, log_m)
        part = -p * tl.exp2(la + x - log_m_floor)
    else:
        if GRADIENT:
            value = q * (tl.maximum(x, LOG2_FLOOR) - log_m_floor)
        else:
            value = q * _log_ratio_or_zero(q, x, log_m)
        part = q * tl.exp2(lb + y - log_m_floor)
    return value, part


@triton.jit
def log2_softmax_at(x, m, s, k):
    """``log2 softmax(z/τ)`` at raw logits ``x`` of a row with :func:`row_logsumexp` pair ``(m, s)``;
    ``k`` = log2(e)/τ."""
    return (x.to(tl.float32) - m) * k - s * LOG2E


@triton.jit
def _block_terms(S, W, start, w_start, offs, L, L_t, stride_sv, stride_wv, m_s, s_s, m_t, s_t, k, la2, lb2, wq, wp,
                 KIND: tl.constexpr):
    """One block of the aligned main loop of :func:`divergence_row_sums`: the student and teacher
    columns at ``offs`` (masked beyond the main lengths ``L`` / ``L_t``) and their per-column terms
    ``(v, a)``."""
    z = tl.load(S + start + offs * stride_sv, mask=offs < L, other=float("-inf"))
    w = tl.load(W + w_start + offs * stride_wv, mask=offs < L_t, other=float("-inf"))
    return _sum_terms(log2_softmax_at(z, m_s, s_s, k), log2_softmax_at(w, m_t, s_t, k), la2, lb2, wq, wp, KIND)


@triton.jit
def _sum_terms(x, y, la, lb, wq, wp, KIND: tl.constexpr):
    """``(f-terms, a-part)`` for :func:`divergence_row_sums`: a-part = a of :func:`divergence_terms`,
    except for srkl, q·(1−α)p/m (:func:`_mixture_terms`; the row sum is Σ f + log2(e)·Σ a-part)."""
    if KIND == 3:
        v, a = _mixture_terms(x, y, tl.exp2(x), tl.exp2(y), la, lb, wq, wp, KIND, False)
    elif KIND == 4:
        v, a = _jsd_terms(x, y, la, lb)
    else:
        v, a, _q = divergence_terms(x, y, la, lb, wq, wp, KIND)
    return v, a


@triton.jit
def divergence_row_sums(S, s_off, stride_sv, n_s, W, w_off, stride_wv, n_t, inv_tau, m_s, s_s, m_t, s_t,
                        la, lb, KIND: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """``(Σ_v f-terms, S = Σ_v a_v)`` (natural units) of :func:`divergence_terms` over a row pair —
    the student row at element offset ``s_off`` of ``S``, the teacher's at ``w_off`` of ``W``, with
    ``n_s`` / ``n_t`` columns to read (0: skip; student columns ≥ n_s and teacher columns ≥ n_t give
    probability 0; n_t ≤ n_s) — from their (max, log-sum) pairs; ``la``/``lb`` natural log weights. The edge
    columns first, then the aligned main loop (VEC > 1 needs congruent rows, :func:`row_vector`, and
    n_t = n_s: its full blocks read both rows without a mask, :func:`load_main`; the partial last
    block is masked). Vector accumulators, reduced after the loop."""
    k = inv_tau * LOG2E
    la2 = la * LOG2E
    lb2 = lb * LOG2E
    wq, wp = mixture_weights(la2, lb2)
    start, h, L = row_span(s_off, n_s, VEC)
    w_start = (w_off + (VEC - 1)) // VEC * VEC
    L_t = main_len(h, n_t, VEC)
    value = tl.zeros([], dtype=tl.float32)
    row_sum = tl.zeros([], dtype=tl.float32)
    if VEC > 1:
        ecols, eok = edge_columns(h, L, VEC)
        ze = tl.load(S + s_off + ecols * stride_sv, mask=eok & (ecols < n_s), other=float("-inf"))
        we = tl.load(W + w_off + ecols * stride_wv, mask=eok & (ecols < n_t), other=float("-inf"))
        ve, ae = _sum_terms(log2_softmax_at(ze, m_s, s_s, k), log2_softmax_at(we, m_t, s_t, k), la2, lb2, wq, wp,
                            KIND)
        # lanes outside the row add nothing (an empty row, n_s = 0, has m = s = −inf: its terms are NaN)
        inside = eok & (ecols < n_s)
        value += tl.sum(tl.where(inside, ve, 0.0), axis=0)
        row_sum += tl.sum(tl.where(inside, ae, 0.0), axis=0)
    cols = tl.arange(0, BLOCK)
    # vector accumulators, reduced once after the loop: no per-block shuffles and barrier
    value_acc = tl.zeros([BLOCK], dtype=tl.float32)
    sum_acc = tl.zeros([BLOCK], dtype=tl.float32)
    if VEC > 1:
        n_full = L // BLOCK
        for i in range(0, n_full):
            z = load_main(S, start, i, True, BLOCK)
            w = load_main(W, w_start, i, True, BLOCK)
            v, a = _sum_terms(log2_softmax_at(z, m_s, s_s, k), log2_softmax_at(w, m_t, s_t, k), la2, lb2, wq, wp,
                              KIND)
            value_acc += v
            sum_acc += a
        if n_full * BLOCK < L:
            v, a = _block_terms(S, W, start, w_start, n_full * BLOCK + cols, L, L_t, stride_sv, stride_wv, m_s, s_s,
                                m_t, s_t, k, la2, lb2, wq, wp, KIND)
            value_acc += v
            sum_acc += a
    else:
        for i in range(0, tl.cdiv(L, BLOCK)):
            v, a = _block_terms(S, W, start, w_start, i * BLOCK + cols, L, L_t, stride_sv, stride_wv, m_s, s_s,
                                m_t, s_t, k, la2, lb2, wq, wp, KIND)
            value_acc += v
            sum_acc += a
    value += tl.sum(value_acc, axis=0)
    row_sum += tl.sum(sum_acc, axis=0)
    if KIND == 3:
        row_sum = value + row_sum * LOG2E
    if KIND == 4:
        value += row_sum
    return value * value_unit(KIND), row_sum * a_unit(KIND)


@triton.jit
def _gradient_columns(x, y, la2, lb2, wq, wp, scale, row_sum, live, offs, label, scale_label, KIND: tl.constexpr,
                      HAS_LABEL: tl.constexpr, ONE_HOT: tl.constexpr = True):
    """The gradient of columns ``offs`` from their x, y (see :func:`divergence_row_gradient`);
    ``ONE_HOT=False`` leaves the label's −scale_label out, for blocks that cannot hold the label: no
    per-column compare."""
    if KIND == 3:
        q = tl.exp2(x)
        f, qr = _mixture_terms(x, y, q, tl.exp2(y), la2, lb2, wq, wp, KIND, True)
        a = f + qr * LOG2E  # as divergence_terms
    else:
        _v, a, q = divergence_terms(x, y, la2, lb2, wq, wp, KIND)
    # a_v − q_v·S in natural units first, then the scale: where a token's whole S is one column's a_v
    # and its q is 1 (τ → 0), the difference is exactly 0, however large g/τ is
    grad = tl.where(live, scale * (a * a_unit(KIND) - q * row_sum), 0.0)
    if HAS_LABEL:
        if ONE_HOT:
            grad += scale_label * (q - tl.where(offs == label, 1.0, 0.0))
        else:
            grad += scale_label * q
    return grad


@triton.jit
def divergence_row_gradient(G, g_off, S, s_off, stride_sv, V_s, n_s, W, w_off, stride_wv, n_t, inv_tau,
                            m_s, s_s, m_t, s_t, la, lb, scale, row_sum, label, scale_label,
                            KIND: tl.constexpr, HAS_LABEL: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Write one gradient row ``scale·(a_v − q_v·S) + scale_label·(q_v − 1[v = label])`` over the
    student's ``V_s`` columns at element offset ``g_off`` of ``G`` (in its dtype), with a_v, q_v of
    :func:`divergence_terms` (natural units) and S = ``row_sum``: the full-vocabulary divergence's
    gradient (``scale`` = g/τ) plus, if ``HAS_LABEL``, a sampled-token REINFORCE term (``scale_label``
    = c/τ). The divergence part is exactly 0 where ``scale`` is 0 (a dead row, or an infinite S whose
    a_v are infinite). Columns ≥ ``n_s`` / ``n_t`` are not read (see :func:`divergence_row_sums`);
    with VEC > 1 the gradient row must be congruent with the student row and n_s, n_t ∈ {0, V_s}.
    The label is compared in int32 (clamped to [−1, V_s]: no column matches outside the row)."""
    k = inv_tau * LOG2E
    la2 = la * LOG2E
    lb2 = lb * LOG2E
    wq, wp = mixture_weights(la2, lb2)
    live = scale != 0.0
    start, h, L = row_span(s_off, V_s, VEC)
    w_start = (w_off + (VEC - 1)) // VEC * VEC
    g_start = (g_off + (VEC - 1)) // VEC * VEC
    L_s = main_len(h, n_s, VEC)
    L_t = main_len(h, n_t, VEC)
    lab = tl.minimum(tl.maximum(label, -1), V_s).to(tl.int32)
    if VEC > 1:
        ecols, eok = edge_columns(h, L, VEC)
        ze = tl.load(S + s_off + ecols * stride_sv, mask=eok & (ecols < n_s), other=float("-inf"))
        we = tl.load(W + w_off + ecols * stride_wv, mask=eok & (ecols < n_t), other=float("-inf"))
        ge = _gradient_columns(log2_softmax_at(ze, m_s, s_s, k), log2_softmax_at(we, m_t, s_t, k), la2, lb2, wq, wp,
                               scale, row_sum, live, ecols, lab, scale_label, KIND, HAS_LABEL)
        tl.store(G + g_off + ecols, ge.to(G.dtype.element_ty), mask=eok & (ecols < V_s))
    cols = tl.arange(0, BLOCK)
    lab_main = lab - h  # the label's offset in the main region
    if VEC > 1:
        # Full blocks without a per-column mask (L_s, L_t ∈ {0, L}: a per-row read predicate) and
        # without the label compare: the full block holding the label, if any, is skipped by the loop
        # and done after it, with the compare. Then the partial last block, masked.
        n_full = L // BLOCK
        if HAS_LABEL:
            in_full = (lab_main >= 0) & (lab_main < n_full * BLOCK)
            label_block = tl.where(in_full, lab_main // BLOCK, n_full)
            n_loop = n_full - in_full.to(tl.int32)
        else:
            label_block = n_full
            n_loop = n_full
        for j in range(0, n_loop):
            i = j + (j >= label_block).to(tl.int32)
            offs = i * BLOCK + cols
            z = load_main(S, start, i, L_s > 0, BLOCK, True)
            w = load_main(W, w_start, i, L_t > 0, BLOCK, True)
            grad = _gradient_columns(log2_softmax_at(z, m_s, s_s, k), log2_softmax_at(w, m_t, s_t, k), la2, lb2, wq,
                                     wp, scale, row_sum, live, offs, lab_main, scale_label, KIND, HAS_LABEL, False)
            tl.store(G + g_start + offs, grad.to(G.dtype.element_ty))
        if HAS_LABEL:
            if in_full:
                offs = label_block * BLOCK + cols
                z = load_main(S, start, label_block, L_s > 0, BLOCK, True)
                w = load_main(W, w_start, label_block, L_t > 0, BLOCK, True)
                grad = _gradient_columns(log2_softmax_at(z, m_s, s_s, k), log2_softmax_at(w, m_t, s_t, k), la2, lb2,
                                         wq, wp, scale, row_sum, live, offs, lab_main, scale_label, KIND, HAS_LABEL)
                tl.store(G + g_start + offs, grad.to(G.dtype.element_ty))
        if n_full * BLOCK < L:
            _gradient_block(G, g_start, S, start, W, w_start, n_full * BLOCK + cols, L, L_s, L_t, stride_sv, stride_wv,
                            m_s, s_s, m_t, s_t, k, la2, lb2, wq, wp, scale, row_sum, live, lab_main, scale_label,
                            KIND, HAS_LABEL)
    else:
        for i in range(0, tl.cdiv(L, BLOCK)):
            _gradient_block(G, g_start, S, start, W, w_start, i * BLOCK + cols, L, L_s, L_t, stride_sv, stride_wv,
                            m_s, s_s, m_t, s_t, k, la2, lb2, wq, wp, scale, row_sum, live, lab_main, scale_label,
                            KIND, HAS_LABEL)


@triton.jit
def _gradient_block(G, g_start, S, start, W, w_start, offs, L, L_s, L_t, stride_sv, stride_wv, m_s, s_s, m_t, s_t, k,
                    la2, lb2, wq, wp, scale, row_sum, live, lab_main, scale_label, KIND: tl.constexpr,
                    HAS_LABEL: tl.constexpr):
    """One masked block of :func:`divergence_row_gradient`'s main region: columns ``offs`` (student
    read below ``L_s``, teacher below ``L_t``, written below ``L``)."""
    z = tl.load(S + start + offs * stride_sv, mask=offs < L_s, other=float("-inf"))
    w = tl.load(W + w_start + offs * stride_wv, mask=offs < L_t, other=float("-inf"))
    grad = _gradient_columns(log2_softmax_at(z, m_s, s_s, k), log2_softmax_at(w, m_t, s_t, k), la2, lb2, wq, wp,
                             scale, row_sum, live, offs, lab_main, scale_label, KIND, HAS_LABEL)
    tl.store(G + g_start + offs, grad.to(G.dtype.element_ty), mask=offs < L)
