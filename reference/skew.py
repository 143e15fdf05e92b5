"""Reference for the quality-adaptive skewness α = Φ(β·r̂) (docs/contract.md §5, the paper's Eq. 12)."""
from __future__ import annotations

import math

import torch

# How much spread counts as rounding noise: this many units of the rewards' own precision,
# relative to the largest magnitude in the group (docs/contract.md §5).
NOISE_UNITS = 8


def _precision(dtype):
    """The gap between 1 and the next representable number of ``dtype`` (0 for integer dtypes,
    whose values are exact). Found by stepping, not looked up."""
    if not dtype.is_floating_point:
        return 0.0
    one = torch.ones((), dtype=dtype)
    return float(torch.nextafter(one, 2 * one) - one)


def skew_from_rewards_ref(rewards, *, group_size=None, beta=1.0, eps=1e-6):
    """α_b = Φ(β·r̂_b) in float64 (docs/contract.md §5).

    r̂ = (r - mean) / (std + eps), with mean and the *unbiased* std (as TRL's GRPO ``std(dim=1)``)
    taken per group of ``group_size`` consecutive responses (GRPO), or over the whole batch when
    ``group_size`` is None (REINFORCE++).

    A group counts as all-equal, and gets r̂ = 0 exactly (α = 0.5), when the distance between its
    largest and smallest reward is at most ``NOISE_UNITS`` × (the precision of the rewards' dtype)
    × (the largest absolute reward of the group), all of it evaluated in float64. Integer rewards
    have precision 0, so for them this is plain equality. A group of one is always all-equal (its
    unbiased std is undefined).
    """
    t = torch.as_tensor(rewards).detach()
    unit = _precision(t.dtype)
    r = t.to(torch.float64).reshape(-1)
    B = r.numel()
    g = B if group_size is None else int(group_size)
    if g <= 0 or B % g != 0:
        raise ValueError(f"batch size {B} is not a multiple of group_size {group_size}")
    r_hat = torch.zeros(B, dtype=torch.float64, device=r.device)
    for start in range(0, B, g):
        grp = r[start:start + g]
        values = grp.tolist()  # python floats are IEEE doubles: the same float64 arithmetic
        if any(math.isnan(v) for v in values):
            r_hat[start:start + g] = math.nan  # a NaN reward makes its whole group NaN
            continue
        spread = max(values) - min(values)
        largest = max(abs(v) for v in values)
        if spread <= NOISE_UNITS * unit * largest:
            continue  # all equal up to rounding -> r̂ = 0 exactly
        mean = grp.mean()
        std = grp.std(unbiased=True)  # g >= 2 here since the group is not all-equal
        r_hat[start:start + g] = (grp - mean) / (std + eps)
    return torch.special.ndtr(float(beta) * r_hat)
