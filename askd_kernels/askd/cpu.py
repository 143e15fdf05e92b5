"""The ASKD family's CPU path: the three stages of the Triton kernels in chunked PyTorch, same math.

Used for CPU tensors (and anywhere with ``ASKD_KERNELS_BACKEND=torch``): :func:`row_stats` is stage
(a) of :mod:`.triton_row_stats`, :func:`coefficients` stage (b) of :mod:`.triton_coefficients`,
:func:`student_gradient` stage (c) of :mod:`.triton_gradient`; their docstrings hold the formulas.
Rows are streamed in cache-sized blocks (:func:`askd_kernels._torch_math.row_blocks`), so the temporaries are a
few chunks of rows × vocab in fp32, never tokens × vocab. This is the library's fallback, not the
test oracle: ``reference/`` is written independently and materialises everything in fp64.
"""
import torch

from .._torch_math import (chunk_rows, divergence_terms, for_blocks, log_mixture, log_prob_at,
                           log_softmax_at, log_softmax_into, row_blocks, rows_view, softmax_into)


def _buffer(rows: int, n_cols: int, device) -> torch.Tensor:
    """One fp32 work buffer of ``rows × n_cols`` elements, allocated once per call and reused by every
    block (each block views its first elements as one contiguous ``[block rows, width]`` block)."""
    return torch.empty(rows * n_cols, dtype=torch.float32, device=device)


def row_stats(student_logits, labels, teacher_logits, teacher_logprobs, *, temperature, ignore_index):
    """Stage (a); see :mod:`.triton_row_stats`. Returns fp32 ``(log_q [B·T], log_ratio [B·T], lse [B·T, 2])``.

    Streams blocks of rows (:func:`askd_kernels._torch_math.row_blocks`): per block and per side,
    :func:`askd_kernels._torch_math.log_softmax_into` — one pass that converts the logits into a
    reused fp32 buffer (none for fp32 logits), the max, the fused log-softmax in place, the max of
    its result (−s) — then the label's entry gathered from the log-probabilities. The teacher's pair
    is not kept, so at τ = 1 its side has no max pass. Every per-row result is written by ``out=``
    into slices of the call's vectors, and whatever does not depend on the logits (the labels'
    indices, the out-of-range labels, −s → s) is done once for all rows: each block is a handful of
    ops, whose Python overhead is paid per block and, with two worker threads, under one GIL.
    Ignored rows are skipped (or, inside a mostly valid block, computed and discarded)."""
    B, T, V_s = student_logits.shape
    n = B * T
    dev = student_logits.device
    flat_labels = labels.reshape(n)
    valid = flat_labels != ignore_index
    inv_tau = 1.0 / temperature
    log_q = torch.zeros((n, 1), dtype=torch.float32, device=dev)
    m, neg_s = torch.zeros(n, dtype=torch.float32, device=dev), torch.zeros(n, dtype=torch.float32, device=dev)
    inside = (flat_labels >= 0) & (flat_labels < V_s)
    index = torch.where(inside, flat_labels, 0).unsqueeze(1)  # gathered, then NaN below where outside
    z_rows, period = rows_view(student_logits)
    w_rows, V_t = None, 0
    if teacher_logits is not None:
        w_rows, w_period = rows_view(teacher_logits)
        period, V_t = period or w_period, teacher_logits.shape[2]
        inside_t = (flat_labels >= 0) & (flat_labels < V_t)  # a label beyond V_t: p = 0, log p = −inf
        index_t = torch.where(inside_t, flat_labels, 0).unsqueeze(1)
        log_p = torch.zeros((n, 1), dtype=torch.float32, device=dev)
    width = max(V_s, V_t)
    blocks = row_blocks(valid, n, width, period)
    rows = min(chunk_rows(width), max((b - a for a, b, _ in blocks), default=0))

    def block(a, b, _mask, work):  # rows of a mixed block are kept by the torch.where below
        x = log_softmax_into(work[:(b - a) * V_s].view(b - a, V_s), z_rows(a, b), inv_tau, m[a:b], neg_s[a:b])
        torch.gather(x, 1, index[a:b], out=log_q[a:b])
        if w_rows is not None:  # the same buffer, after the student's
            y = log_softmax_into(work[:(b - a) * V_t].view(b - a, V_t), w_rows(a, b), inv_tau)
            torch.gather(y, 1, index_t[a:b], out=log_p[a:b])

    for_blocks(blocks, block, lambda: _buffer(rows, width, dev))
    if teacher_logits is not None:
        log_p = torch.where(inside_t, log_p.squeeze(1), float("-inf"))
    else:
        log_p = teacher_logprobs.reshape(n).float()
    # Out-of-range student labels poison the row with NaN, as the kernel does; ignored rows read 0.
    log_q = torch.where(valid, torch.where(inside, log_q.squeeze(1), float("nan")), 0.0)
    lse = torch.where(valid.unsqueeze(1), torch.stack([m, 0.0 - neg_s], 1), 0.0)  # 0 − (−s): s = +0, not −0
    log_ratio = torch.where(valid, log_p - log_q, 0.0)
    return log_q, log_ratio, lse


