"""The baselines the kernels are measured against: each loss written the way a researcher would write it.

Plain PyTorch, no chunking, no custom autograd: the log-softmaxes are materialised in fp32 over the
whole vocabulary and the loss is an expression over them. Run eagerly each function is the "eager"
provider of the benchmark; wrapped in ``torch.compile`` it is the "compile" provider.

* ``askd_loss_torch`` — ASKD (``docs/contract.md`` §1–4) for the benchmark case only: estimator "exact", γ = 1,
  τ = 1, no clipping, no importance sampling, ``reduction="mean"``, one vocabulary. The per-token
  quantities of §2 are gathered from the two log-softmaxes, the returns G of §3 come from a reverse
  cumulative sum, and the gradient of §4 from the usual REINFORCE surrogate
  ``value + (S - S.detach())`` with ``S = -Σ λ.detach() · log q``.
* ``fkl_torch`` … ``tvd_torch`` (``DIVERGENCES[kind]``) — the full-vocabulary family of
  ``docs/contract.md`` §6, one function per kind, ``reduction="mean"`` over the valid tokens, no
  clipping, differentiated by autograd. One function (one code object) per kind on purpose:
  ``torch.compile`` caches compiled graphs per code object, so a single function switching on
  ``kind`` would spend its recompile limit on the six kinds (their shared steps are helpers).
* ``askd_loss_from_hidden_torch`` — the last layer's matmuls (``hidden @ weight.T``, in the inputs'
  dtype) materialising both logits, then ``askd_loss_torch``; the gradient reaches the student's
  hidden states and weight.

This file deliberately shares no code with ``askd_kernels`` or ``reference/``.
"""
from __future__ import annotations

import math

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


# ----------------------------------------------------------------------------------------------
# the full-vocabulary divergences (docs/contract.md §6)


def _log_probs(student_logits, teacher_logits, temperature):
    """fp32 log q, log p over the shared vocabulary, each renormalised there."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    z, w = student_logits[..., :vocab].float(), teacher_logits[..., :vocab].float()
    if temperature != 1.0:
        z, w = z / temperature, w / temperature
    return torch.log_softmax(z, dim=-1), torch.log_softmax(w, dim=-1)


def _mean_over_valid(per_token, labels, ignore_index):
    valid = labels != ignore_index
    return torch.where(valid, per_token, 0.0).sum() / valid.sum().clamp(min=1)


def _skew_log_probs(student_logits, teacher_logits, alpha, temperature):
    """log q, log p and log m of the skewed mixture m = α q + (1−α) p, for a [B] (or scalar) α."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    a = torch.as_tensor(alpha, dtype=torch.float32, device=log_q.device)
    if a.dim() == 1:
        a = a[:, None, None]
    return log_q, log_p, torch.logaddexp(torch.log(a) + log_q, torch.log1p(-a) + log_p)


def fkl_torch(student_logits, teacher_logits, labels, *, alpha=None, beta=0.5, temperature=1.0,
              ignore_index=-100):
    """Σ p log(p/q)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _mean_over_valid(per_token, labels, ignore_index)


def rkl_torch(student_logits, teacher_logits, labels, *, alpha=None, beta=0.5, temperature=1.0,
              ignore_index=-100):
    """Σ q log(q/p)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    return _mean_over_valid(per_token, labels, ignore_index)


def skl_torch(student_logits, teacher_logits, labels, *, alpha, beta=0.5, temperature=1.0,
              ignore_index=-100):
    """Σ p log(p/m), m = α q + (1−α) p."""
    log_q, log_p, log_m = _skew_log_probs(student_logits, teacher_logits, alpha, temperature)
    per_token = (log_p.exp() * (log_p - log_m)).sum(-1)
    return _mean_over_valid(per_token, labels, ignore_index)


def srkl_torch(student_logits, teacher_logits, labels, *, alpha, beta=0.5, temperature=1.0,
               ignore_index=-100):
    """Σ q log(q/m), m = α q + (1−α) p (differentiated through q inside m too)."""
    log_q, log_p, log_m = _skew_log_probs(student_logits, teacher_logits, alpha, temperature)
    per_token = (log_q.exp() * (log_q - log_m)).sum(-1)
    return _mean_over_valid(per_token, labels, ignore_index)


def jsd_torch(student_logits, teacher_logits, labels, *, alpha=None, beta=0.5, temperature=1.0,
              ignore_index=-100):
    """β KL(p‖M) + (1−β) KL(q‖M), M = β p + (1−β) q, for 0 < β < 1."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    per_token = (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
                 + (1.0 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
    return _mean_over_valid(per_token, labels, ignore_index)


def tvd_torch(student_logits, teacher_logits, labels, *, alpha=None, beta=0.5, temperature=1.0,
              ignore_index=-100):
    """½ Σ |p − q|."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    per_token = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return _mean_over_valid(per_token, labels, ignore_index)


DIVERGENCES = {"fkl": fkl_torch, "rkl": rkl_torch, "skl": skl_torch, "srkl": srkl_torch,
               "jsd": jsd_torch, "tvd": tvd_torch}


# ----------------------------------------------------------------------------------------------
# from hidden states (the last layer fused into the loss)


def askd_loss_from_hidden_torch(
    student_hidden: torch.Tensor,  # [B, T, H], requires grad
    student_weight: torch.Tensor,  # [V, H], requires grad
    labels: torch.Tensor,  # [B, T]
    teacher_hidden: torch.Tensor,  # [B, T, H_t]
    teacher_weight: torch.Tensor,  # [V, H_t]
    *,
    student_generated: torch.Tensor,
    alpha: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    student_logits = student_hidden @ student_weight.T  # [B, T, V] in the inputs' dtype
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    return askd_loss_torch(student_logits, labels, teacher_logits, student_generated=student_generated,
                           alpha=alpha, ignore_index=ignore_index)
