"""The divergence family's CPU path: :mod:`.triton`'s two kernels in chunked PyTorch.

Same math, same outputs: active rows (valid, not clipped) are processed in chunks of
:func:`askd_kernels._torch_math.row_chunks`, and the per-kind terms are
:func:`askd_kernels._torch_math.divergence_terms`.

Memory: at most three chunk-sized fp32 temporaries are alive at any time, in either pass.

* Two are the chunk's log q and log p (:func:`_log_probs_into`), each built in place in one buffer
  that is allocated once per call and reused by every chunk: the logits are copied (and converted
  to fp32) into it, then shifted by the row maximum, scaled by 1/τ and reduced by the log-sum,
  without a second copy. The log-sum's ``exp`` runs over slices of the chunk.
* The third is the working memory of ``divergence_terms``, which holds up to ~8 temporaries the size
  of its input (srkl; measured) — so it is called on slices of 1/``TERM_SLICES`` of the chunk's rows,
  whose temporaries together come to about half a chunk (measured in all: 2.4–2.7 chunks per pass). The forward reduces each slice to its row sums at once;
  the backward turns each slice into its gradient rows in place and writes them out.
"""
import torch

from .._torch_math import chunk_rows, divergence_terms, row_chunks

# divergence_terms is evaluated on slices of 1/TERM_SLICES of a chunk's rows: its ≤ 8.25 slice-sized
# temporaries (srkl, the heaviest kind) then add at most about half a chunk.
TERM_SLICES = 16


def _active_rows(labels, kappa, ignore_index):
    """Flat indices of the positions that are valid and not in a clipped sequence."""
    active = (labels != ignore_index) & (kappa != 0).unsqueeze(1)
    return active.reshape(-1).nonzero().squeeze(-1)


def _slices(n_rows):
    """Consecutive slices covering ``n_rows`` rows, about 1/TERM_SLICES of a chunk each (≥ 1 row)."""
    step = max(1, -(-n_rows // TERM_SLICES))
    return [slice(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]


def _load_rows(src, sel, out):
    """``out[:] = src[sel]`` converted to fp32, without a chunk-sized copy in ``src``'s dtype."""
    if isinstance(sel, slice):
        out.copy_(src[sel])
    elif src.dtype == out.dtype:
        torch.index_select(src, 0, sel, out=out)
    else:  # gather in src's dtype one slice at a time
        for part in _slices(out.shape[0]):
            out[part].copy_(src[sel[part]])


def _log_probs_into(out, src, sel, inv_tau, pair=None):
    """Fill ``out`` [rows, V] with ``log softmax(src[sel]/τ)`` in fp32, in place, and return the rows'
    (max, log-sum) pair ``[rows, 2]``: m = max of the raw logits, s = log Σ exp((z − m)/τ), the
    log-probabilities being (z − m)/τ − s, as :func:`askd_kernels._triton_math.log_softmax_at` forms
    them. ``pair`` (the forward's) is used instead of recomputing it when given. A NaN logit makes
    the whole row NaN; an all −inf row gives NaN (it is no distribution)."""
    _load_rows(src, sel, out)
    m = out.amax(-1) if pair is None else pair[:, 0]
    out.sub_(m.unsqueeze(1))
    if inv_tau != 1.0:
        out.mul_(inv_tau)
    if pair is None:
        s = torch.empty_like(m)
        for part in _slices(out.shape[0]):
            torch.log(out[part].exp().sum(-1), out=s[part])
    else:
        s = pair[:, 1]
    out.sub_(s.unsqueeze(1))
    return torch.stack([m, s], -1)


def _flat(student_logits, teacher_logits):
    B, T, V_s = student_logits.shape
    V = min(V_s, teacher_logits.shape[2])
    return student_logits.reshape(B * T, V_s)[:, :V], teacher_logits.reshape(B * T, -1)[:, :V], V


def _buffers(rows, V, device):
    """The two fp32 [chunk rows, V] buffers of log q and log p, sized for the largest chunk of this call."""
    n = min(rows.numel(), chunk_rows(V))
    return (torch.empty((n, V), dtype=torch.float32, device=device) for _ in range(2))


def forward(student_logits, teacher_logits, labels, kappa, log_w, *, kind, temperature, ignore_index):
    """See :func:`askd_kernels.divergence.triton.forward`. Returns fp32 ``(value [B·T], row_sum [B·T],
    lse_s [B·T, 2], lse_t [B·T, 2])``."""
    B, T, _ = student_logits.shape
    z, w, V = _flat(student_logits, teacher_logits)
    value = torch.zeros(B * T, dtype=torch.float32, device=z.device)
    row_sum = torch.zeros_like(value)
    lse_s, lse_t = (torch.zeros((B * T, 2), dtype=torch.float32, device=z.device) for _ in range(2))
    rows = _active_rows(labels, kappa, ignore_index)
    x_buf, y_buf = _buffers(rows, V, z.device)
    inv_tau = 1.0 / temperature
    for idx, sel in row_chunks(rows, B * T, V):
        x, y = x_buf[:idx.numel()], y_buf[:idx.numel()]
        lse_s[idx] = _log_probs_into(x, z, sel, inv_tau)
        lse_t[idx] = _log_probs_into(y, w, sel, inv_tau)
        weights = log_w[idx // T]
        for part in _slices(idx.numel()):
            v, a, _q = divergence_terms(x[part], y[part], weights[part, :1], weights[part, 1:], kind)
            value[idx[part]] = v.sum(-1)
            row_sum[idx[part]] = a.sum(-1)
    if kind == "tvd":
        # ½ Σ|p − q| ≤ 1 exactly; fp32 rounding of Σ p + Σ q can overshoot by an ulp or two for
        # disjoint supports. clamp keeps NaN.
        value.clamp_(max=1.0)
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
    x_buf, y_buf = _buffers(rows, V, z.device)
    inv_tau = 1.0 / temperature
    for idx, sel in row_chunks(rows, B * T, V):
        x, y = x_buf[:idx.numel()], y_buf[:idx.numel()]
        _log_probs_into(x, z, sel, inv_tau, lse_s[idx])
        _log_probs_into(y, w, sel, inv_tau, lse_t[idx])
        weights = log_w[idx // T]
        scale = (grad_value[idx] * inv_tau).unsqueeze(1)
        total = row_sum[idx].unsqueeze(1)
        for part in _slices(idx.numel()):
            _v, a, q = divergence_terms(x[part], y[part], weights[part, :1], weights[part, 1:], kind)
            a = a.sub_(q.mul_(total[part])).mul_(scale[part])  # g/τ · (a_v − q_v·S), in place
            if isinstance(sel, slice):
                grad[sel][part, :V] = a
            else:
                grad[idx[part], :V] = a.to(grad.dtype)
    return grad.view(B, T, V_s)