def _to_width(x, width):
    """A chunk of log-probabilities cut or padded with −inf (probability 0) to ``width`` columns."""
    return x[:, :width] if x.shape[1] >= width else torch.nn.functional.pad(x, (0, width - x.shape[1]),
                                                                           value=float("-inf"))


def _by_kind(sgo_rows):
    """``(kind, row mask)`` pairs of a chunk: srkl for SGO rows, skl for TGO rows."""
    return (("srkl", sgo_rows), ("skl", ~sgo_rows))


def full_vocab_row_stats(student_logits, labels, teacher_logits, alpha, sgo, kappa, *, temperature, ignore_index):
    """Stage (a) of ``rao_blackwell``; see :func:`.triton_row_stats.full_vocab_row_stats`. Returns fp32
    ``(log_q, log_ratio, lse [·, 2], lse_t [·, 2], fv_value, fv_sum)`` over the B·T tokens."""
    B, T, V_s = student_logits.shape
    V_t = teacher_logits.shape[2]
    n = B * T
    dev = student_logits.device
    z_rows, period = rows_view(student_logits)
    w_rows, w_period = rows_view(teacher_logits)
    flat_labels = labels.reshape(n)
    valid = flat_labels != ignore_index
    inv_tau = 1.0 / temperature
    log_q, log_p, fv_value, fv_sum = (torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(4))
    lse, lse_t = (torch.zeros((n, 2), dtype=torch.float32, device=dev) for _ in range(2))
    log_w = torch.stack([torch.log(alpha), torch.log1p(-alpha)], 1)
    seq_of = torch.arange(n, device=dev) // T
    is_sgo, unclipped = sgo.bool(), kappa != 0

    def block(a, b, mask, _state):
        lab, seq = flat_labels[a:b], seq_of[a:b]
        z, w = z_rows(a, b), w_rows(a, b)
        # The blocks' log-probabilities come with the pairs (those of log_softmax_at, bit for bit).
        log_q[a:b], lse[a:b], x = log_prob_at(z, lab, inv_tau)
        log_p[a:b], lse_t[a:b], y = log_prob_at(w, lab, inv_tau)
        # Summed over the student's vocabulary: the teacher's columns beyond V_s are no label's.
        y = _to_width(y, V_s)
        keep = unclipped[seq] if mask is None else unclipped[seq] & mask  # clipped: no value, no gradient
        for kind, rows in _by_kind(is_sgo[seq]):
            rows = rows & keep
            v, g, _q = divergence_terms(x[rows], y[rows], log_w[seq[rows], :1], log_w[seq[rows], 1:], kind)
            fv_value[a:b][rows], fv_sum[a:b][rows] = v.sum(-1), g.sum(-1)

    for_blocks(row_blocks(valid, n, max(V_s, V_t), period or w_period), block)
    # As the kernel: NaN for an out-of-range label, never out of bounds; ignored rows read 0.
    log_q = torch.where(valid, torch.where((flat_labels >= 0) & (flat_labels < V_s), log_q, float("nan")), 0.0)
    lse, lse_t = (torch.where(valid.unsqueeze(1), pair, 0.0) for pair in (lse, lse_t))
    return log_q, torch.where(valid, log_p - log_q, 0.0), lse, lse_t, fv_value, fv_sum


