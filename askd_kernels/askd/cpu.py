"""The ASKD family's CPU path: the three stages of the Triton kernels in chunked PyTorch, same math.

Used for CPU tensors (and anywhere with ``ASKD_KERNELS_BACKEND=torch``): :func:`row_stats` is stage
(a) of :mod:`.triton_row_stats`, :func:`coefficients` stage (b) of :mod:`.triton_coefficients`,
:func:`student_gradient` stage (c) of :mod:`.triton_gradient`; their docstrings hold the formulas.
Rows are processed in chunks (:func:`askd_kernels._torch_math.row_chunks`), so the temporaries are a
few chunks of rows × vocab in fp32, never tokens × vocab. This is the library's fallback, not the
test oracle: ``reference/`` is written independently and materialises everything in fp64.
"""
import torch

from .._torch_math import divergence_terms, log_mixture, log_prob_at, log_softmax_at, row_chunks


def row_stats(student_logits, labels, teacher_logits, teacher_logprobs, *, temperature, ignore_index):
    """Stage (a); see :mod:`.triton_row_stats`. Returns fp32 ``(log_q [B·T], log_ratio [B·T], lse [B·T, 2])``."""
    B, T, V_s = student_logits.shape
    n = B * T
    z = student_logits.reshape(n, V_s)
    w = None if teacher_logits is None else teacher_logits.reshape(n, teacher_logits.shape[2])
    flat_labels = labels.reshape(n)
    valid = flat_labels != ignore_index
    inv_tau = 1.0 / temperature
    log_q = torch.zeros(n, dtype=torch.float32, device=z.device)
    log_p = torch.zeros_like(log_q) if w is not None else teacher_logprobs.reshape(n).float()
    lse = torch.zeros((n, 2), dtype=torch.float32, device=z.device)
    rows = valid.nonzero().squeeze(-1)  # ignored positions cost no vocabulary pass
    width = max(V_s, 0 if w is None else w.shape[1])
    for idx, sel in row_chunks(rows, n, width):
        lab = flat_labels[sel]
        lq, ls = log_prob_at(z[sel], lab, inv_tau)
        # Out-of-range student labels poison the row with NaN, as the kernel does.
        log_q[idx] = torch.where((lab >= 0) & (lab < V_s), lq, float("nan"))
        lse[idx] = ls
        if w is not None:
            log_p[idx] = log_prob_at(w[sel], lab, inv_tau)[0]
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
    z, w = student_logits.reshape(n, V_s), teacher_logits.reshape(n, V_t)
    flat_labels = labels.reshape(n)
    valid = flat_labels != ignore_index
    inv_tau = 1.0 / temperature
    log_q, log_p, fv_value, fv_sum = (torch.zeros(n, dtype=torch.float32, device=z.device) for _ in range(4))
    lse, lse_t = (torch.zeros((n, 2), dtype=torch.float32, device=z.device) for _ in range(2))
    log_w = torch.stack([torch.log(alpha), torch.log1p(-alpha)], 1)
    for idx, sel in row_chunks(valid.nonzero().squeeze(-1), n, max(V_s, V_t)):
        lab, seq = flat_labels[sel], idx // T
        lq, ls = log_prob_at(z[sel], lab, inv_tau)
        log_p[idx], lt = log_prob_at(w[sel], lab, inv_tau)
        log_q[idx] = torch.where((lab >= 0) & (lab < V_s), lq, float("nan"))  # as the kernel: NaN, never out of bounds
        lse[idx], lse_t[idx] = ls, lt
        # Summed over the student's vocabulary: the teacher's columns beyond V_s are no label's.
        x = log_softmax_at(z[sel], ls[:, 0], ls[:, 1], inv_tau)
        y = _to_width(log_softmax_at(w[sel], lt[:, 0], lt[:, 1], inv_tau), V_s)
        for kind, rows in _by_kind(sgo[seq].bool()):
            rows = rows & (kappa[seq] != 0)  # clipped sequences: no value, no gradient
            v, a, _q = divergence_terms(x[rows], y[rows], log_w[seq[rows], :1], log_w[seq[rows], 1:], kind)
            fv_value[idx[rows]], fv_sum[idx[rows]] = v.sum(-1), a.sum(-1)
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
    """Stage (c); see :mod:`.triton_gradient`. Rows with a zero factor are not read."""
    B, T, V_s = student_logits.shape
    n = B * T
    z = student_logits.reshape(n, V_s)
    flat_labels = labels.reshape(n)
    scale = coef * grad_seq.repeat_interleave(T) / temperature
    rows = (scale != 0).nonzero().squeeze(-1)
    everything = rows.numel() == n
    # Allocated in its final shape so autograd can take it over without a copy.
    grad = (torch.empty if everything else torch.zeros)((B, T, V_s), dtype=student_logits.dtype, device=z.device)
    rows_out = grad.view(n, V_s)
    for idx, sel in row_chunks(rows, n, V_s):
        # softmax(z/τ) rebuilt from the forward's (max, log-sum) pair, − onehot, times the row factor.
        prob = log_softmax_at(z[sel], lse[idx, 0], lse[idx, 1], 1.0 / temperature).exp_()
        prob.mul_(scale[idx].unsqueeze(1))
        # A label outside [0, V_s) (unchecked under torch.compile) already made this row NaN in the
        # forward; it must not index out of bounds here.
        lab = flat_labels[idx]
        inside = (lab >= 0) & (lab < V_s)
        prob[torch.arange(idx.numel(), device=z.device), lab.clamp(0, V_s - 1)] -= torch.where(inside, scale[idx], 0.0)
        rows_out[sel] = prob.to(grad.dtype)
    return grad


