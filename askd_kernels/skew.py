"""Skewness from rewards (``docs/contract.md`` §5, the paper's Eq. 12): ``α = Φ(β · r̂)``."""
from typing import Optional

import torch
from torch import Tensor

from . import _checks

# A group whose spread is within this many units in the last place of its largest reward is "all equal".
NOISE_ULPS = 8


def skew_from_rewards(rewards: Tensor, *, group_size: Optional[int] = None, beta: float = 1.0,
                      eps: float = 1e-6, process_group=None) -> Tensor:
    """Map rewards to per-response skewness α ∈ (0, 1).

    ``r̂`` is the reward standardised within each group of ``group_size`` consecutive responses to the
    same prompt (GRPO: ``(r − mean) / (std + eps)`` with the unbiased std, as TRL's GRPO does), or over
    the whole batch when ``group_size`` is None (REINFORCE++). Then ``α = Φ(β · r̂)`` with Φ the
    standard normal CDF (``torch.special.ndtr``): better-than-average responses get more student
    weight in the mixture.

    A group whose rewards are all equal gives r̂ = 0 and α = 0.5 exactly (including groups of one).
    "Equal" is tested on the spread (max − min), not on the std, and allows float noise: a spread of
    at most ``NOISE_ULPS`` units of the rewards' own precision, relative to the group's largest
    magnitude, counts as equal. So rewards that differ only by rounding (fp32 ``0.6 + 0.1`` against
    ``0.7``, or ``1000`` against ``1000 + 1 ulp``, where the absolute ``eps`` alone would leave
    |r̂| ≈ 0.7) get exactly 0.5, and real differences keep ``(r − mean)/(std + eps)``. Statistics are
    computed in float64 on each group divided by a power of two near its largest magnitude (exact,
    and the same r̂ as unscaled wherever that does not overflow), so any finite rewards work, up to
    ±1.8e308; the result is float32 on the rewards' device.

    Rewards must be finite: a NaN or ±inf reward raises a ``ValueError`` for CPU tensors in eager
    mode; elsewhere (CUDA, or while ``torch.compile`` traces: checking would sync or break the graph)
    it makes α NaN for every response of its group, and only that group.

    Data parallel: with a ``torch.distributed`` ``process_group`` (e.g. ``dist.group.WORLD``) every
    rank of the group passes its own rewards (1-D, same dtype on every rank; the counts may differ
    between ranks, and a rank may hold none). The rewards are gathered in rank order — first the
    per-rank counts (one ``all_gather``), then the rewards padded to the largest count (a second
    ``all_gather``) — α is computed on the concatenation by exactly the single-process code, and
    each rank gets back its own slice, bitwise what ``skew_from_rewards(torch.cat(all_rewards))``
    gives for those responses. So a group of ``group_size`` consecutive responses may straddle
    ranks, and ``group_size=None`` normalises over the responses of all ranks (REINFORCE++).
    ``group_size`` must divide the *total* count (a ``ValueError`` otherwise, raised on every rank,
    after the gathers, as are errors in ``beta``, ``eps`` and non-finite rewards: all ranks see the
    same gathered rewards). Every rank of the group must make the call; with ``process_group=None``
    (the default) nothing is communicated.
    """
    if process_group is not None:
        return _skew_over_group(rewards, group_size, beta, eps, process_group)
    return _skew(rewards, group_size, beta, eps)


def _rewards_tensor(rewards, *, allow_empty=False):
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if rewards.dtype.is_complex:
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    if rewards.numel() == 0 and not allow_empty:
        raise ValueError("rewards must not be empty")


def _skew_over_group(rewards, group_size, beta, eps, process_group):
    """Gather every rank's rewards in rank order, run :func:`_skew` on the concatenation, keep ours."""
    import torch.distributed as dist

    from .distributed import _group

    _group(process_group)  # a ProcessGroup, else a TypeError naming process_group
    _rewards_tensor(rewards, allow_empty=True)  # local checks before any collective
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    sent = rewards.to(torch.uint8) if rewards.dtype == torch.bool else rewards.contiguous()
    count = torch.tensor([sent.numel()], dtype=torch.int64, device=sent.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=process_group)
    sizes = torch.cat(counts).tolist()  # one host read: the padding and our slice need the counts
    padded = sent.new_zeros(max(sizes))
    padded[:sent.numel()] = sent
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    everything = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    if rewards.dtype == torch.bool:
        everything = everything.to(torch.bool)
    start = sum(sizes[:rank])
    return _skew(everything, group_size, beta, eps)[start:start + sizes[rank]]


def _skew(rewards, group_size, beta, eps):
    """The single-process computation (validation included) that :func:`skew_from_rewards` documents."""
    _rewards_tensor(rewards)
    n = rewards.numel()
    if isinstance(group_size, Tensor):  # a 0-d integer tensor counts as its value
        group_size = _checks.scalar_tensor("group_size", group_size, integer=True)
    if group_size is None:
        group_size = n
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    elif n % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards ({n})")
    beta = _checks.number("beta", beta)  # a python number or a 0-d tensor
    if isinstance(eps, Tensor):
        eps = _checks.scalar_tensor("eps", eps)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")

    ulp = torch.finfo(rewards.dtype).eps if rewards.is_floating_point() else 0.0
    r = rewards.to(torch.float64).view(-1, group_size)
    finite = torch.isfinite(r).all(dim=1, keepdim=True)
    if _checks.can_read_values(rewards) and not bool(finite.all()):
        bad = (~torch.isfinite(r.reshape(-1))).nonzero()[0].item()
        raise ValueError(f"rewards must be finite, got {r.reshape(-1)[bad].item()} at index {bad}")
    # Divide each group by 2^k with 2^k ≤ max|r| < 2^(k+1): |r/2^k| < 2, so neither the sum of squares
    # of the std nor the spread max − min can overflow (fp64 [1e308, −1e308] has std = inf unscaled).
    # A power of two scales exactly (barring underflow of entries ≪ max|r|, immaterial to r̂), so
    # the statistics, the equal-rewards rule and r̂ = (r − mean)/(std + eps) — with eps scaled alike —
    # are those of the unscaled group. Non-finite groups get scale 1 and come out NaN below.
    largest = r.abs().amax(dim=1, keepdim=True)
    exponent = torch.frexp(torch.where(finite & (largest > 0), largest, 1.0)).exponent
    scale = torch.ldexp(torch.ones_like(largest), (exponent - 1).to(torch.float64))  # 2^k, k ≤ 1023
    r = r / scale
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    spread = r.amax(dim=1, keepdim=True) - r.amin(dim=1, keepdim=True)
    noise = NOISE_ULPS * ulp * r.abs().amax(dim=1, keepdim=True)
    r_hat = torch.where(spread <= noise, 0.0, centred / (std + eps / scale))
    r_hat = torch.where(finite, r_hat, float("nan"))  # NaN or ±inf: no standardisation exists
    return torch.special.ndtr(beta * r_hat).to(torch.float32).view(-1)
