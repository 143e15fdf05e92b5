"""The CPU path of the divergence family: :mod:`askd_kernels.divergences` in chunked PyTorch.

Same math, same outputs and the same memory profile as the kernels: active rows (valid, not
clipped) are processed ``torch_impl.chunk_rows(V)`` at a time (``torch_impl._row_chunks``), so the
peak extra memory is one chunk of rows × vocab in fp32, never tokens × vocab. See the kernels'
module docstring for the formulas.
"""
import torch

from .torch_impl import _row_chunks, _scaled_fp32


def _log_mixture(la, x, lb, y):
    """log(e^{la + x} + e^{lb + y}); torch.logaddexp is exact when one side is −inf."""
    return torch.logaddexp(la + x, lb + y)


def _kind_terms(kind, x, y, la, lb):
    """(f-terms, a, q) of a chunk [rows, V] for the kind; x = log q, y = log p; la/lb [rows, 1]."""
    q, p = x.exp(), y.exp()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if kind == "fkl":
        return torch.where(p > 0, p * (y - x), zero), -p, q
    if kind == "rkl":
        a = torch.where(q > 0, q * (x - y), zero)
        return a, a, q
    if kind == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p), q
    log_m = _log_mixture(la, x, lb, y)
    if kind == "skl":
        value = torch.where(p > 0, p * (y - log_m), zero)
        return value, torch.where((p > 0) & (q > 0), -p * torch.exp(la + x - log_m), zero), q
    if kind == "srkl":
        d = x - log_m
        skew = torch.where(p > 0, torch.exp(lb + y - log_m), zero)  # (1−α) p/m
        return torch.where(q > 0, q * d, zero), torch.where(q > 0, q * (d + skew), zero), q
    # jsd, 0 < β < 1: w_q = 1 − β = e^{la}, w_p = β = e^{lb}
    student = torch.where(q > 0, la.exp() * q * (x - log_m), zero)
    return torch.where(p > 0, lb.exp() * p * (y - log_m), zero) + student, student, q


def _active_rows(labels, kappa, ignore_index):
    """Flat indices of the positions that are valid and not in a clipped sequence."""
    active = (labels != ignore_index) & (kappa != 0).unsqueeze(1)
    return active.reshape(-1).nonzero().squeeze(-1)


def _log_probs(z, w, sel, inv_tau, lse_s=None, lse_t=None):
    """log q, log p of the rows ``sel`` over the shared vocabulary (LSEs computed when not given)."""
    zs, ws = _scaled_fp32(z[sel], inv_tau), _scaled_fp32(w[sel], inv_tau)
    if lse_s is None:
        lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(ws, -1)
    return zs - lse_s.unsqueeze(1), ws - lse_t.unsqueeze(1), lse_s, lse_t


def _flat(student_logits, teacher_logits):
    B, T, V_s = student_logits.shape
    V = min(V_s, teacher_logits.shape[2])
    return student_logits.reshape(B * T, V_s)[:, :V], teacher_logits.reshape(B * T, -1)[:, :V], V


def forward(student_logits, teacher_logits, labels, kappa, log_w, *, kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergences.forward`. Returns fp32 ``(value, row_sum, lse_s, lse_t)`` [B·T]."""
    B, T, _ = student_logits.shape
    z, w, V = _flat(student_logits, teacher_logits)
    value = torch.zeros(B * T, dtype=torch.float32, device=z.device)
    row_sum, lse_s, lse_t = (torch.zeros_like(value) for _ in range(3))
    rows = _active_rows(labels, kappa, ignore_index)
    for idx, sel in _row_chunks(rows, B * T, V):
        x, y, ls, lt = _log_probs(z, w, sel, 1.0 / temperature)
        weights = log_w[idx // T]
        v, a, _q = _kind_terms(kind, x, y, weights[:, :1], weights[:, 1:])
        value[idx], row_sum[idx], lse_s[idx], lse_t[idx] = v.sum(-1), a.sum(-1), ls, lt
    return value, row_sum, lse_s, lse_t


def backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value, *,
             kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergences.backward`. Rows with a zero factor are not read."""
    B, T, V_s = student_logits.shape
    z, w, V = _flat(student_logits, teacher_logits)
    grad = torch.zeros((B * T, V_s), dtype=student_logits.dtype, device=z.device)
    rows = _active_rows(labels, kappa, ignore_index)
    rows = rows[grad_value[rows] != 0]
    for idx, sel in _row_chunks(rows, B * T, V):
        x, y, _, _ = _log_probs(z, w, sel, 1.0 / temperature, lse_s[idx], lse_t[idx])
        weights = log_w[idx // T]
        _v, a, q = _kind_terms(kind, x, y, weights[:, :1], weights[:, 1:])
        scale = (grad_value[idx] * (1.0 / temperature)).unsqueeze(1)
        grad[idx, :V] = (scale * (a - q * row_sum[idx].unsqueeze(1))).to(grad.dtype)
    return grad.view(B, T, V_s)