def full_vocab_gradient(student_logits, labels, teacher_logits, coef, lse, lse_t, fv_sum, alpha, sgo, kappa, grad_seq,
                        *, temperature, ignore_index):
    """Stage (c) of ``rao_blackwell``; see :func:`.triton_gradient.full_vocab_gradient`."""
    B, T, V_s = student_logits.shape
    n = B * T
    z, w = student_logits.reshape(n, V_s), teacher_logits.reshape(n, teacher_logits.shape[2])
    flat_labels = labels.reshape(n)
    g = grad_seq.repeat_interleave(T)
    seq_of = torch.arange(n, device=z.device) // T
    scale_label = coef * g / temperature
    scale = torch.where(flat_labels != ignore_index, kappa[seq_of] * g / temperature, 0.0)
    scale = torch.where(torch.isinf(fv_sum), 0.0, scale)  # an infinite value: zero gradient, not NaN
    log_w = torch.stack([torch.log(alpha), torch.log1p(-alpha)], 1)
    grad = torch.zeros((B, T, V_s), dtype=student_logits.dtype, device=z.device)
    rows_out = grad.view(n, V_s)
    inv_tau = 1.0 / temperature
    for idx, sel in row_chunks(((scale != 0) | (scale_label != 0)).nonzero().squeeze(-1), n, V_s):
        seq = idx // T
        x = log_softmax_at(z[sel], lse[idx, 0], lse[idx, 1], inv_tau)
        y = _to_width(log_softmax_at(w[sel], lse_t[idx, 0], lse_t[idx, 1], inv_tau), V_s)
        lab = flat_labels[idx]
        onehot = torch.nn.functional.one_hot(lab.clamp(0, V_s - 1), V_s).to(x.dtype)
        for kind, rows in _by_kind(sgo[seq].bool()):
            _v, a, q = divergence_terms(x[rows], y[rows], log_w[seq[rows], :1], log_w[seq[rows], 1:], kind)
            k, s_row, c = scale[idx[rows]].unsqueeze(1), fv_sum[idx[rows]].unsqueeze(1), scale_label[idx[rows]].unsqueeze(1)
            full = torch.where(k != 0, k * (a - q * s_row), 0.0)
            rows_out[idx[rows]] = (full + c * (q - onehot[rows])).to(grad.dtype)
    return grad
