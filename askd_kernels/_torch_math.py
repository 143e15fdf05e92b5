"""The building blocks of the CPU paths, in PyTorch: the same math as :mod:`._triton_math`, with the
same signatures where a block exists in both.

* :func:`row_chunks` — the one chunking rule of the CPU paths: rows are processed
  ``chunk_rows(V)`` at a time, so the temporaries of a call are a few chunks of rows × vocab in fp32,
  never tokens × vocab.
* :func:`log_prob_at` — ``log softmax(z/τ)[y]`` and the (max, log-sum) pair of a chunk of rows;
  :func:`log_softmax_at` — log-probabilities from that pair.
* :func:`log_mixture` — ``log(α·e^0 + (1−α)·e^x)`` written as ``logaddexp(log α, log(1−α) + x)``.
* :func:`divergence_terms` — per-column terms of the full-vocabulary divergences.
"""
import torch

# fp32 elements of one chunk's temporaries (16 MiB each); tests lower it to force several chunks.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(n_cols: int) -> int:
    """Rows per chunk for rows of ``n_cols`` entries: ``CHUNK_ELEMENTS // n_cols``, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


def row_chunks(rows: torch.Tensor, n: int, n_cols: int):
    """Yield ``(index, sel)`` per chunk of the selected ``rows`` (a 1-D index tensor) of an ``n``-row
    matrix with ``n_cols`` columns.

    ``index`` holds the chunk's row numbers; ``sel`` indexes the matrix with them: a slice when every
    row is selected (views, no copies) and the index tensor itself otherwise.
    """
    everything = rows.numel() == n
    step = chunk_rows(n_cols)
    for start in range(0, rows.numel(), step):
        part = slice(start, min(rows.numel(), start + step))
        yield rows[part], (part if everything else rows[part])


def shifted_fp32(rows: torch.Tensor, m: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``(rows − m)/τ`` in fp32 for a chunk of rows and their raw maxima ``m`` [rows]: the argument of
    the softmax, shifted before it is scaled (see :func:`askd_kernels._triton_math.row_logsumexp`)."""
    x = rows.float() - m.unsqueeze(-1)
    return x if inv_tau == 1.0 else x.mul_(inv_tau)


def row_max(rows: torch.Tensor) -> torch.Tensor:
    """The raw maximum of each row in fp32 (NaN if the row holds a NaN)."""
    return rows.amax(-1).float()


def log_softmax_at(rows, m, s, inv_tau):
    """``log softmax(rows/τ)`` of a chunk from its (max, log-sum) pair ``m``, ``s`` [rows]."""
    return shifted_fp32(rows, m, inv_tau).sub_(s.unsqueeze(-1))


def log_prob_at(rows, labels, inv_tau):
    """``(log softmax(rows/τ)[label], (m, s))`` for a chunk: the log-probability of each row's label
    (−inf for labels ≥ width) and the row's (max, log-sum) pair ``[rows, 2]`` of
    :func:`askd_kernels._triton_math.row_logsumexp`, never folded into one number."""
    m = row_max(rows)
    x = shifted_fp32(rows, m, inv_tau)
    inside = (labels >= 0) & (labels < x.shape[-1])
    safe = torch.where(inside, labels, 0).unsqueeze(-1)
    log_prob = torch.log_softmax(x, dim=-1).gather(-1, safe).squeeze(-1)  # one fused pass
    x_at = x.gather(-1, safe).squeeze(-1)
    s = x_at - log_prob
    masked = torch.isinf(x_at)  # a −inf logit at the label: recover the log-sum directly
    if masked.any():
        s[masked] = torch.logsumexp(x[masked], dim=-1)
    return torch.where(inside, log_prob, float("-inf")), torch.stack([m, s], dim=-1)


def log_mixture(log_a, log_1ma, x):
    """``log(e^{log_a} + e^{log_1ma + x})``; see :func:`askd_kernels._triton_math.log_mixture`.
    ``torch.logaddexp`` is exact when one side is −inf, so α ∈ {0, 1} are exact; NaN propagates."""
    return torch.logaddexp(log_a, log_1ma + x)


def divergence_terms(x, y, la, lb, kind: str):
    """``(f-terms, a, q)`` of a chunk for the divergence ``kind``; x = log q, y = log p, ``la``/``lb``
    the log weights of q and p in the mixture (broadcast against x). The formulas and their guards
    are those of :func:`askd_kernels._triton_math.divergence_terms`."""
    q, p = x.exp(), y.exp()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # 0·log 0 = 0 guards test "== 0", never "> 0", so that a NaN probability stays NaN.
    if kind == "fkl":
        return torch.where(p == 0, zero, p * (y - x)), -p, q
    if kind == "rkl":
        a = torch.where(q == 0, zero, q * (x - y))
        return a, a, q
    if kind == "tvd":  # sign(NaN) is 0: the 0·(q − p) term carries a NaN into the subgradient
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p) + 0.0 * (q - p), q
    log_m = log_mixture(la + x, lb, y)
    if kind == "skl":
        value = torch.where(p == 0, zero, p * (y - log_m))
        return value, torch.where((p == 0) | (q == 0), zero, -p * torch.exp(la + x - log_m)), q
    if kind == "srkl":
        d = x - log_m
        skew = torch.where(p == 0, zero, torch.exp(lb + y - log_m))  # (1−α) p/m
        return torch.where(q == 0, zero, q * d), torch.where(q == 0, zero, q * (d + skew)), q
    # jsd, 0 < β < 1: w_q = 1 − β = e^{la}, w_p = β = e^{lb}
    student = torch.where(q == 0, zero, la.exp() * q * (x - log_m))
    return torch.where(p == 0, zero, lb.exp() * p * (y - log_m)) + student, student, q
