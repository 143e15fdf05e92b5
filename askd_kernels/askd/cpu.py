"""The ASKD family's CPU path: the three stages of the Triton kernels in chunked PyTorch, same math.

Used for CPU tensors (and anywhere with ``ASKD_KERNELS_BACKEND=torch``): :func:`row_stats` is stage
(a) of :mod:`.triton_row_stats`, :func:`coefficients` stage (b) of :mod:`.triton_coefficients`,
:func:`student_gradient` stage (c) of :mod:`.triton_gradient`; their docstrings hold the formulas.
Rows are streamed in cache-sized blocks (:func:`askd_kernels._torch_math.row_blocks`), so the temporaries are a
few chunks of rows × vocab in fp32, never tokens × vocab. This is the library's fallback, not the
test oracle: ``reference/`` is written independently and materialises everything in fp64.
"""
import torch

from .._torch_math import (chunk_rows, divergence_terms, for_blocks, log_mixture, log_prob_at, log_softmax_at,
                           row_blocks, rows_view, shift_into)


def _buffer(rows: int, n_cols: int, device) -> torch.Tensor:
    """One fp32 ``[rows, n_cols]`` work buffer, allocated once per call and reused by every block."""
    return torch.empty((rows, n_cols), dtype=torch.float32, device=device)


def row_stats(student_logits, labels, teacher_logits, teacher_logprobs, *, temperature, ignore_index):
    """Stage (a); see :mod:`.triton_row_stats`. Returns fp32 ``(log_q [B·T], log_ratio [B·T], lse [B·T, 2])``.

    Streams blocks of rows (:func:`askd_kernels._torch_math.row_blocks`): per block and per side,
    the max in the logits' dtype, one pass that converts and shifts into a reused fp32 buffer, the
    label's entry, then exp and sum in place; ignored rows are skipped (or, inside a mostly valid
    block, computed and discarded)."""
    B, T, V_s = student_logits.shape
    n = B * T
    dev = student_logits.device
    flat_labels = labels.reshape(n)
    valid = flat_labels != ignore_index
    inv_tau = 1.0 / temperature
    log_q = torch.zeros(n, dtype=torch.float32, device=dev)
    log_p = torch.zeros_like(log_q) if teacher_logits is not None else teacher_logprobs.reshape(n).float()
    lse = torch.zeros((n, 2), dtype=torch.float32, device=dev)
    z_rows, period = rows_view(student_logits)
    w_rows = None
    if teacher_logits is not None:
        w_rows, w_period = rows_view(teacher_logits)
        period = period or w_period
    width = max(V_s, 0 if teacher_logits is None else teacher_logits.shape[2])
    blocks = row_blocks(valid, n, width, period)
    rows = min(chunk_rows(width), max((b - a for a, b, _ in blocks), default=0))

    def block(a, b, _mask, work):  # rows of a mixed block are kept by the torch.where below
        lab = flat_labels[a:b]
        log_q[a:b], lse[a:b] = log_prob_at(z_rows(a, b), lab, inv_tau, work)
        if w_rows is not None:
            log_p[a:b] = log_prob_at(w_rows(a, b), lab, inv_tau, work)[0]

    for_blocks(blocks, block, lambda: _buffer(rows, width, dev))
    # Out-of-range student labels poison the row with NaN, as the kernel does; ignored rows read 0.
    log_q = torch.where(valid, torch.where((flat_labels >= 0) & (flat_labels < V_s), log_q, float("nan")), 0.0)
    lse = torch.where(valid.unsqueeze(1), lse, 0.0)
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
        log_q[a:b], ls = log_prob_at(z, lab, inv_tau)
        log_p[a:b], lt = log_prob_at(w, lab, inv_tau)
        lse[a:b], lse_t[a:b] = ls, lt
        # Summed over the student's vocabulary: the teacher's columns beyond V_s are no label's.
        x = log_softmax_at(z, ls[:, 0], ls[:, 1], inv_tau)
        y = _to_width(log_softmax_at(w, lt[:, 0], lt[:, 1], inv_tau), V_s)
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

    Written block by block straight into the gradient's final buffer: per block one pass converts
    and shifts the logits into fp32 (into the gradient rows themselves for fp32 logits, else a
    reused block buffer), then ``exp((z − m)/τ − s)`` in place, minus 1 at the label, and one pass
    that multiplies by the row factor and stores the result in the gradient (converting to
    bf16/fp16): ``factor·(softmax − onehot)``, as the kernel forms it."""
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
    m, s, factor = lse[:, :1], lse[:, 1:], scale.unsqueeze(1)
    # Allocated in its final shape so autograd can take it over without a copy.
    grad = torch.empty((B, T, V_s), dtype=student_logits.dtype, device=dev)
    rows_out = grad.view(n, V_s)
    z_rows, period = rows_view(student_logits)
    blocks = row_blocks(live, n, V_s, period)
    rows = min(chunk_rows(V_s), max((b - a for a, b, _ in blocks), default=0))
    fp32 = student_logits.dtype == torch.float32

    def block(a, b, _mask, work):
        out = rows_out[a:b] if fp32 else work[:b - a]
        shift_into(out, z_rows(a, b), m[a:b].squeeze(1), inv_tau)
        out.sub_(s[a:b]).exp_()
        out.scatter_add_(1, safe_labels[a:b], at_label[a:b])  # softmax − onehot, in fp32
        # × the row factor, and for bf16/fp16 the store into the gradient, in one pass
        torch.mul(out, factor[a:b], out=rows_out[a:b])

    for_blocks(blocks, block, lambda: None if fp32 else _buffer(rows, V_s, dev))
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
