"""Slow, obvious reference for the ASKD Monte-Carlo loss (docs/contract.md §1–4).

This is the test oracle. It shares no code with ``askd_kernels`` and is written for obviousness,
not speed: every per-token quantity is materialised (full ``log_softmax`` over the vocabulary) and
the suffix sums of docs/contract.md §3 are explicit Python loops over sequences and positions.

All arithmetic happens in ``dtype`` (default ``torch.float64``). With ``dtype=torch.float64`` this
is the "truth"; with ``dtype=torch.bfloat16`` (or the input dtype) it is the naive baseline, a
straightforward PyTorch implementation that does its math in that dtype, whose error the kernels
must not exceed.
"""
from __future__ import annotations

import math

import torch

_ESTIMATORS = ("exact", "paper", "sequence")
_REDUCTIONS = ("mean", "sum", "none")


def _per_sequence(x, B, dtype, device, name):
    """A python float or a [B] tensor -> a detached [B] tensor in ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device=device, dtype=dtype)
        if x.dim() == 0:
            x = x.expand(B)
        if x.shape != (B,):
            raise ValueError(f"{name} must be a float or a [B] tensor, got shape {tuple(x.shape)}")
        return x.clone()
    return torch.full((B,), float(x), dtype=dtype, device=device)


def askd_loss_ref(
    student_logits,
    labels,
    teacher_logits=None,
    *,
    teacher_logprobs=None,
    student_generated,
    alpha,
    clip=None,
    old_logprobs=None,
    is_max=None,
    estimator="exact",
    gamma=1.0,
    length_normalize=False,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    num_items=None,
    dtype=torch.float64,
):
    """ASKD loss, docs/contract.md §1–4. Returns ``(loss, stats)``.

    Per valid position t (label != ignore_index), docs/contract.md §2:
        log q_t = log_softmax(z/τ)[y_t]            log p_t = log_softmax(w/τ)[y_t]  (own vocab V_t;
                                                   label >= V_t -> log p_t = -inf, the exact limit)
        ℓ_t = log p_t - log q_t
        u_t = logaddexp(log α, log(1-α) + ℓ_t)      ρ_t = exp(log α - u_t)
    (the logaddexp form keeps α ∈ {0, 1} exact; the x_t/softplus form would NaN there).

    §3: G_t = u_t + γ·G_{next valid t'}, P_t = exp(log ρ_t + log P_{next valid}), optional
    length normalisation G_t / (1 + γ·N_{next valid}); the λ table for "exact" / "paper" /
    "sequence"; importance weight w_t = min(exp(log q_t - log q_old,t), is_max) on SGOs only.

    §4: value D_b (exact/paper: TGO Σ(ℓ-u), SGO -Σu; sequence: TGO Σℓ - U, SGO -U, with
    U = logaddexp(log α, log(1-α) + Σℓ)), times κ_b (κ_b = 0 iff clip_b and the sequence is an SGO).
    The gradient is REINFORCE-style: per_seq_b = κ_b D_b + (S_b - S_b.detach()) with
    S_b = -Σ_t coef_t log q_t and coef_t = κ_b w_t λ_t detached, so that
    ∂loss/∂z = g_b κ_b w_t λ_t (softmax(z/τ) - onehot(y_t)) / τ. No gradient reaches the teacher.

    Reductions: "mean" = Σ_b κ_b D_b / N (N = num_items, else the number of valid tokens; N = 0
    gives 0), "sum", "none" -> [B].

    stats ([B, T] in ``dtype``, 0 at invalid positions): "log_q", "log_ratio", "lam" (λ before κ
    and w), "coef" (κ w λ); plus "per_seq" [B] = κ_b D_b (detached).
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {_ESTIMATORS}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if (teacher_logits is None) == (teacher_logprobs is None):
        raise ValueError("pass exactly one of teacher_logits / teacher_logprobs")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError("student_logits must be [B, T, V_s] and labels [B, T]")

    B, T, V_s = student_logits.shape
    device = student_logits.device
    tau = float(temperature)
    gamma = float(gamma)

    valid = labels != ignore_index  # [B, T] bool
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if bool((safe_labels >= V_s).any()) or bool((safe_labels < 0).any()):
        raise ValueError("labels must be in [0, V_s) or equal to ignore_index")

    # ---- §2: per-token log-probs (materialised, in `dtype`) ------------------------------------
    z = student_logits.to(dtype)  # stays in the graph: the gradient reaches the caller's dtype
    log_q_all = torch.log_softmax(z / tau, dim=-1)
    log_q = log_q_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [B, T], differentiable

    if teacher_logprobs is not None:
        log_p = teacher_logprobs.detach().to(dtype)  # used as they are: no temperature
        if log_p.shape != (B, T):
            raise ValueError("teacher_logprobs must be [B, T]")
    else:
        w = teacher_logits.detach().to(dtype)
        if w.dim() != 3 or w.shape[:2] != (B, T):
            raise ValueError("teacher_logits must be [B, T, V_t]")
        V_t = w.shape[-1]
        log_p_all = torch.log_softmax(w / tau, dim=-1)
        in_teacher_vocab = safe_labels < V_t
        teacher_idx = torch.clamp(safe_labels, max=V_t - 1)
        log_p = log_p_all.gather(-1, teacher_idx.unsqueeze(-1)).squeeze(-1)
        log_p = torch.where(in_teacher_vocab, log_p, torch.full_like(log_p, -math.inf))

    log_q_d = log_q.detach()
    ell = log_p - log_q_d  # ℓ_t

    sgo = torch.as_tensor(student_generated, device=device).bool().reshape(B)
    a = _per_sequence(alpha, B, dtype, device, "alpha")
    log_a = torch.log(a)  # log α, -inf at α = 0
    log_1ma = torch.log(1 - a)  # log(1-α), -inf at α = 1
    if clip is None:
        kappa = torch.ones(B, dtype=torch.bool, device=device)
    else:
        kappa = ~(torch.as_tensor(clip, device=device).bool().reshape(B) & sgo)

    # u_t, ρ_t elementwise (§2, logaddexp form)
    u = torch.logaddexp(log_a[:, None].expand(B, T), log_1ma[:, None] + ell)
    log_rho = log_a[:, None] - u
    rho = torch.exp(log_rho)

    # importance weights, SGO only (§3, importance sampling)
    if old_logprobs is not None:
        iw = torch.exp(log_q_d - old_logprobs.detach().to(dtype))
        if is_max is not None:
            iw = torch.clamp(iw, max=float(is_max))
        iw = torch.where(sgo[:, None], iw, torch.ones_like(iw))
    else:
        iw = torch.ones(B, T, dtype=dtype, device=device)

    zero = torch.zeros((), dtype=dtype, device=device)
    lam = torch.zeros(B, T, dtype=dtype, device=device)
    value = torch.zeros(B, dtype=dtype, device=device)

    # ---- §3–4: explicit loops over sequences and positions -------------------------------------
    for b in range(B):
        positions = [t for t in range(T) if bool(valid[b, t])]
        if estimator == "sequence":
            sum_ell = zero.clone()
            for t in positions:
                sum_ell = sum_ell + ell[b, t]
            U = torch.logaddexp(log_a[b], log_1ma[b] + sum_ell)  # log α + softplus(X)
            sig = torch.exp(log_a[b] - U)  # σ(-X)
            lam_b = sig if not bool(sgo[b]) else U + sig - 1
            for t in positions:
                lam[b, t] = lam_b
            value[b] = (sum_ell - U) if not bool(sgo[b]) else -U
            continue

        G_next = zero.clone()  # suffix discounted sum of u
        N_next = zero.clone()  # the same recurrence with u replaced by 1
        logP_next = zero.clone()  # suffix sum of log ρ
        d = zero.clone()
        for t in reversed(positions):
            G_t = u[b, t] + gamma * G_next
            N_t = 1 + gamma * N_next
            logP_t = log_rho[b, t] + logP_next
            G_next, N_next, logP_next = G_t, N_t, logP_t

            G_used = G_t / N_t if length_normalize else G_t
            factor = rho[b, t] if estimator == "exact" else torch.exp(logP_t)  # ρ_t or P_t
            if bool(sgo[b]):
                lam[b, t] = G_used + factor - 1
                d = d - u[b, t]
            else:
                lam[b, t] = factor
                d = d + (ell[b, t] - u[b, t])
        value[b] = d

    valid_d = valid.to(dtype)
    kappa_d = kappa.to(dtype)
    lam = torch.where(valid, lam, zero)
    coef = torch.where(valid, kappa_d[:, None] * iw * lam, zero).detach()

    per_seq_value = torch.where(kappa, value, zero).detach()  # κ_b D_b (0·inf avoided)
    S = -(coef * torch.where(valid, log_q, zero)).sum(dim=1)  # [B], carries the gradient
    per_seq = per_seq_value + (S - S.detach())

    if reduction == "none":
        loss = per_seq
    elif reduction == "sum":
        loss = per_seq.sum()
    else:
        N = valid_d.sum() if num_items is None else torch.as_tensor(num_items, dtype=dtype, device=device)
        if float(N) == 0.0:
            loss = per_seq.sum() * 0.0
        else:
            loss = per_seq.sum() / N

    stats = {
        "log_q": torch.where(valid, log_q_d, zero),
        "log_ratio": torch.where(valid, ell, zero),
        "lam": lam.detach(),
        "coef": coef,
        "per_seq": per_seq_value,
    }
    return loss, stats
