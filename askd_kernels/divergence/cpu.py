"""The divergence family's CPU path: :mod:`.triton`'s two kernels in blocked PyTorch.

Same math, same outputs: active rows (valid, not clipped) are streamed in blocks of rows
(:func:`askd_kernels._torch_math.row_blocks`: cache-sized slices of the logits, never gathered
copies), and the per-kind terms are :data:`askd_kernels._torch_math.DIVERGENCE_TERMS`: one function
per kind, written once, that works in place on the block's buffers (no block-sized temporaries but
bool masks) and gives either the columns' (f-terms, a) or the gradient rows.

Per block, each side is one pass that converts the logits to fp32 and shifts them by the row
maximum into a buffer reused by every block (:func:`askd_kernels._torch_math.shift_into`), then the
log-sum (the forward) or the forward's (max, log-sum) pair (the backward) turns it into log q / log p
in place; the kind's terms run on the whole block, which stays in the cache. The forward reduces
the terms to their row sums; the backward gets the gradient rows in place and stores them into the
gradient's final buffer.

The forward's probabilities are the log-sum's exponentials times e^{−s} (a multiply, not a second
exp per element), kept only for the sides the kind uses (:data:`askd_kernels._torch_math.DIVERGENCE_INPUTS`:
fkl keeps p, rkl q, tvd both and no log-probabilities).

:func:`pairs` and :func:`forward_given_pairs` are the forward's two passes run separately (the
vocabulary-parallel path, :mod:`.vocab_parallel`): the first pass's pairs of a shard, and the second
pass from given (global) pairs, as the backward rebuilds log q / log p from them.

Memory, per worker thread: fp32 block buffers — in the forward three (fkl, rkl, tvd), four (skl,
srkl) or six (jsd); in the backward and :func:`forward_given_pairs` two (fkl, rkl), three (tvd), four
(skl, srkl) or five (jsd) — plus bool masks of the block: bounded by the block, never by tokens ×
vocabulary; and O(tokens) vectors.
"""
import torch

from .._torch_math import (DIVERGENCE_INPUTS, DIVERGENCE_SPARES, DIVERGENCE_TERMS, chunk_rows, for_blocks, log_sum_into,
                           row_blocks, rows_view, shift_into)


def _active(labels, kappa, ignore_index):
    """Bool [B·T]: the positions that are valid and not in a clipped sequence."""
    return ((labels != ignore_index) & (kappa != 0).unsqueeze(1)).reshape(-1)


def _views(student_logits, teacher_logits):
    """Row views of both logits over the shared vocabulary V = min(V_s, V_t), and V."""
    V = min(student_logits.shape[2], teacher_logits.shape[2])
    z_rows, period = rows_view(student_logits)
    w_rows, w_period = rows_view(teacher_logits)
    return (lambda a, b: z_rows(a, b)[:, :V]), (lambda a, b: w_rows(a, b)[:, :V]), V, period or w_period


def _buffers(blocks, V, device, count):
    """A function making ``count`` fp32 [block rows, V] buffers, sized for the largest block of this
    call (one set per worker thread, see :func:`askd_kernels._torch_math.for_blocks`)."""
    rows = min(chunk_rows(V), max((b - a for a, b, _ in blocks), default=0))
    return lambda: [torch.empty((rows, V), dtype=torch.float32, device=device) for _ in range(count)]