def _suffix_sum(x):
    return torch.flip(torch.cumsum(torch.flip(x, (-1,)), -1), (-1,))


def _discounted_suffix_sums(x, valid, gamma):
    """``G_t = x_t + γ·G_{next valid}`` over valid positions (x is 0 at invalid ones), along the last
    dimension. γ = 1 is a plain reverse cumulative sum; otherwise a loop over T, vectorised over the
    rest (counting k in *valid* positions has no overflow-free closed form for long sequences)."""
    if gamma == 1.0:
        return _suffix_sum(x)
    out = torch.empty_like(x)
    running = torch.zeros_like(x[..., 0])
    for t in range(x.shape[-1] - 1, -1, -1):
        running = torch.where(valid[:, t], x[..., t] + gamma * running, running)
        out[..., t] = running
    return out


def coefficients(log_q, log_ratio, log_q_old, labels, alpha, sgo, kappa, *, estimator, gamma, w_max,
                 length_normalize, ignore_index, fv_value=None, baseline=None):
    """Stage (b); see :func:`.triton_coefficients.coefficients`. Returns ``(lam, coef, ret, value)``."""
    B, T = labels.shape
    valid = labels != ignore_index
    ell = log_ratio.view(B, T)
    log_a = torch.log(alpha).unsqueeze(1)
    log_1ma = torch.log1p(-alpha).unsqueeze(1)
    # At α = 1 the mixture ignores ℓ, even ℓ = +inf (q = 0 at the label): min(ℓ, 0) keeps u = 0 exact.
    ell_m = torch.where(log_1ma == float("-inf"), torch.clamp(ell, max=0.0), ell)
    u = torch.where(valid, log_mixture(log_a, log_1ma, ell_m), 0.0)
    log_rho = torch.where(valid, log_a - u, 0.0)
    rho = log_rho.exp()

    g, n_rem = _discounted_suffix_sums(torch.stack([u, valid.float()]), valid, gamma)
    if length_normalize:
        g = g / torch.where(valid, n_rem, 1.0)
    p_suffix = _suffix_sum(log_rho).exp()

    sum_l = torch.where(valid, ell, 0.0).sum(1, keepdim=True)
    sum_l_m = torch.where(log_1ma == float("-inf"), torch.clamp(sum_l, max=0.0), sum_l)  # as ell_m, α = 1
    u_seq = log_mixture(log_a, log_1ma, sum_l_m)
    sig_seq = torch.exp(log_a - u_seq)
    # The SGO return that multiplies ∇log q(y_t): G_t, or F_t = G_t − u_t for rao_blackwell.
    ret = {"exact": g, "paper": g, "sequence": torch.zeros_like(g), "rao_blackwell": g - u}[estimator]
    ret_b = ret if baseline is None else ret - baseline.view(B, T)
    lam_tgo, lam_sgo = {
        "exact": (rho, ret_b + rho - 1.0),
        "paper": (p_suffix, g + p_suffix - 1.0),
        "sequence": (sig_seq.expand(B, T), (u_seq + sig_seq - 1.0).expand(B, T)),
        "rao_blackwell": (torch.zeros_like(g), ret_b),
    }[estimator]
    is_sgo = sgo.bool().unsqueeze(1)
    weight = torch.clamp(torch.exp(log_q.view(B, T) - log_q_old.view(B, T)), max=w_max)
    weight = torch.where(log_q.view(B, T) == log_q_old.view(B, T), 1.0, weight)  # ratio 1, even at q = 0
    lam = torch.where(is_sgo, lam_sgo, lam_tgo)
    k = kappa.unsqueeze(1)
    coef = torch.where(valid & (k != 0), torch.where(is_sgo, weight, 1.0) * lam * k, 0.0)
    # TGO: ℓ − u = log(p/m) = −log((1−α) + α e^{−ℓ}), finite when q = 0 at the label (ℓ = +inf).
    if estimator == "sequence":
        d = torch.where(is_sgo, -u_seq, -log_mixture(log_1ma, log_a, -sum_l)).squeeze(1)
    elif estimator == "rao_blackwell":
        # The value never reads the label: a NaN log q (a label outside the vocabulary) must show.
        fv = torch.where(torch.isnan(log_q.view(B, T)), float("nan"), fv_value.view(B, T))
        d = torch.where(valid, fv, 0.0).sum(1)
    else:
        d = torch.where(valid, torch.where(is_sgo, -u, -log_mixture(log_1ma, log_a, -ell)), 0.0).sum(1)
    value = torch.where(kappa != 0, kappa * d, 0.0)
    return torch.where(valid, lam, 0.0).reshape(-1), coef.reshape(-1), torch.where(valid, ret, 0.0).reshape(-1), value


