"""The divergence family's CPU path: :mod:`.triton`'s two kernels in blocked PyTorch.

Same math, same outputs: active rows (valid, not clipped) are streamed in blocks of rows
(:func:`askd_kernels._torch_math.row_blocks`: cache-sized slices of the logits, never gathered
copies), and the per-kind terms are :data:`askd_kernels._torch_math.DIVERGENCE_TERMS`: one function
per kind, written once, that works in place on the block's buffers (no block-sized temporaries but
the bool masks of a non-finite block, below) and gives either the columns' (f-terms, a) or the
gradient rows.

Per block, in the forward each side is the passes of :func:`_pair_into`: the row max, the shift by
it with the conversion to fp32 and the scale by log2(e)/τ, in a buffer reused by every block; the
exp2 and its sum give the log-sum s, and one fused multiply-add turns the buffer into log q / log p
(= t·ln 2 − s). In the backward (and :func:`forward_given_pairs`) each side is one shift from the
logits and one subtraction of the given pair's s (:func:`_given_log_probs`). The kind's terms then
run on the whole block, which stays in the cache. The forward reduces the terms to their row sums;
the backward gets the gradient rows in place, for fp32 logits over one vocabulary in the gradient's
own rows (no copy), else in a block buffer stored into them.

The forward's probabilities are the log-sum's exponentials times e^{−s} (a multiply, not a second
exp per element), kept only for the sides the kind uses (:data:`askd_kernels._torch_math.DIVERGENCE_INPUTS`:
fkl keeps p, rkl q, tvd both and no log-probabilities). Every exponential is an ``exp2`` (the
terms' ``exp2=True``): torch's ``exp2`` runs about 3× faster than its ``exp`` on CPU, well inside
fp32's accuracy for a probability (:func:`askd_kernels._torch_math.exp_`).

Guards: a block whose two (max, log-sum) pairs and log weights are all finite (:func:`_finite`: a
few Python reads per block) runs the terms with ``finite=True``, where 0·log 0 is zeroed by one
``nan_to_num_`` pass instead of bool masks (an ``== 0`` into a bool tensor costs about as much as an
exp): the same results, ±0 aside. A block with a NaN or +inf logit, a row that is −inf everywhere,
or α ∈ {0, 1} keeps the masks, so that NaN in stays NaN out. The vocabulary-parallel path passes
global pairs, NaN wherever any shard's row holds a NaN
(:func:`askd_kernels.distributed.combine_pairs`), so the same test holds there.

:func:`pairs` and :func:`forward_given_pairs` are the forward's two passes run separately (the
vocabulary-parallel path, :mod:`.vocab_parallel`): the first pass's pairs of a shard (bitwise the
forward's), and the second pass from given (global) pairs, as the backward rebuilds log q / log p
from them (never renormalising over the shard's own columns).

Memory, per worker thread: fp32 block buffers — in the forward three (fkl, rkl, tvd), four (skl,
srkl) or six (jsd); in :func:`forward_given_pairs` two (fkl, rkl), three (tvd), four (skl, srkl) or
five (jsd); in the backward one fewer for fp32 logits over one vocabulary (the gradient's own rows
serve as one) — plus, on a non-finite block, bool masks of the block: bounded by the block, never by
tokens × vocabulary; and O(tokens) vectors.
"""
import math

import torch

from .._torch_math import (DIVERGENCE_GRAD_BUFFER, DIVERGENCE_INPUTS, DIVERGENCE_SPARES, DIVERGENCE_TERMS, LN2, LOG2E,
                           chunk_rows, for_blocks, row_blocks, rows_view, shift_into)


_FP32_MAX = torch.finfo(torch.float32).max


def _active(labels, kappa, ignore_index):
    """Bool [B·T]: the positions that are valid and not in a clipped sequence."""
    return ((labels != ignore_index) & (kappa != 0).unsqueeze(1)).reshape(-1)


