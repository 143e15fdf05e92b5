"""Slow, obvious reference for the ASKD Monte-Carlo loss (docs/contract.md §1–4) and its
Rao-Blackwellised estimator (``estimator="rao_blackwell"``, specified in ``askd_loss_ref``'s docstring).

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

_ESTIMATORS = ("exact", "paper", "sequence", "rao_blackwell")
_BASELINE_ESTIMATORS = ("exact", "rao_blackwell")
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


def _kl_to_mixture(log_x, log_m):
    """Σ_v x_v (log x_v − log m_v) over the last dim, with x = exp(log_x) and 0·log 0 = 0: entries
    with x_v = 0 contribute nothing, and (double ``where``) no NaN to the gradient either."""
    x = torch.exp(log_x)
    pos = x > 0
    zero = torch.zeros_like(log_x)
    term = x * (torch.where(pos, log_x, zero) - torch.where(pos, log_m, zero))
    return torch.where(pos, term, zero).sum(dim=-1)


def _full_vocab_terms(log_q_all, log_p_all, sgo, log_a, log_1ma):
    """Per-position full-vocabulary divergence against the mixture, [B, T], differentiable in q:
    srkl_t = Σ_v q_v log(q_v/m_v) on SGO rows, skl_t = Σ_v p_v log(p_v/m_v) on TGO rows, with
    m = α q + (1−α) p. The sums run over the student's vocabulary [0, V_s) — the tokens a label can
    be —, each model keeping its own normalisation: teacher columns beyond V_s are dropped (their
    mass is not renormalised away), and a student column beyond V_t has p = 0."""
    V_u = log_q_all.shape[-1]
    log_p_all = log_p_all[..., :V_u]

    def pad(x):
        if x.shape[-1] == V_u:
            return x
        fill = torch.full((*x.shape[:-1], V_u - x.shape[-1]), -math.inf, dtype=x.dtype, device=x.device)
        return torch.cat([x, fill], dim=-1)

    log_q_u, log_p_u = pad(log_q_all), pad(log_p_all)
    # log m = logaddexp(log α + log q, log(1−α) + log p). Where both are −inf (m_v = 0: a column
    # neither side can produce at this α) it is −inf with a zero, not NaN, gradient.
    a = log_a[:, None, None] + log_q_u
    b = log_1ma[:, None, None] + log_p_u
    empty = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros_like(a)
    log_m = torch.where(empty, torch.full_like(a, -math.inf),
                        torch.logaddexp(torch.where(empty, zero, a), torch.where(empty, zero, b)))
    # one KL per row, against whichever distribution sampled it (p is detached: TGO rows get the
    # gradient through q inside m only; SGO rows through q everywhere)
    log_x = torch.where(sgo[:, None, None], log_q_u, log_p_u)
    return _kl_to_mixture(log_x, log_m)


def _baseline(ret, valid, sgo, kappa, groups):
    """Leave-one-out baseline b[i, t] = mean of ret[j, t] over the OTHER unclipped SGOs j with
    groups[j] == groups[i] and position t valid in j (0 when there is none). Computed for every
    row; only SGO rows use it."""
    B, T = ret.shape
    members = {}  # group id -> the rows that can serve as a baseline (unclipped SGOs)
    for j in range(B):
        if bool(sgo[j]) and bool(kappa[j]):
            members.setdefault(int(groups[j]), []).append(j)
    base = torch.zeros_like(ret)
    for i in range(B):
        for t in range(T):
            others = [ret[j, t] for j in members.get(int(groups[i]), []) if j != i and bool(valid[j, t])]
            if others:
                base[i, t] = sum(others) / len(others)
    return base


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
    baseline_groups=None,
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

    ``estimator="rao_blackwell"`` (needs ``teacher_logits``; γ ∈ [0, 1], γ = 0 included;
    ``length_normalize=True`` is refused). Where "exact" scores only the sampled token y_t, this
    estimator takes, at every valid position, the expectation over the token drawn there given the
    sampled prefix, which it can compute exactly from the two full distributions; only the part
    that depends on the FUTURE of the sampled sequence stays a one-sample estimate. With q and p
    the full distributions at (b, t) — q = softmax(z/τ) over V_s, p = softmax(w/τ) over V_t, both
    taken on the student's vocabulary [0, V_s) (p = 0 beyond V_t; the teacher's columns beyond V_s,
    tokens no label can be, are left out, not renormalised) — and m = α q + (1−α) p:
        skl_t  = Σ_v p_v log(p_v/m_v)          srkl_t = Σ_v q_v log(q_v/m_v)
        F_t    = G_t − u_t = Σ_{t'>t} γ^k u_{t'}   (the discounted return of the positions after t;
                 0 at the last valid position, and everywhere when γ = 0)
    * a TGO position contributes skl_t to the value and ∇skl_t with p held fixed (q enters only
      through m) to the gradient; nothing is sampled-token there, since y_t ~ p does not depend
      on the student;
    * an SGO position contributes srkl_t to the value, and to the gradient ∇srkl_t (q differentiated
      everywhere, also inside m) plus the future term −c_t·∇log q(y_t), c_t = w_t·F_t held fixed.
      The importance weight w_t multiplies only that sampled term: the full-vocabulary part is
      already the exact conditional expectation over y_t, so there is nothing to reweight.
    Per sequence D_b = Σ_t (skl_t or srkl_t), and κ_b scales value and gradient as for the other
    estimators; the reductions are unchanged. In expectation (over y ~ q for SGOs, y ~ p for TGOs)
    the gradient equals that of "exact" at the same γ: E_{y_t}[(u_t + ρ_t − 1)·∇log q(y_t)] given the
    prefix is exactly −∇srkl_t, and E_{y_t~p}[ρ_t ∇log q(y_t)] is −∇skl_t. It is computed through the
    surrogate κ_b·[Σ_t full_vocab_t(z) + Σ_t c_t·(−log q_t)] (c detached), whose autograd is the
    gradient above; the VALUE returned is κ_b D_b, not the surrogate.
    With V_s > V_t an SGO at α = 0 has no finite value, whatever the labels (srkl is then reverse
    KL, and q puts mass where p is 0); as in docs/contract.md §1 the result is unspecified (here:
    NaN). At the other two boundaries (TGO α = 0, SGO α = 1) the
    value and the gradient are exactly 0 for any V_s, V_t.

    ``baseline_groups`` ([B] integer tensor, default None) enables a leave-one-out baseline for
    "exact" and "rao_blackwell" (a ValueError for the others). Sequences with the same id answer
    the same prompt. On every SGO the return that multiplies ∇log q(y_t) — G_t for "exact" (G_t/N_t
    with length_normalize), F_t for "rao_blackwell" — becomes itself minus b_{i,t}, the mean of the
    same return over the OTHER unclipped SGOs j of the group whose position t (same column of the
    [B, T] layout) is valid; b = 0 when there is no such j. So "exact": λ_t = G_t − b + ρ_t − 1,
    "rao_blackwell": c_t = w_t·(F_t − b). Since b_{i,t} depends only on the other sequences, which
    are sampled independently of sequence i, the expected gradient is unchanged. The value is
    unchanged. TGOs are never baselined and never serve as baselines.

    Reductions: "mean" = Σ_b κ_b D_b / N (N = num_items, else the number of valid tokens; N = 0
    gives 0), "sum", "none" -> [B].

    stats ([B, T] in ``dtype``, 0 at invalid positions): "log_q", "log_ratio", "lam" (λ before κ
    and w; for "rao_blackwell" F_t − b on SGOs — the coefficient of the sampled future term — and
    0 on TGOs), "coef" (κ w λ); plus "per_seq" [B] = κ_b D_b (detached). With a baseline, "lam"
    already has b subtracted, on clipped SGOs too (their "coef" is 0 all the same).
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {_ESTIMATORS}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if (teacher_logits is None) == (teacher_logprobs is None):
        raise ValueError("pass exactly one of teacher_logits / teacher_logprobs")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError("student_logits must be [B, T, V_s] and labels [B, T]")
    rao = estimator == "rao_blackwell"
    gamma = float(gamma)
    if not ((0.0 <= gamma <= 1.0) if rao else (0.0 < gamma <= 1.0)):
        raise ValueError(f"gamma must be in {'[0, 1]' if rao else '(0, 1]'} for estimator={estimator!r}, "
                         f"got {gamma}")
    if rao and teacher_logits is None:
        raise ValueError("estimator='rao_blackwell' needs teacher_logits (teacher_logprobs are not enough)")
    if rao and length_normalize:
        raise ValueError("length_normalize=True is not supported with estimator='rao_blackwell'")
    if baseline_groups is not None and estimator not in _BASELINE_ESTIMATORS:
        raise ValueError(f"baseline_groups needs estimator in {_BASELINE_ESTIMATORS}, got {estimator!r}")

    B, T, V_s = student_logits.shape
    device = student_logits.device
    tau = float(temperature)

    if baseline_groups is not None:
        if (not isinstance(baseline_groups, torch.Tensor) or baseline_groups.shape != (B,)
                or baseline_groups.dtype.is_floating_point or baseline_groups.dtype == torch.bool):
            raise ValueError("baseline_groups must be a [B] integer tensor")
        baseline_groups = baseline_groups.detach().cpu()

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

    sgo = torch.as_tensor(student_generated, device=device).bool()
    sgo = sgo.expand(B) if sgo.dim() == 0 else sgo.reshape(B)  # one python bool: the whole batch
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
    ret = torch.zeros(B, T, dtype=dtype, device=device)  # the return that multiplies ∇log q_t on SGOs
    factor = torch.zeros(B, T, dtype=dtype, device=device)  # ρ_t ("exact") or P_t ("paper")

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
            F_t = gamma * G_next if gamma != 0.0 else zero.clone()  # Σ_{t'>t} γ^k u_{t'}
            G_t = u[b, t] + F_t
            N_t = 1 + gamma * N_next
            logP_t = log_rho[b, t] + logP_next
            G_next, N_next, logP_next = G_t, N_t, logP_t

            if rao:
                ret[b, t] = F_t
            else:
                ret[b, t] = G_t / N_t if length_normalize else G_t
                factor[b, t] = rho[b, t] if estimator == "exact" else torch.exp(logP_t)  # ρ_t or P_t
            if bool(sgo[b]):
                d = d - u[b, t]
            else:
                d = d + (ell[b, t] - u[b, t])
        value[b] = d

    if estimator != "sequence":
        if baseline_groups is not None:
            ret = ret - _baseline(ret, valid, sgo, kappa, baseline_groups)
        if rao:
            lam = torch.where(sgo[:, None], ret, zero)  # c_t / w_t; TGOs have no sampled term
        else:
            lam = torch.where(sgo[:, None], ret + factor - 1, factor)

    valid_d = valid.to(dtype)
    kappa_d = kappa.to(dtype)
    lam = torch.where(valid, lam, zero)
    coef = torch.where(valid, kappa_d[:, None] * iw * lam, zero).detach()
    S = -(coef * torch.where(valid, log_q, zero)).sum(dim=1)  # [B], carries the gradient

    if rao:
        # value and the full-vocabulary part of the gradient: Σ_t skl_t / srkl_t at valid positions
        full = _full_vocab_terms(log_q_all, log_p_all, sgo, log_a, log_1ma)  # [B, T], differentiable
        full = torch.where(valid, full, zero).sum(dim=1)
        value = full.detach()
        S = S + torch.where(kappa, full, zero)

    per_seq_value = torch.where(kappa, value, zero).detach()  # κ_b D_b (0·inf avoided)
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
