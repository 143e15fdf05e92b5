"""Reference for the full-vocabulary divergence family (docs/contract.md §6).

Plain differentiable PyTorch: the gradient of this loss *is* the autograd derivative of its value.
Everything is materialised over the shared vocabulary [0, min(V_s, V_t)), where both distributions
are renormalised (softmax of the truncated logits / τ); student columns beyond get zero gradient.
"""
from __future__ import annotations

import math

import torch

KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")
_REDUCTIONS = ("mean", "sum", "none")


def _kl(a, log_a, log_b):
    """Σ_v a_v (log a_v - log b_v) over the last dim, with 0·log 0 = 0 (terms where a_v = 0 vanish)."""
    pos = a > 0
    zero = torch.zeros_like(log_a)
    # double-where: masked entries are finite before the product, so no 0·inf NaN in backward either
    term = a * (torch.where(pos, log_a, zero) - torch.where(pos, log_b, zero))
    return torch.where(pos, term, zero).sum(dim=-1)


def _log_weight(x, dtype, device, B):
    """log of a per-sequence weight ([B] tensor or float) shaped [B, 1, 1]; log 0 = -inf."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device=device, dtype=dtype)
        x = x.expand(B) if x.dim() == 0 else x.reshape(B)
    else:
        x = torch.full((B,), float(x), dtype=dtype, device=device)
    return torch.log(x)[:, None, None], torch.log(1 - x)[:, None, None]


def divergence_loss_ref(
    student_logits,
    teacher_logits,
    labels,
    *,
    kind,
    alpha=None,
    beta=0.5,
    clip=None,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    num_items=None,
    dtype=torch.float64,
):
    """Full-vocabulary divergence loss, docs/contract.md §6. q = student, p = teacher (detached).

    Per valid token (labels != ignore_index), with m = α q + (1-α) p computed as
    log m = logaddexp(log α + log q, log(1-α) + log p) (never log(p + q)):
        fkl  Σ p log(p/q)       rkl  Σ q log(q/p)
        skl  Σ p log(p/m)       srkl Σ q log(q/m)  (gradient through q everywhere, also inside m)
        jsd  β KL(p‖M) + (1-β) KL(q‖M), M = β p + (1-β) q; following TRL / Liger, β = 0 is
             defined as fkl and β = 1 as rkl (the mixture formula itself tends to 0 at both ends)
        tvd  ½ Σ |p - q|
    ``clip`` ([B] bool) zeroes whole sequences. ``alpha`` is required for skl/srkl.
    reduction "none" -> [B, T] (0 at ignored positions); "sum"; "mean" divides by num_items or
    the number of valid tokens (0 if that is 0).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if kind in ("skl", "srkl") and alpha is None:
        raise ValueError(f"kind={kind!r} needs alpha")

    B, T, V_s = student_logits.shape
    V_t = teacher_logits.shape[-1]
    V = min(V_s, V_t)
    device = student_logits.device
    tau = float(temperature)

    z = student_logits.to(dtype)[..., :V] / tau  # in the graph
    w = teacher_logits.detach().to(dtype)[..., :V] / tau
    log_q = torch.log_softmax(z, dim=-1)
    log_p = torch.log_softmax(w, dim=-1)
    q = torch.exp(log_q)
    p = torch.exp(log_p)

    if kind == "fkl":
        per_tok = _kl(p, log_p, log_q)
    elif kind == "rkl":
        per_tok = _kl(q, log_q, log_p)
    elif kind in ("skl", "srkl"):
        log_a, log_1ma = _log_weight(alpha, dtype, device, B)
        log_m = torch.logaddexp(log_a + log_q, log_1ma + log_p)
        per_tok = _kl(p, log_p, log_m) if kind == "skl" else _kl(q, log_q, log_m)
    elif kind == "jsd":
        b = float(beta)
        if b == 0.0:
            per_tok = _kl(p, log_p, log_q)
        elif b == 1.0:
            per_tok = _kl(q, log_q, log_p)
        else:
            log_M = torch.logaddexp(math.log(b) + log_p, math.log1p(-b) + log_q)
            per_tok = b * _kl(p, log_p, log_M) + (1 - b) * _kl(q, log_q, log_M)
    else:  # tvd
        per_tok = 0.5 * (p - q).abs().sum(dim=-1)

    keep = labels != ignore_index
    if clip is not None:
        keep = keep & ~torch.as_tensor(clip, device=device).bool().reshape(B)[:, None]
    per_tok = torch.where(keep, per_tok, torch.zeros_like(per_tok))  # [B, T]

    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    n_valid = (labels != ignore_index).sum()
    N = n_valid.to(dtype) if num_items is None else torch.as_tensor(num_items, dtype=dtype, device=device)
    if float(N) == 0.0:
        return per_tok.sum() * 0.0
    return per_tok.sum() / N
