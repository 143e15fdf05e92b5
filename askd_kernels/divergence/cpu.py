"""The divergence family's CPU path: :mod:`.triton`'s two kernels in chunked PyTorch.

Same math, same outputs: active rows (valid, not clipped) are processed in chunks of
:func:`askd_kernels._torch_math.row_chunks`, so the temporaries are a few chunks of rows × vocab in
fp32, never tokens × vocab. The per-kind terms are
:func:`askd_kernels._torch_math.divergence_terms`.
"""
import torch

from .._torch_math import divergence_terms, log_softmax_at, row_chunks, row_max, shifted_fp32


def _active_rows(labels, kappa, ignore_index):
    """Flat indices of the positions that are valid and not in a clipped sequence."""
    active = (labels != ignore_index) & (kappa != 0).unsqueeze(1)
    return active.reshape(-1).nonzero().squeeze(-1)


def _log_probs(z, w, sel, inv_tau, lse_s=None, lse_t=None):
    """log q, log p of the rows ``sel`` over the shared vocabulary and the rows' (max, log-sum) pairs
    ``[rows, 2]`` (computed when not given)."""
    if lse_s is None:
        x, y = torch.log_softmax(shifted_fp32(z[sel], row_max(z[sel]), inv_tau), -1), None
        lse_s = torch.stack([row_max(z[sel]), -x.amax(-1)], -1)  # max of log softmax = −log-sum
        y = torch.log_softmax(shifted_fp32(w[sel], row_max(w[sel]), inv_tau), -1)
        lse_t = torch.stack([row_max(w[sel]), -y.amax(-1)], -1)
        return x, y, lse_s, lse_t
    x = log_softmax_at(z[sel], lse_s[:, 0], lse_s[:, 1], inv_tau)
    y = log_softmax_at(w[sel], lse_t[:, 0], lse_t[:, 1], inv_tau)
    return x, y, lse_s, lse_t


def _flat(student_logits, teacher_logits):
    B, T, V_s = student_logits.shape
    V = min(V_s, teacher_logits.shape[2])
    return student_logits.reshape(B * T, V_s)[:, :V], teacher_logits.reshape(B * T, -1)[:, :V], V


def _chunk_terms(z, w, sel, idx, log_w, T, kind, inv_tau, lse_s=None, lse_t=None):
    """``(value terms, a, q, lse_s, lse_t)`` of one chunk of rows."""
    x, y, ls, lt = _log_probs(z, w, sel, inv_tau, lse_s, lse_t)
    weights = log_w[idx // T]
    return (*divergence_terms(x, y, weights[:, :1], weights[:, 1:], kind), ls, lt)


def forward(student_logits, teacher_logits, labels, kappa, log_w, *, kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergence.triton.forward`. Returns fp32 ``(value [B·T], row_sum [B·T],
    lse_s [B·T, 2], lse_t [B·T, 2])``."""
    B, T, _ = student_logits.shape
    z, w, V = _flat(student_logits, teacher_logits)
    value = torch.zeros(B * T, dtype=torch.float32, device=z.device)
    row_sum = torch.zeros_like(value)
    lse_s, lse_t = (torch.zeros((B * T, 2), dtype=torch.float32, device=z.device) for _ in range(2))
    rows = _active_rows(labels, kappa, ignore_index)
    for idx, sel in row_chunks(rows, B * T, V):
        v, a, _q, ls, lt = _chunk_terms(z, w, sel, idx, log_w, T, kind, 1.0 / temperature)
        value[idx], row_sum[idx], lse_s[idx], lse_t[idx] = v.sum(-1), a.sum(-1), ls, lt
    return value, row_sum, lse_s, lse_t


def backward(student_logits, teacher_logits, labels, kappa, log_w, lse_s, lse_t, row_sum, grad_value, *,
             kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergence.triton.backward`. Rows with a zero factor are not read."""
    B, T, V_s = student_logits.shape
    z, w, V = _flat(student_logits, teacher_logits)
    grad = torch.zeros((B * T, V_s), dtype=student_logits.dtype, device=z.device)
    rows = _active_rows(labels, kappa, ignore_index)
    # Zero factor: nothing to do. Infinite S (an infinite value): gradient 0, not NaN (see the kernel).
    rows = rows[(grad_value[rows] != 0) & ~torch.isinf(row_sum[rows])]
    for idx, sel in row_chunks(rows, B * T, V):
        _v, a, q, _, _ = _chunk_terms(z, w, sel, idx, log_w, T, kind, 1.0 / temperature, lse_s[idx], lse_t[idx])
        scale = (grad_value[idx] * (1.0 / temperature)).unsqueeze(1)
        grad[idx, :V] = (scale * (a - q * row_sum[idx].unsqueeze(1))).to(grad.dtype)
    return grad.view(B, T, V_s)