def _given_log_probs(z_rows, w_rows, buffers, lse_s, lse_t, inv_tau):
    """``(log q, log p, spare)`` of a block of ``r`` rows from their given (max, log-sum) pairs
    ``[r, 2]``: ``(z − m)/τ − s`` written into the first two fp32 block ``buffers`` (cut to ``r``
    rows), and the rest of the buffers cut alike, for the kind's in-place terms."""
    r = lse_s.shape[0]
    x, y, *spare = (buf[:r] for buf in buffers)
    for rows, out, pair in ((z_rows, x, lse_s), (w_rows, y, lse_t)):
        shift_into(out, rows, pair[:, 0], inv_tau).sub_(pair[:, 1:])
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
    blocks = row_blocks(active, n, V, period)
    inv_tau = 1.0 / temperature

    terms = DIVERGENCE_TERMS[kind]
    use_logs, use_q, use_p = DIVERGENCE_INPUTS[kind]
    # exponentials: into a buffer of their own per side whose probabilities are kept, one shared
    # buffer where one side's are discarded (fkl: q, rkl: p), in place where no log-probability is used (tvd)
    n_work = (2 if use_q and use_p else 1) if use_logs else 0

    def side(rows, out, work, pair, a, b, keep):
        """One side's pass: the max, (z − m)/τ into ``out``, the log-sum (exponentials into ``work``,
        or in place without it), ``out`` −= s when ``work`` is given (log softmax(z/τ); NaN rows stay
        NaN), and the probabilities e^{(z − m)/τ}·e^{−s} if ``keep`` (a multiply, no second exp)."""
        m = rows.amax(-1).float()
        s = log_sum_into(shift_into(out, rows, m, inv_tau), work)
        pair[a:b, 0], pair[a:b, 1] = m, s
        if work is not None:
            out.sub_(s.unsqueeze(1))
        return (out if work is None else work).mul_(torch.exp(-s).unsqueeze(1)) if keep else None

    def block(a, b, _mask, buffers):  # rows of a mixed block are zeroed by the torch.where below
        r = b - a
        x, y, *work = (buf[:r] for buf in buffers)
        e_q, e_p = (work[0], work[n_work - 1]) if use_logs else (None, None)
        student = (z_rows(a, b), x, e_q, lse_s, a, b, use_q)
        teacher = (w_rows(a, b), y, e_p, lse_t, a, b, use_p)
        if use_p:
            q, p = side(*student), side(*teacher)
        else:  # rkl: the teacher's exponentials go first into the buffer that then keeps q
            p, q = side(*teacher), side(*student)
        v, terms_a = terms(x, y, q, p, weights[a:b, :1], weights[a:b, 1:], work[n_work:])
        torch.sum(v, -1, out=value[a:b])
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
            m = rows.amax(-1).float()
            # the same operations as the forward's first pass (the exponentials in place here); a
            # row that is −inf throughout (a masked part of the vocabulary) is (−inf, −inf), as in
            # the kernel, not the NaN of (−inf) − (−inf)
            s = log_sum_into(shift_into(x, rows, m, inv_tau))
            pair[a:b, 0], pair[a:b, 1] = m, torch.where(m == float("-inf"), float("-inf"), s)

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
    blocks = row_blocks(active, n, V, period)
    inv_tau = 1.0 / temperature
    terms = DIVERGENCE_TERMS[kind]

    def block(a, b, _mask, buffers):
        x, y, spare = _given_log_probs(z_rows(a, b), w_rows(a, b), buffers, lse_s[a:b], lse_t[a:b], inv_tau)
        v, terms_a = terms(x, y, None, None, weights[a:b, :1], weights[a:b, 1:], spare)
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
    inv_tau = 1.0 / temperature
    scale = (grad_value * inv_tau).unsqueeze(1)
    total = row_sum.unsqueeze(1)
    blocks = row_blocks(live, n, V, period)
    terms = DIVERGENCE_TERMS[kind]

    def block(a, b, _mask, buffers):
        x, y, spare = _given_log_probs(z_rows(a, b), w_rows(a, b), buffers, lse_s[a:b], lse_t[a:b], inv_tau)
        g = terms(x, y, None, None, weights[a:b, :1], weights[a:b, 1:], spare, grad=(total[a:b], scale[a:b]))
        grad[a:b, :V].copy_(g)  # g/τ · (a_v − q_v·S)

    for_blocks(blocks, block, _buffers(blocks, V, dev, 2 + DIVERGENCE_SPARES[kind][1]))
    if V < V_s:
        grad[:, V:].zero_()
    dead = (~live).nonzero().squeeze(1)  # never written, or computed inside a mostly live block
    if dead.numel():
        grad.index_fill_(0, dead, 0.0)
    return grad.view(B, T, V_s)