def student_gradient(student_logits, labels, coef, lse, grad_seq, *, temperature):
    """Stage (c); see :mod:`.triton_gradient`. Rows with a zero factor are not read (they get exact zeros).

    Written block by block straight into the gradient's final buffer. Per block, the probabilities
    ``exp((z − m)/τ − s)`` come from the fused softmax kernel as ``c·p`` with a per-row
    ``c = e^{−s}/r`` (:func:`askd_kernels._torch_math.softmax_into`: exact for any (max, log-sum)
    pair, also a vocabulary shard's with the whole row's pair).

    * bf16/fp16 logits: in a reused fp32 block buffer one column wider (passes: the conversion, the
      kernel), then −1/c added at the label and one pass that multiplies by ``c·factor`` and stores
      the result in the gradient, converting it: ``factor·(c·p − onehot)``.
    * fp32 logits: in the gradient's own rows (the max, the kernel reading the logits, the max of
      its result), then ``× c``, −1 at the label and ``× factor``: the factor, with the upstream
      gradient in it, is the last multiplication, as in the kernel, so the gradient stays one
      rounding from that product.

    ``e^{−s}``, the factor and the label's ``−e^{s}`` are formed once for all rows."""
    B, T, V_s = student_logits.shape
    n = B * T
    dev = student_logits.device
    flat_labels = labels.reshape(n)
    inv_tau = 1.0 / temperature
    scale = coef * grad_seq.repeat_interleave(T) / temperature
    live = scale != 0
    # softmax(z/τ) rebuilt from the forward's (max, log-sum) pair, − onehot, times the row factor. A
    # label outside [0, V_s) (unchecked under torch.compile) already made this row NaN in the
    # forward; it must not index out of bounds here.
    inside = (flat_labels >= 0) & (flat_labels < V_s)
    at_label = torch.where(inside, -1.0, 0.0).unsqueeze(1)  # − onehot (nothing for an outside label)
    safe_labels = flat_labels.clamp(0, V_s - 1).unsqueeze(1)
    m, e_s, factor = lse[:, :1], torch.exp(-lse[:, 1:]), scale.unsqueeze(1)  # e_s = e^{−s}
    # Allocated in its final shape so autograd can take it over without a copy.
    grad = torch.empty((B, T, V_s), dtype=student_logits.dtype, device=dev)
    rows_out = grad.view(n, V_s)
    z_rows, period = rows_view(student_logits)
    blocks = row_blocks(live, n, V_s, period)
    rows = min(chunk_rows(V_s), max((b - a for a, b, _ in blocks), default=0))
    fp32 = student_logits.dtype == torch.float32
    if not fp32:  # c·factor = e^{−s}·factor/r; −1/c = −e^{s}·r (c is never 0 or infinite here)
        e_s_factor, at_label = e_s * factor, at_label / e_s

    def block(a, b, _mask, work):
        if fp32:  # softmax − onehot, then × the factor
            p, r = softmax_into(rows_out[a:b], z_rows(a, b), m[a:b], inv_tau)
            p.mul_(torch.div(e_s[a:b], r)).scatter_add_(1, safe_labels[a:b], at_label[a:b]).mul_(factor[a:b])
        else:  # (p − onehot/c)·(c·factor), and the store into the bf16/fp16 gradient, in one pass
            p, r = softmax_into(work[:(b - a) * (V_s + 1)].view(b - a, V_s + 1), z_rows(a, b), m[a:b], inv_tau)
            p.scatter_add_(1, safe_labels[a:b], torch.mul(at_label[a:b], r))
            torch.mul(p, torch.div(e_s_factor[a:b], r), out=rows_out[a:b])

    for_blocks(blocks, block, lambda: None if fp32 else _buffer(rows, V_s + 1, dev))
    # Rows with a zero factor (never written, or computed inside a mostly live block): exact zeros.
    dead = (~live).nonzero().squeeze(1)
    if dead.numel():
        rows_out.index_fill_(0, dead, 0.0)
    return grad


