"""The baseline the kernels are measured against: ASKD written the way a researcher would write it.

Plain PyTorch, no chunking, no custom autograd: both log-softmaxes are materialised in fp32 over the
whole vocabulary, the per-token quantities of SPEC §2 are gathered from them, the returns G of §3 come
from a reverse cumulative sum, and the gradient of §4 comes from the usual REINFORCE surrogate
``value + (S - S.detach())`` with ``S = -Σ λ.detach() · log q``.

It covers the benchmark case only: estimator "exact", γ = 1, τ = 1, no clipping, no importance
sampling, ``reduction="mean"``, student and teacher over the same vocabulary. Run eagerly it is the
"eager" provider; wrapped in ``torch.compile`` it is the "compile" provider.

This file deliberately shares no code with ``askd_kernels`` or ``reference/``.
"""
from __future__ import annotations

import torch


def askd_loss_torch(
    student_logits: torch.Tensor,  # [B, T, V], requires grad
    labels: torch.Tensor,  # [B, T] int64
    teacher_logits: torch.Tensor,  # [B, T, V]
    *,
    student_generated: torch.Tensor,  # [B] bool: True = SGO (SRKL), False = TGO (SKL)
    alpha: torch.Tensor,  # [B] float in [0, 1], weight of the student in the mixture
    ignore_index: int = -100,
) -> torch.Tensor:
    valid = labels != ignore_index
    index = labels.masked_fill(~valid, 0).unsqueeze(-1)

    # The expensive part: two [B, T, V] fp32 log-softmaxes, the student one kept for backward.
    log_q_all = torch.log_softmax(student_logits.float(), dim=-1)
    log_p_all = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = log_q_all.gather(-1, index).squeeze(-1)  # [B, T], the only path the gradient takes
    log_p = log_p_all.gather(-1, index).squeeze(-1)

    # Everything else is per token and detached: the value is a Monte-Carlo estimate, not a
    # function to differentiate.
    with torch.no_grad():
        a = alpha.to(torch.float32).unsqueeze(-1)  # [B, 1]
        sgo = student_generated.unsqueeze(-1)  # [B, 1]
        ell = log_p - log_q  # ℓ = log p − log q
        u = torch.logaddexp(torch.log(a), torch.log1p(-a) + ell)  # u = log(α + (1−α) e^ℓ)
        rho = torch.exp(torch.log(a) - u)  # ρ = α q / m
        u = torch.where(valid, u, 0.0)
        returns = u.flip(-1).cumsum(-1).flip(-1)  # G_t = Σ_{t' ≥ t} u_t'  (γ = 1)
        lam = torch.where(sgo, returns + rho - 1.0, rho)  # "exact" estimator
        lam = torch.where(valid, lam, 0.0)
        per_token_value = torch.where(sgo, -u, ell - u)  # SGO: log(q/m), TGO: log(p/m)
        num_tokens = valid.sum().clamp(min=1)
        value = torch.where(valid, per_token_value, 0.0).sum() / num_tokens

    surrogate = -(lam * log_q).sum() / num_tokens
    return value + (surrogate - surrogate.detach())
