"""The CPU path: the three stages of the Triton kernels in chunked PyTorch, with the same math.

Used automatically for CPU tensors (and anywhere with ``ASKD_KERNELS_BACKEND=torch``). Rows are
processed ``chunk_rows(V)`` at a time, so the peak extra memory is one chunk of rows × vocab in fp32,
never tokens × vocab. This is the library's fallback, not the test oracle: ``reference/`` is written
independently and materialises everything in fp64.
"""

import torch

# fp32 elements of one chunk's temporaries (16 MiB each); tests lower it to force several chunks.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


def _chunks(n: int, n_cols: int):
    step = chunk_rows(n_cols)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _log_softmax_at(rows, labels, inv_tau):
    """(log softmax(rows·inv_tau)[label], logsumexp) for a chunk; labels ≥ width give −inf."""
    x = rows.float() * inv_tau
    lse = torch.logsumexp(x, dim=-1)
    inside = (labels >= 0) & (labels < x.shape[-1])
    picked = x.gather(-1, torch.where(inside, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, picked, float("-inf")) - lse, lse


def row_stats(student_logits, labels, teacher_logits, teacher_logprobs, *, temperature, ignore_index):
    """Stage (a); see :mod:`askd_kernels.row_stats`. Returns fp32 ``(log_q, log_ratio, lse)`` [B·T]."""
    B, T, V_s = student_logits.shape
    n = B * T
    z = student_logits.reshape(n, V_s)
    w = None if teacher_logits is None else teacher_logits.reshape(n, teacher_logits.shape[2])
    flat_labels = labels.reshape(n)
    valid = flat_labels != ignore_index
    inv_tau = 1.0 / temperature
    log_q = torch.zeros(n, dtype=torch.float32, device=z.device)
    log_p = torch.zeros_like(log_q) if w is not None else teacher_logprobs.reshape(n).float()
    lse = torch.zeros_like(log_q)
    rows = valid.nonzero().squeeze(-1)  # ignored positions cost no vocabulary pass
    width = max(V_s, 0 if w is None else w.shape[1])
    for part in _chunks(rows.numel(), width):
        idx = rows[part]
        lab = flat_labels[idx]
        lq, ls = _log_softmax_at(z[idx], lab, inv_tau)
        # Out-of-range student labels poison the row with NaN, as the kernel does.
        log_q[idx] = torch.where(lab < V_s, lq, float("nan"))
        lse[idx] = ls
        if w is not None:
            log_p[idx] = _log_softmax_at(w[idx], lab, inv_tau)[0]
    log_ratio = torch.where(valid, log_p - log_q, 0.0)
    return log_q, log_ratio, lse


def _log_mixture(log_a, log_1ma, x):
    """log(α + (1−α)e^x) from log α, log(1−α); exact at α ∈ {0, 1} (torch.logaddexp handles −inf)."""
    return torch.logaddexp(log_a, log_1ma + x)


def coefficients(log_q, log_ratio, log_q_old, labels, alpha, sgo, kappa, *, estimator, gamma, w_max,
                 length_normalize, ignore_index):
    """Stage (b); see :mod:`askd_kernels.coefficients`. Returns ``(lam, coef, value)``."""
    B, T = labels.shape
    valid = labels != ignore_index
    ell = log_ratio.view(B, T)
    log_a = torch.log(alpha).unsqueeze(1)
    log_1ma = torch.log1p(-alpha).unsqueeze(1)
    u = torch.where(valid, _log_mixture(log_a, log_1ma, ell), 0.0)
    log_rho = torch.where(valid, log_a - u, 0.0)
    rho = log_rho.exp()

    # Discounted suffix sums over valid positions: a loop over T, vectorised over the batch.
    g = torch.zeros_like(u)
    n_rem = torch.zeros_like(u)
    g_next = torch.zeros(B, dtype=torch.float32, device=u.device)
    n_next = torch.zeros_like(g_next)
    for t in range(T - 1, -1, -1):
        v = valid[:, t]
        g_next = torch.where(v, u[:, t] + gamma * g_next, g_next)
        n_next = torch.where(v, 1.0 + gamma * n_next, n_next)
        g[:, t], n_rem[:, t] = g_next, n_next
    if length_normalize:
        g = g / torch.where(valid, n_rem, 1.0)
    p_suffix = torch.flip(torch.cumsum(torch.flip(log_rho, (1,)), 1), (1,)).exp()

    sum_l = torch.where(valid, ell, 0.0).sum(1, keepdim=True)
    u_seq = _log_mixture(log_a, log_1ma, sum_l)
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
    u_total = u_seq.squeeze(1) if estimator == "sequence" else u.sum(1)
    d = torch.where(is_sgo.squeeze(1), 0.0, sum_l.squeeze(1)) - u_total
    value = torch.where(kappa != 0, kappa * d, 0.0)
    return torch.where(valid, lam, 0.0).reshape(-1), coef.reshape(-1), value


def student_gradient(student_logits, labels, coef, lse, grad_seq, *, temperature):
    """Stage (c); see :mod:`askd_kernels.gradient`. Rows with a zero factor are not read."""
    B, T, V_s = student_logits.shape
    n = B * T
    z = student_logits.reshape(n, V_s)
    flat_labels = labels.reshape(n)
    scale = coef * grad_seq.repeat_interleave(T) / temperature
    grad = torch.zeros((n, V_s), dtype=student_logits.dtype, device=z.device)
    rows = (scale != 0).nonzero().squeeze(-1)
    for part in _chunks(rows.numel(), V_s):
        idx = rows[part]
        prob = torch.exp(z[idx].float() / temperature - lse[idx].unsqueeze(1))
        prob[torch.arange(idx.numel(), device=z.device), flat_labels[idx]] -= 1.0
        grad[idx] = (scale[idx].unsqueeze(1) * prob).to(grad.dtype)
    return grad.view(B, T, V_s)


