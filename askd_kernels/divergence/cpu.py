"""The divergence family's CPU path: :mod:`.triton`'s two kernels in blocked PyTorch.

Same math, same outputs: active rows (valid, not clipped) are streamed in blocks of rows
(:func:`askd_kernels._torch_math.row_blocks`: cache-sized slices of the logits, never gathered
copies), and the per-kind terms are :func:`askd_kernels._torch_math.divergence_terms`.

Per block, each side is one pass that converts the logits to fp32 and shifts them by the row
maximum into a buffer reused by every block (:func:`askd_kernels._torch_math.shift_into`), then the
log-sum (the forward) or the forward's (max, log-sum) pair (the backward) turns it into log q / log p
in place; ``divergence_terms`` runs on the whole block, which stays in the cache. The forward reduces
the terms to their row sums; the backward turns them into the gradient rows in place and stores
them into the gradient's final buffer.

The forward's probabilities are the log-sum's exponentials times e^{−s} (a multiply, not a second
exp per element).

:func:`pairs` and :func:`forward_given_pairs` are the forward's two passes run separately (the
vocabulary-parallel path, :mod:`.vocab_parallel`): the first pass's pairs of a shard, and the second
pass from given (global) pairs, as the backward rebuilds log q / log p from them.

Memory: four fp32 block buffers in the forward (log q, log p and the two sides' exponentials, which
become q and p), two in the backward, plus the temporaries of ``divergence_terms`` on one block
(≤ ~8 block-sized tensors for srkl) — per worker thread, bounded by the block, never by tokens ×
vocabulary; and O(tokens) vectors.
"""
import torch

from .._torch_math import chunk_rows, divergence_terms, for_blocks, log_sum_into, row_blocks, rows_view, shift_into


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
    """``(log q, log p)`` of a block of rows from their given (max, log-sum) pairs ``[r, 2]``:
    ``(z − m)/τ − s`` written into the two fp32 block ``buffers``, which are returned."""
    x, y = buffers
    for rows, out, pair in ((z_rows, x, lse_s), (w_rows, y, lse_t)):
        shift_into(out, rows, pair[:, 0], inv_tau).sub_(pair[:, 1:])
    return x, y


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

    def block(a, b, _mask, buffers):  # rows of a mixed block are zeroed by the torch.where below
        r = b - a
        x, y, q, p = (buf[:r] for buf in buffers)
        for rows, out, e, pair in ((z_rows(a, b), x, q, lse_s), (w_rows(a, b), y, p, lse_t)):
            m = rows.amax(-1).float()
            s = log_sum_into(shift_into(out, rows, m, inv_tau), e)
            out.sub_(s.unsqueeze(1))  # log softmax(z/τ) = (z − m)/τ − s, NaN rows stay NaN
            # the probabilities from the log-sum's exponentials: e^{(z − m)/τ}·e^{−s}, no second exp
            e.mul_(torch.exp(-s).unsqueeze(1))
            pair[a:b, 0], pair[a:b, 1] = m, s
        v, g, _q = divergence_terms(x, y, weights[a:b, :1], weights[a:b, 1:], kind, q=q, p=p)
        torch.sum(v, -1, out=value[a:b])
        torch.sum(g, -1, out=row_sum[a:b])

    for_blocks(blocks, block, _buffers(blocks, V, dev, 4))
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

    def block(a, b, _mask, buffers):
        r = b - a
        x, y = _given_log_probs(z_rows(a, b), w_rows(a, b), (buf[:r] for buf in buffers), lse_s[a:b], lse_t[a:b],
                                inv_tau)
        v, g, _q = divergence_terms(x, y, weights[a:b, :1], weights[a:b, 1:], kind)
        torch.sum(v, -1, out=value[a:b])
        torch.sum(g, -1, out=row_sum[a:b])

    for_blocks(blocks, block, _buffers(blocks, V, dev, 2))
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

    def block(a, b, _mask, buffers):
        r = b - a
        x, y = _given_log_probs(z_rows(a, b), w_rows(a, b), (buf[:r] for buf in buffers), lse_s[a:b], lse_t[a:b],
                                inv_tau)
        _v, g, q = divergence_terms(x, y, weights[a:b, :1], weights[a:b, 1:], kind)
        g = g.sub_(q.mul_(total[a:b])).mul_(scale[a:b])  # g/τ · (a_v − q_v·S), in place
        grad[a:b, :V].copy_(g)

    for_blocks(blocks, block, _buffers(blocks, V, dev, 2))
    if V < V_s:
        grad[:, V:].zero_()
    dead = (~live).nonzero().squeeze(1)  # never written, or computed inside a mostly live block
    if dead.numel():
        grad.index_fill_(0, dead, 0.0)
    return grad.view(B, T, V_s)
