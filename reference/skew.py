"""Reference for the quality-adaptive skewness α = Φ(β·r̂) (SPEC.md §5, paper Eq. 12)."""
from __future__ import annotations

import torch


def skew_from_rewards_ref(rewards, *, group_size=None, beta=1.0, eps=1e-6):
    """α_b = Φ(β·r̂_b) in float64 (SPEC §5).

    r̂ = (r - mean) / (std + eps), with mean and the *unbiased* std (as TRL's GRPO ``std(dim=1)``)
    taken per group of ``group_size`` consecutive responses (GRPO), or over the whole batch when
    ``group_size`` is None (REINFORCE++). A group whose rewards are all exactly equal gets r̂ = 0
    exactly, hence α = 0.5 (this also covers group_size = 1, where the unbiased std is undefined).
    """
    r = torch.as_tensor(rewards).detach().to(torch.float64).reshape(-1)
    B = r.numel()
    g = B if group_size is None else int(group_size)
    if g <= 0 or B % g != 0:
        raise ValueError(f"batch size {B} is not a multiple of group_size {group_size}")
    r_hat = torch.zeros(B, dtype=torch.float64, device=r.device)
    for start in range(0, B, g):
        grp = r[start:start + g]
        if bool((grp == grp[0]).all()):
            continue  # all equal -> r̂ = 0 exactly
        mean = grp.mean()
        std = grp.std(unbiased=True)  # g >= 2 here since the group is not all-equal
        r_hat[start:start + g] = (grp - mean) / (std + eps)
    return torch.special.ndtr(float(beta) * r_hat)