def _views(student_logits, teacher_logits):
    """Row views of both logits over the shared vocabulary V = min(V_s, V_t), and V."""
    V = min(student_logits.shape[2], teacher_logits.shape[2])
    z_rows, period = rows_view(student_logits)
    w_rows, w_period = rows_view(teacher_logits)
    if student_logits.shape[2] > V:
        z_rows = (lambda rows: lambda a, b: rows(a, b)[:, :V])(z_rows)
    if teacher_logits.shape[2] > V:
        w_rows = (lambda rows: lambda a, b: rows(a, b)[:, :V])(w_rows)
    return z_rows, w_rows, V, period or w_period


def _pair_into(out, rows, inv_tau, work=None):
    """The (max, log-sum) pair ``(m, s)`` ([r, 1] each, fp32) of a block of rows, with ``out`` holding
    ``t = (z − m)·log2(e)/τ`` — the argument of the softmax shifted before it is scaled (τ = 1e-30
    cannot overflow), in base 2 — and ``s = log Σ_v 2^{t_v}``, the exponentials taken into ``work``
    (kept: e^{(z − m)/τ}) or, without it, in place of ``out``. Passes: the max (in the logits' dtype),
    the shift with its conversion to fp32, the scale, the exp2 (torch's ``exp2`` is several times
    faster than its ``exp`` here, see :func:`askd_kernels._torch_math.exp_`), the sum. The forward
    and :func:`pairs` share it, so that their pairs are bitwise equal."""
    m = rows.amax(-1, keepdim=True)
    m = m if m.dtype == torch.float32 else m.float()
    t = torch.sub(rows, m, out=out)
    # one multiply by log2(e)/τ, or two where that factor would overflow fp32 and 1/τ does not
    t = t.mul_(LOG2E * inv_tau) if LOG2E * inv_tau <= _FP32_MAX else t.mul_(inv_tau).mul_(LOG2E)
    e = torch.exp2(t, out=work) if work is not None else t.exp2_()
    return m, e.sum(-1, keepdim=True).log_()


def _finite(values, weights_ok):
    """Whether a block takes the kinds' ``finite=True`` guards (see
    :data:`askd_kernels._torch_math.DIVERGENCE_TERMS`): its two (max, log-sum) pairs (``values``, the
    blocks of the pair tensors: read into Python for a few rows, 1–2 µs against ``isfinite``'s 9;
    through ``isfinite`` for more) and its rows' log weights (``weights_ok``, bools) all finite. A
    NaN logit makes its row's max NaN (``amax`` propagates it, and so does
    :func:`askd_kernels.distributed.combine_pairs`), a +inf logit +inf, a row that is −inf
    everywhere a NaN or −inf pair, α ∈ {0, 1} an infinite log weight: such blocks keep the bool-mask
    guards, so that NaN in stays NaN out."""
    if not all(weights_ok):
        return False
    if values[0].shape[0] <= 16:
        return all(math.isfinite(v) for t in values for row in t.tolist() for v in row)
    return all(bool(torch.isfinite(t).all()) for t in values)


def _rows_ok(*tensors):
    """Per row, as a list of bools, whether every entry of these ``[rows, k]`` tensors is finite."""
    return torch.isfinite(torch.cat(tensors, 1) if len(tensors) > 1 else tensors[0]).all(-1).tolist()