def full_vocab_gradient(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha, sgo, kappa, grad_seq,
                        *, temperature, ignore_index):
    """Stage (c) of ``rao_blackwell``; see :func:`.triton_gradient.full_vocab_gradient`."""
    B, T, V_s = student_logits.shape
    n = B * T
    dev = student_logits.device
    z_rows, period = rows_view(student_logits)
    w_rows, w_period = rows_view(teacher_logits)
    flat_labels = labels.reshape(n)
    g = grad_seq.repeat_interleave(T)
    seq_of = torch.arange(n, device=dev) // T
    scale_label = coef * g / temperature
    scale = torch.where(flat_labels != ignore_index, kappa[seq_of] * g / temperature, 0.0)
    scale = torch.where(torch.isinf(fv_sum), 0.0, scale)  # an infinite value: zero gradient, not NaN
    log_w = torch.stack([torch.log(alpha), torch.log1p(-alpha)], 1)
    grad = torch.zeros((B, T, V_s), dtype=student_logits.dtype, device=dev)
    rows_out = grad.view(n, V_s)
    inv_tau = 1.0 / temperature
    live = (scale != 0) | (scale_label != 0)
    is_sgo = sgo.bool()

    def block(a, b, mask, _state):
        seq = seq_of[a:b]
        x = log_softmax_at(z_rows(a, b), lse[a:b, 0], lse[a:b, 1], inv_tau)
        y = _to_width(log_softmax_at(w_rows(a, b), lse_t[a:b, 0], lse_t[a:b, 1], inv_tau), V_s)
        # − onehot only for a label inside [0, V_s): a label of another vocabulary shard (V_s, see
        # askd/vocab_parallel.py) or an unchecked outside label marks no column (as the kernel's clamp)
        lab = flat_labels[a:b]
        inside = ((lab >= 0) & (lab < V_s)).to(x.dtype).unsqueeze(1)
        onehot = torch.nn.functional.one_hot(lab.clamp(0, V_s - 1), V_s).to(x.dtype) * inside
        out = rows_out[a:b]
        for kind, rows in _by_kind(is_sgo[seq]):
            if mask is not None:
                rows = rows & mask
            _v, d, q = divergence_terms(x[rows], y[rows], log_w[seq[rows], :1], log_w[seq[rows], 1:], kind)
            k, s_row = scale[a:b][rows].unsqueeze(1), fv_sum[a:b][rows].unsqueeze(1)
            c = scale_label[a:b][rows].unsqueeze(1)
            full = torch.where(k != 0, k * (d - q * s_row), 0.0)
            out[rows] = (full + c * (q - onehot[rows])).to(grad.dtype)

    for_blocks(row_blocks(live, n, V_s, period or w_period), block)
    return grad
