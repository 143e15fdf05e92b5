"""The ASKD family's CPU path: the three stages of the Triton kernels in chunked PyTorch, same math.

Used for CPU tensors (and anywhere with ``ASKD_KERNELS_BACKEND=torch``): :func:`row_stats` is stage
(a) of :mod:`.triton_row_stats`, :func:`coefficients` stage (b) of :mod:`.triton_coefficients`,
:func:`student_gradient` stage (c) of :mod:`.triton_gradient`; their docstrings hold the formulas.
Rows are processed in chunks (:func:`askd_kernels._torch_math.row_chunks`), so the temporaries are a
few chunks of rows × vocab in fp32, never tokens × vocab. This is the library's fallback, not the
test oracle: ``reference/`` is written independently and materialises everything in fp64.
"""
import torch

from .._torch_math import log_mixture, log_prob_at, log_softmax_at, row_chunks


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
        log_q[idx] = torch.where(lab < V_s, lq, float("nan"))
        lse[idx] = ls
        if w is not None:
            log_p[idx] = log_prob_at(w[sel], lab, inv_tau)[0]
    log_ratio = torch.where(valid, log_p - log_q, 0.0)
    return log_q, log_ratio, lse


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
                 length_normalize, ignore_index):
    """Stage (b); see :mod:`.triton_coefficients`. Returns ``(lam, coef, value)``."""
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
    u_seq = log_mixture(log_a, log_1ma, sum_l)
    sig_seq = torch.exp(log_a - u_seq)
    lam_tgo, lam_sgo = {
        "exact": (rho, g + rho - 1.0),
        "paper": (p_suffix, g + p_suffix - 1.0),
        "sequence": (sig_seq.expand(B, T), (u_seq + sig_seq - 1.0).expand(B, T)),
    }[estimator]
    is_sgo = sgo.bool().unsqueeze(1)
    weight = torch.clamp(torch.exp(log_q.view(B, T) - log_q_old.view(B, T)), max=w_max)
    lam = torch.where(is_sgo, lam_sgo, lam_tgo)
    k = kappa.unsqueeze(1)
    coef = torch.where(valid & (k != 0), torch.where(is_sgo, weight, 1.0) * lam * k, 0.0)
    # TGO: ℓ − u = log(p/m) = −log((1−α) + α e^{−ℓ}), finite when q = 0 at the label (ℓ = +inf).
    if estimator == "sequence":
        d = torch.where(is_sgo, -u_seq, -log_mixture(log_1ma, log_a, -sum_l)).squeeze(1)
    else:
        d = torch.where(valid, torch.where(is_sgo, -u, -log_mixture(log_1ma, log_a, -ell)), 0.0).sum(1)
    value = torch.where(kappa != 0, kappa * d, 0.0)
    return torch.where(valid, lam, 0.0).reshape(-1), coef.reshape(-1), value


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