def _buffers(blocks, V, device, count):
    """A function making ``count`` fp32 [block rows, V] buffers, sized for the largest block of this
    call (one set per worker thread, see :func:`askd_kernels._torch_math.for_blocks`).

    Each buffer is a view whose rows are padded to a multiple of 16 floats plus at least one (64-byte
    aligned rows, never contiguous across rows): torch's elementwise loops then run row by row, as
    they would on a block of one row, instead of over the block as one flat range. That matters for
    ``exp2`` (and ``logaddexp``): their vectorised loop and its scalar tail round differently, and
    over a flat range which entries the tail takes would depend on the block's row count — so the
    results would depend on the blocks (threads, packed rows, V_s)."""
    rows = min(chunk_rows(V), max((b - a for a, b, _ in blocks), default=0))
    padded = (V // 16 + 1) * 16
    return lambda: [torch.empty((rows, padded), dtype=torch.float32, device=device)[:, :V] for _ in range(count)]


def _cut(buffers, r):
    """The block buffers cut to a block's ``r`` rows (no op where they have ``r`` rows)."""
    return [buf if buf.shape[0] == r else buf[:r] for buf in buffers]


def _given_log_probs(z_rows, w_rows, buffers, lse_s, lse_t, inv_tau):
    """``(log q, log p, spare)`` of a block of ``r`` rows from their given (max, log-sum) pairs
    (``(m, s)``, [r, 1] each, per side): ``(z − m)/τ − s`` written into the first two fp32 block
    ``buffers`` (cut to ``r`` rows), and the rest of the buffers cut alike, for the kind's in-place
    terms: :func:`askd_kernels._torch_math.shift_into`, then ``− s``."""
    x, y, *spare = _cut(buffers, lse_s[0].shape[0])
    for rows, out, (m, s) in ((z_rows, x, lse_s), (w_rows, y, lse_t)):
        shift_into(out, rows, m.squeeze(1), inv_tau).sub_(s)
    return x, y, spare


def forward(student_logits, teacher_logits, labels, kappa, log_w, *, kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergence.triton.forward`. Returns fp32 ``(value [B·T], row_sum [B·T],
    lse_s [B·T, 2], lse_t [B·T, 2])``."""
    B, T, _ = student_logits.shape
    n = B * T
    dev = student_logits.device
    z_rows, w_rows, V, period = _views(student_logits, teacher_logits)
    value = torch.zeros(n, dtype=torch.float32, device=dev)
    row_sum = torch.zeros_like(value)
    lse_s, lse_t = (torch.zeros((n, 2), dtype=torch.float32, device=dev) for _ in range(2))
    active = _active(labels, kappa, ignore_index)
    weights = log_w.repeat_interleave(T, 0)  # [B·T, 2]: log w_q, log w_p per row
    la, lb = weights[:, :1], weights[:, 1:]
    weights_ok = _rows_ok(weights)
    blocks = row_blocks(active, n, V, period)
    inv_tau = 1.0 / temperature

    terms = DIVERGENCE_TERMS[kind]
    use_logs, use_q, use_p = DIVERGENCE_INPUTS[kind]
    # exponentials: into a buffer of their own per side whose probabilities are kept, one shared
    # buffer where one side's are discarded (fkl: q, rkl: p), in place where no log-probability is used (tvd)
    n_work = (2 if use_q and use_p else 1) if use_logs else 0

    def side(rows, out, work, pair, keep):
        """One side's pass: the pair (:func:`_pair_into`, stored into ``pair``), then with ``work``
        log softmax(z/τ) = t·ln 2 − s into ``out`` (one fused multiply-add pass; NaN rows stay NaN),
        and the probabilities e^{(z − m)/τ}·e^{−s} if ``keep`` (a multiply, no second exp)."""
        m, s = _pair_into(out, rows, inv_tau, work)
        torch.cat([m, s], 1, out=pair)
        neg_s = s.neg_()
        if work is not None:
            torch.add(neg_s, out, alpha=LN2, out=out)
        return (out if work is None else work).mul_(neg_s.exp_()) if keep else None

    def block(a, b, _mask, buffers):  # rows of a mixed block are zeroed by the torch.where below
        x, y, *work = _cut(buffers, b - a)
        e_q, e_p = (work[0], work[n_work - 1]) if use_logs else (None, None)
        pair_s, pair_t = lse_s[a:b], lse_t[a:b]
        student = (z_rows(a, b), x, e_q, pair_s, use_q)
        teacher = (w_rows(a, b), y, e_p, pair_t, use_p)
        if use_p:
            q, p = side(*student), side(*teacher)
        else:  # rkl: the teacher's exponentials go first into the buffer that then keeps q
            p, q = side(*teacher), side(*student)
        v, terms_a = terms(x, y, q, p, la[a:b], lb[a:b], work[n_work:], exp2=True,
                           finite=_finite((pair_s, pair_t), weights_ok[a:b]))
        torch.sum(v, -1, out=value[a:b])
        if terms_a is v:  # rkl: a_v = f_v
            row_sum[a:b] = value[a:b]
        else:
            torch.sum(terms_a, -1, out=row_sum[a:b])

    for_blocks(blocks, block, _buffers(blocks, V, dev, 2 + n_work + DIVERGENCE_SPARES[kind][0]))
    # Inactive rows (ignored, clipped, or computed inside a mostly active block) store 0.
    value, row_sum = torch.where(active, value, 0.0), torch.where(active, row_sum, 0.0)
    lse_s, lse_t = (torch.where(active.unsqueeze(1), pair, 0.0) for pair in (lse_s, lse_t))
    if kind == "tvd":
        # ½ Σ|p − q| ≤ 1 exactly; fp32 rounding of Σ p + Σ q can overshoot by an ulp or two for
        # disjoint supports. clamp keeps NaN.
        value.clamp_(max=1.0)
    return value, row_sum, lse_s, lse_t


def pairs(student_logits, teacher_logits, labels, kappa, *, temperature, ignore_index):
    """See :func:`askd_kernels.divergence.triton.pairs`: the forward's first pass only, fp32
    ``(lse_s [B·T, 2], lse_t [B·T, 2])``, (0, 0) at inactive rows."""
    B, T, _ = student_logits.shape
    n = B * T
    dev = student_logits.device
    z_rows, w_rows, V, period = _views(student_logits, teacher_logits)
    lse_s, lse_t = (torch.zeros((n, 2), dtype=torch.float32, device=dev) for _ in range(2))
    active = _active(labels, kappa, ignore_index)
    blocks = row_blocks(active, n, V, period)
    inv_tau = 1.0 / temperature

    def block(a, b, _mask, buffers):
        x = buffers[0][:b - a]
        for rows, pair in ((z_rows(a, b), lse_s), (w_rows(a, b), lse_t)):
            # the same operations as the forward's first pass (the exponentials in place here); a
            # row that is −inf throughout (a masked part of the vocabulary) is (−inf, −inf), as in
            # the kernel, not the NaN of (−inf) − (−inf)
            m, s = _pair_into(x, rows, inv_tau)
            torch.cat([m, torch.where(m == float("-inf"), float("-inf"), s)], 1, out=pair[a:b])

    for_blocks(blocks, block, _buffers(blocks, V, dev, 1))
    return tuple(torch.where(active.unsqueeze(1), pair, 0.0) for pair in (lse_s, lse_t))


def forward_given_pairs(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, *, kind, temperature,
                        ignore_index):
    """See :func:`askd_kernels.divergence.triton.forward_given_pairs`: the forward's second pass only,
    from the given (global) pairs: fp32 ``(value [B·T], row_sum [B·T])``, the partial sums over
    these columns, 0 at inactive rows, no tvd clamp."""
    B, T, _ = student_logits.shape
    n = B * T
    dev = student_logits.device
    z_rows, w_rows, V, period = _views(student_logits, teacher_logits)
    value = torch.zeros(n, dtype=torch.float32, device=dev)
    row_sum = torch.zeros_like(value)
    active = _active(labels, kappa, ignore_index)
    weights = log_w.repeat_interleave(T, 0)
    la, lb = weights[:, :1], weights[:, 1:]
    blocks = row_blocks(active, n, V, period)
    inv_tau = 1.0 / temperature
    terms = DIVERGENCE_TERMS[kind]
    finite = _rows_ok(lse_s, lse_t, weights)
    (m_s, s_s), (m_t, s_t) = lse_s.split(1, 1), lse_t.split(1, 1)

    def block(a, b, _mask, buffers):
        x, y, spare = _given_log_probs(z_rows(a, b), w_rows(a, b), buffers, (m_s[a:b], s_s[a:b]),
                                       (m_t[a:b], s_t[a:b]), inv_tau)
        v, terms_a = terms(x, y, None, None, la[a:b], lb[a:b], spare, exp2=True, finite=all(finite[a:b]))
        torch.sum(v, -1, out=value[a:b])
        torch.sum(terms_a, -1, out=row_sum[a:b])

    for_blocks(blocks, block, _buffers(blocks, V, dev, 2 + DIVERGENCE_SPARES[kind][1]))
    # inactive rows (ignored, clipped, or computed inside a mostly active block) store 0
    return torch.where(active, value, 0.0), torch.where(active, row_sum, 0.0)


def backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value, *,
             kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergence.triton.backward`. Rows with a zero factor are not read
    (they get exact zeros), nor are the student's columns beyond the shared vocabulary (zeros)."""
    B, T, V_s = student_logits.shape
    n = B * T
    dev = student_logits.device
    z_rows, w_rows, V, period = _views(student_logits, teacher_logits)
    grad = torch.empty((n, V_s), dtype=student_logits.dtype, device=dev)
    # Zero factor: nothing to do. Infinite S (an infinite value): gradient 0, not NaN (see the kernel).
    live = _active(labels, kappa, ignore_index) & (grad_value != 0) & ~torch.isinf(row_sum)
    weights = log_w.repeat_interleave(T, 0)
    la, lb = weights[:, :1], weights[:, 1:]
    inv_tau = 1.0 / temperature
    scale = (grad_value * inv_tau).unsqueeze(1)
    total = row_sum.unsqueeze(1)
    blocks = row_blocks(live, n, V, period)
    terms = DIVERGENCE_TERMS[kind]
    finite = _rows_ok(lse_s, lse_t, weights)
    (m_s, s_s), (m_t, s_t) = lse_s.split(1, 1), lse_t.split(1, 1)
    # fp32 logits with blocks of one row (a real vocabulary): the kind's function writes its gradient
    # row straight into the gradient's own row, passed as the buffer it returns (DIVERGENCE_GRAD_BUFFER):
    # one block buffer fewer and no copy. Not for blocks of several rows, which are contiguous in the
    # gradient and would be looped over as one flat range, unlike the buffers (see _buffers).
    direct = grad.dtype == torch.float32 and chunk_rows(V) == 1
    n_buffers = 2 + DIVERGENCE_SPARES[kind][1]
    at = DIVERGENCE_GRAD_BUFFER[kind] % n_buffers

    def block(a, b, _mask, buffers):
        out = grad[a:b, :V] if V < V_s else grad[a:b]  # one row where direct
        if direct:
            buffers = buffers[:at] + [out] + buffers[at:]
        x, y, spare = _given_log_probs(z_rows(a, b), w_rows(a, b), buffers, (m_s[a:b], s_s[a:b]),
                                       (m_t[a:b], s_t[a:b]), inv_tau)
        g = terms(x, y, None, None, la[a:b], lb[a:b], spare, grad=(total[a:b], scale[a:b]), exp2=True,
                  finite=all(finite[a:b]))
        if not direct or g.data_ptr() != out.data_ptr():
            out.copy_(g)  # g/τ · (a_v − q_v·S)

    for_blocks(blocks, block, _buffers(blocks, V, dev, n_buffers - direct))
    if V < V_s:
        grad[:, V:].zero_()
    dead = (~live).nonzero().squeeze(1)  # never written, or computed inside a mostly live block
    if dead.numel():
        grad.index_fill_(0, dead, 0.0)
    return grad.view(B, T, V_s)
