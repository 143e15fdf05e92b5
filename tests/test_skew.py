"""``skew_from_rewards`` (docs/contract.md §5, the paper's Eq. 12): α = Φ(β·r̂), r̂ the per-group
(GRPO) or per-batch (REINFORCE++) standardised reward; groups that are all equal up to rounding
(spread ≤ 8 × precision(dtype) × max|r|) give α = 0.5 exactly.

Checked against ``reference.skew_from_rewards_ref`` and against hand computations with
``statistics`` / ``math.erf``, which share nothing with either implementation.
"""
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import askd_kernels as ak
from reference import skew_from_rewards_ref

EPS = 1e-6
# The result is fp32 of an fp64 computation: rounding to fp32 costs ≤ half an ulp of a number in
# [0, 1] (≤ 3e-8); 1e-7 is that plus margin, far below any difference the tests look for.
ATOL = 1e-7


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _by_hand(rewards, group_size=None, beta=1.0, eps=EPS):
    """α per response from plain python: mean and sample (n − 1) std per group. All-equal means
    *exactly* equal here, so it agrees with the library only where no group is equal up to
    rounding without being exactly equal (the tests below use it to show such groups matter)."""
    r = [float(x) for x in rewards]
    g = len(r) if group_size is None else group_size
    out = []
    for start in range(0, len(r), g):
        grp = r[start:start + g]
        if all(x == grp[0] for x in grp):
            out += [0.5] * len(grp)
            continue
        mean, std = statistics.fmean(grp), statistics.stdev(grp)
        out += [_phi(beta * (x - mean) / (std + eps)) for x in grp]
    return torch.tensor(out, dtype=torch.float64)


def _check(alpha, expected):
    assert alpha.dtype == torch.float32 and alpha.shape == expected.shape
    torch.testing.assert_close(alpha.double(), expected.double(), rtol=0, atol=ATOL)


REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.25, 3.0, -1.0, 2.0, 2.0])


@pytest.mark.parametrize("group_size", [None, 2, 4, 8])
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.5])
def test_matches_reference_and_hand(group_size, beta):
    alpha = ak.skew_from_rewards(REWARDS, group_size=group_size, beta=beta)
    _check(alpha, skew_from_rewards_ref(REWARDS, group_size=group_size, beta=beta))
    _check(alpha, _by_hand(REWARDS.tolist(), group_size, beta))


def test_group_normalisation_by_hand():
    # group [1, 2, 3, 4]: mean 2.5, sample std sqrt(5/3); group [10, 10, 10, 40]: mean 17.5, std 15
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 40.0])
    s1, s2 = math.sqrt(5.0 / 3.0), 15.0
    expected = [_phi((x - 2.5) / (s1 + EPS)) for x in (1, 2, 3, 4)]
    expected += [_phi((x - 17.5) / (s2 + EPS)) for x in (10, 10, 10, 40)]
    _check(ak.skew_from_rewards(rewards, group_size=4), torch.tensor(expected, dtype=torch.float64))
    # groups are independent: shifting and scaling one group does not move the other
    moved = rewards.clone()
    moved[4:] = moved[4:] * 3 - 7
    a, b = ak.skew_from_rewards(rewards, group_size=4), ak.skew_from_rewards(moved, group_size=4)
    assert torch.equal(a[:4], b[:4])
    torch.testing.assert_close(a[4:], b[4:], rtol=0, atol=1e-6)  # (std·3 + eps) vs 3·(std + eps)


def test_batch_normalisation_is_one_group():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7, 5.0])
    mean, std = statistics.fmean(rewards.tolist()), statistics.stdev(rewards.tolist())
    expected = torch.tensor([_phi((x - mean) / (std + EPS)) for x in rewards.tolist()], dtype=torch.float64)
    alpha = ak.skew_from_rewards(rewards)
    _check(alpha, expected)
    assert torch.equal(alpha, ak.skew_from_rewards(rewards, group_size=6))
    assert not torch.allclose(alpha, ak.skew_from_rewards(rewards, group_size=3))  # groups differ


def test_beta_scales_the_normalised_reward():
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.6, 0.0, 1.0])
    base = ak.skew_from_rewards(rewards, group_size=3).double()
    r_hat = torch.special.ndtri(base)  # Φ⁻¹ recovers β·r̂ with β = 1
    for beta in (0.25, 2.0, 3.0):
        scaled = ak.skew_from_rewards(rewards, group_size=3, beta=beta).double()
        # ndtri is ill-conditioned only near 0/1; |β·r̂| ≤ 3·1.2 keeps α in [2e-4, 1 − 2e-4]
        torch.testing.assert_close(torch.special.ndtri(scaled), beta * r_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(ak.skew_from_rewards(rewards, beta=0.0), torch.full((6,), 0.5))
    # β < 0 mirrors α around 0.5
    torch.testing.assert_close(ak.skew_from_rewards(rewards, beta=-1.0), 1 - ak.skew_from_rewards(rewards),
                               rtol=0, atol=ATOL)


# ------------------------------------------------------------------------ all-equal groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_all_equal_group_is_exactly_one_half(dtype):
    for rewards in ([0.0] * 4, [1.0] * 8, [0.1] * 3, [7.0]):
        r = torch.tensor(rewards).to(dtype)
        for g in (None, len(rewards)):
            alpha = ak.skew_from_rewards(r, group_size=g)
            assert torch.equal(alpha, torch.full((len(rewards),), 0.5)), (rewards, g, alpha)


def test_group_size_one_is_one_half_everywhere():
    rewards = torch.tensor([3.0, -1.0, 0.0, 100.0, 0.2])
    assert torch.equal(ak.skew_from_rewards(rewards, group_size=1), torch.full((5,), 0.5))
    assert torch.equal(ak.skew_from_rewards(rewards, group_size=1, beta=10.0), torch.full((5,), 0.5))


def test_mixed_batch_only_all_equal_groups_are_one_half():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 5.0, 5.0, 5.0, 0.0, 0.0, 1.0])
    alpha = ak.skew_from_rewards(rewards, group_size=3)
    assert torch.equal(alpha[0:3], torch.full((3,), 0.5))
    assert torch.equal(alpha[6:9], torch.full((3,), 0.5))
    assert bool((alpha[3:6] != 0.5).any()) and bool((alpha[9:] != 0.5).any())
    _check(alpha, _by_hand(rewards.tolist(), 3))
    _check(alpha, skew_from_rewards_ref(rewards, group_size=3))


def _pairs_that_differ_by_noise():
    """Rewards that are equal up to float noise, each pair checked to really differ."""
    f32 = torch.float32
    cases = [
        torch.tensor([0.6], dtype=f32) + torch.tensor([0.1], dtype=f32),  # fp32 0.6 + 0.1 ≠ 0.7
        torch.tensor([0.1], dtype=torch.float64) + 0.2,                    # fp64 0.1 + 0.2 ≠ 0.3
        torch.tensor([1.0 + 1e-7], dtype=torch.float64),                   # 1 vs 1 + 1e-7
        torch.nextafter(torch.tensor([1.0], dtype=f32), torch.tensor([2.0], dtype=f32)),  # 1 ulp
    ]
    others = [torch.tensor([0.7], dtype=f32), torch.tensor([0.3], dtype=torch.float64),
              torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0], dtype=f32)]
    return list(zip(cases, others))


@pytest.mark.parametrize("noisy, exact", _pairs_that_differ_by_noise())
@pytest.mark.parametrize("layout", ["pair", "one-of-four", "alternating"])
def test_float_noise_on_equal_rewards_stays_near_one_half(noisy, exact, layout):
    assert noisy.item() != exact.item()  # the noise is real: the spread is not exactly 0
    pattern = {"pair": [1, 0], "one-of-four": [0, 0, 0, 1], "alternating": [1, 0, 1, 0, 1, 0]}[layout]
    rewards = torch.cat([noisy if k else exact for k in pattern])
    alpha = ak.skew_from_rewards(rewards, group_size=len(pattern))
    # |r̂| = |centred|/(std + eps) with |centred|, std ≲ 1.2e-7 ≪ eps = 1e-6: |r̂| ≲ 0.12,
    # so α = Φ(r̂) ∈ 0.5 ± 0.05; without eps (or with eps=0) r̂ would be O(1).
    assert torch.isfinite(alpha).all()
    assert bool(((alpha - 0.5).abs() <= 0.05).all()), alpha


def test_monotone_in_reward_within_group():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 6, generator=g)
    rewards[1] = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # ties: equal rewards, equal α
    alpha = ak.skew_from_rewards(rewards.view(-1), group_size=6).view(4, 6)
    for r, a in zip(rewards, alpha):
        order = torch.argsort(r)
        r_sorted, a_sorted = r[order], a[order]
        increasing = r_sorted[1:] > r_sorted[:-1]
        assert bool((a_sorted[1:][increasing] > a_sorted[:-1][increasing]).all()), (r, a)
        assert bool((a_sorted[1:][~increasing] == a_sorted[:-1][~increasing]).all()), (r, a)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("rewards, kwargs, exc, match", [
    (torch.zeros(8), dict(group_size=3), ValueError, "group_size"),
    (torch.zeros(8), dict(group_size=0), ValueError, "group_size"),
    (torch.zeros(8), dict(group_size=-2), ValueError, "group_size"),
    (torch.zeros(8), dict(group_size=2.0), ValueError, "group_size"),
    (torch.zeros(8), dict(group_size=True), ValueError, "group_size"),
    ([1.0, 2.0], {}, TypeError, "rewards"),
    (1.0, {}, TypeError, "rewards"),
    (torch.zeros(2, 4), {}, ValueError, "rewards"),
    (torch.zeros(2, 4), dict(group_size=4), ValueError, "rewards"),
    (torch.tensor(1.0), {}, ValueError, "rewards"),
    (torch.zeros(0), {}, ValueError, "rewards"),
    (torch.zeros(4, dtype=torch.complex64), {}, TypeError, "rewards"),
    (torch.zeros(4), dict(beta="1"), TypeError, "beta"),
    (torch.zeros(4), dict(eps=-1e-6), ValueError, "eps"),
])
def test_bad_arguments(rewards, kwargs, exc, match):
    with pytest.raises(exc, match=rf"\b{match}\b"):
        ak.skew_from_rewards(rewards, **kwargs)


# ------------------------------------------------------------------------------ hypothesis


@st.composite
def reward_batches(draw):
    group_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n_groups = draw(st.integers(1, 4))
    # a small pool of values makes all-equal groups and ties common; wide floats cover the rest
    value = st.one_of(st.sampled_from([0.0, 1.0, 0.5]),
                      st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32))
    rewards = draw(st.lists(value, min_size=group_size * n_groups, max_size=group_size * n_groups))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    use_groups = draw(st.booleans())
    beta = draw(st.sampled_from([1.0, 0.3, 2.0]))
    return torch.tensor(rewards, dtype=dtype), (group_size if use_groups else None), beta


@settings(max_examples=200)
@given(case=reward_batches())
def test_hypothesis_range_and_reference(case):
    rewards, group_size, beta = case
    alpha = ak.skew_from_rewards(rewards, group_size=group_size, beta=beta)
    assert alpha.dtype == torch.float32 and alpha.shape == rewards.shape
    assert not torch.isnan(alpha).any()
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    _check(alpha, skew_from_rewards_ref(rewards, group_size=group_size, beta=beta))
    # groups whose rewards are all equal are exactly 0.5
    g = rewards.numel() if group_size is None else group_size
    for grp, a in zip(rewards.view(-1, g), alpha.view(-1, g)):
        if bool((grp == grp[0]).all()):
            assert torch.equal(a, torch.full_like(a, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rounding_noise_at_any_scale_is_exactly_one_half(dtype):
    """Rewards one ulp apart are equal up to rounding whatever their magnitude: the absolute eps
    alone would give |r̂| ≈ 0.7 for fp32 [1000, 1000 + 1 ulp], the relative floor gives exactly 0."""
    for scale in (1.0, 1000.0, 1e6):
        base = torch.tensor([scale], dtype=dtype)
        nudged = torch.nextafter(base, torch.tensor([2 * scale], dtype=dtype))
        assert nudged.item() != base.item()
        alpha = ak.skew_from_rewards(torch.cat([base, nudged, base, nudged]), group_size=4)
        assert torch.equal(alpha, torch.full((4,), 0.5)), (scale, alpha)


def test_real_differences_at_large_scale_are_kept():
    alpha = ak.skew_from_rewards(torch.tensor([1000.0, 1001.0, 1000.0, 1001.0]), group_size=4)
    assert bool((alpha[1::2] > 0.7).all()) and bool((alpha[::2] < 0.3).all())


# ------------------------------------------------- equal up to rounding: the 8-ulp rule, on purpose
#
# docs/contract.md §5: a group counts as all-equal (r̂ = 0, α = 0.5) when max − min ≤ 8 ·
# precision(dtype) · max|r|. The groups below are built from "ladders": a base value and the k
# representable numbers just above it in the rewards' dtype. A spread of k ≤ 8 steps is always
# within the rule (one step above a normal x is at most precision · |x|); 9..16 steps may go either
# way (a step is between ½ and 1 × precision · |x|); ≥ 24 steps is always outside it.

# dtype -> binade exponents of the base: every value stays normal and finite
_LADDER_EXPONENTS = {torch.float64: (-60, 60), torch.float32: (-60, 60), torch.bfloat16: (-60, 60),
                     torch.float16: (-12, 14)}
_STEPS = {"near": (0, 8), "edge": (9, 16), "far": (24, 64)}


def _ladder(base, dtype, k):
    """``base`` rounded to ``dtype`` and the k representable numbers above it: [k + 1] in dtype."""
    x = torch.tensor([base], dtype=dtype)
    up = torch.tensor([math.inf], dtype=dtype)
    values = [x]
    for _ in range(k):
        values.append(torch.nextafter(values[-1], up))
    return torch.cat(values)


@st.composite
def near_equal_batches(draw):
    """Batches of groups whose spread is drawn in steps of the dtype: "near" (0..8, must be all-
    equal), "edge" (9..16) or "far" (24..64, never all-equal), at magnitudes from 2^-60 to 2^60."""
    dtype = draw(st.sampled_from(list(_LADDER_EXPONENTS)))
    g = draw(st.sampled_from([2, 3, 4, 8]))
    # fp64 "edge"/"far" ladders a few ulps wide are left out: standardising them is ill-conditioned
    # (the float64 rounding of the group mean alone moves r̂ by O(1/k)), so two correct
    # implementations may differ by more than ATOL. fp64 gets far groups with a relative spread.
    kinds = ["near", "far"] if dtype == torch.float64 else ["near", "edge", "far"]
    groups, group_kinds = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        lo, hi = _LADDER_EXPONENTS[dtype]
        base = (draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(1.0, 2.0, exclude_max=True))
                * 2.0 ** draw(st.integers(lo, hi)))
        k = draw(st.integers(*_STEPS[kind]))
        if kind == "far" and dtype == torch.float64:
            values = base * (1.0 + torch.arange(k + 1, dtype=dtype) * 2.0 ** -20)
        else:
            values = _ladder(base, dtype, k)
        # both ends of the ladder are in the group, so its spread is exactly k steps
        picks = draw(st.lists(st.integers(0, k), min_size=g - 2, max_size=g - 2))
        order = draw(st.permutations([0, k] + picks))
        groups.append(values[torch.tensor(order)])
        group_kinds.append(kind)
    beta = draw(st.sampled_from([1.0, 0.3, 2.0]))
    return torch.cat(groups), g, group_kinds, beta


@settings(max_examples=300)
@given(case=near_equal_batches())
def test_hypothesis_near_equal_groups_match_reference(case):
    rewards, g, kinds, beta = case
    alpha = ak.skew_from_rewards(rewards, group_size=g, beta=beta)
    expected = skew_from_rewards_ref(rewards, group_size=g, beta=beta)
    _check(alpha, expected)
    by_hand = _by_hand(rewards.tolist(), g, beta)  # exact equality: right wherever the rule is moot
    for i, kind in enumerate(kinds):
        rows = slice(i * g, (i + 1) * g)
        if kind == "near":  # within the rule: exactly one half, in the library and in the oracle
            assert torch.equal(alpha[rows], torch.full((g,), 0.5)), (rewards[rows], alpha[rows])
            assert torch.equal(expected[rows], torch.full((g,), 0.5, dtype=torch.float64))
        elif kind == "far":  # outside it: the plain formula, the same as with exact equality
            _check(alpha[rows], by_hand[rows])


# Rewards large enough that one step of their dtype is far above the absolute eps = 1e-6: under
# exact equality these groups would get |r̂| ≈ 0.7–0.9, i.e. α ≈ 0.2 / 0.8, not 0.5.
_DISCRIMINATING_BASES = {torch.float64: 1.3 * 2.0 ** 40, torch.float32: 1000.3, torch.bfloat16: 1.5,
                         torch.float16: 300.3}


@pytest.mark.parametrize("dtype", list(_DISCRIMINATING_BASES))
@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rounding_noise_is_not_a_difference(dtype, k, sign):
    """Fails if "all equal" meant exact equality: the by-hand exact-equality answer is checked to be
    far from 0.5 on the same input, so the input really tells the two rules apart."""
    ladder = _ladder(sign * _DISCRIMINATING_BASES[dtype], dtype, k)
    rewards = ladder[torch.tensor([0, k, 0, k // 2, k, 0])]
    assert rewards.unique().numel() > 1  # not exactly equal
    exact_rule = _by_hand(rewards.tolist(), 6)
    assert (exact_rule - 0.5).abs().max().item() > 0.1, exact_rule  # the case has teeth
    alpha = ak.skew_from_rewards(rewards, group_size=6)
    assert torch.equal(alpha, torch.full((6,), 0.5)), alpha
    assert torch.equal(skew_from_rewards_ref(rewards, group_size=6), torch.full((6,), 0.5, dtype=torch.float64))
    # mixed with a group that differs for real, only the noisy group is 0.5
    real = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0], dtype=dtype)
    alpha = ak.skew_from_rewards(torch.cat([rewards, real]), group_size=6)
    assert torch.equal(alpha[:6], torch.full((6,), 0.5)) and bool((alpha[6:] != 0.5).all())


@pytest.mark.parametrize("dtype, lo, hi, equal", [
    (torch.float32, 1024.0, 1024.0 + 8 * 2.0 ** -13, True),    # the bound, exactly: still equal
    (torch.float32, 1024.0, 1024.0 + 9 * 2.0 ** -13, False),
    (torch.float32, 1024.0 - 16 * 2.0 ** -14, 1024.0, True),   # relative to max|r|: 16 smaller ulps
    (torch.float32, 1024.0 - 17 * 2.0 ** -14, 1024.0, False),
    (torch.bfloat16, 1.0, 1.0 + 8 * 2.0 ** -7, True),
    (torch.bfloat16, 1.0, 1.0 + 9 * 2.0 ** -7, False),
    (torch.float16, -2.0 - 8 * 2.0 ** -9, -2.0, True),
    (torch.float16, -2.0 - 9 * 2.0 ** -9, -2.0, False),
    (torch.int64, 1000, 1001, False),                          # integers: any difference counts
])
def test_equal_up_to_rounding_boundary(dtype, lo, hi, equal):
    rewards = torch.tensor([lo, hi, hi, lo]).to(dtype)
    assert rewards[0].item() == lo and rewards[1].item() == hi
    alpha = ak.skew_from_rewards(rewards, group_size=4)
    _check(alpha, skew_from_rewards_ref(rewards, group_size=4))
    assert torch.equal(alpha, torch.full((4,), 0.5)) == equal, alpha
    if not equal:
        _check(alpha, _by_hand([float(x) for x in rewards.tolist()], 4))


# ------------------------------------------------- non-finite rewards; finite rewards of any size


@pytest.mark.parametrize("rewards, group_size", [
    ([math.inf, 0.0], None),                   # used to give [0.5, 0.5]: the spread inf ≤ 8·ε·inf
    ([0.0, 1.0, 2.0, -math.inf], 2),
    ([1.0, math.nan, 2.0, 3.0], 2),
])
def test_non_finite_rewards_raise_on_cpu(rewards, group_size):
    """docs/contract.md §5: rewards must be finite; a CPU tensor is checked (the error names it)."""
    with pytest.raises(ValueError, match=r"\brewards\b"):
        ak.skew_from_rewards(torch.tensor(rewards, dtype=torch.float64), group_size=group_size)


def test_non_finite_rewards_unchecked_give_nan_for_their_group_only(monkeypatch):
    """Where values are not read (CUDA, torch.compile): α is NaN for every response of a group with a
    NaN or ±inf reward, and the other groups are exactly what they are on their own."""
    from askd_kernels import _checks

    monkeypatch.setattr(_checks, "can_read_values", lambda t: False)
    rewards = torch.tensor([math.inf, 0.0, 1.0, 3.0, math.nan, 2.0, -math.inf, -math.inf, 5.0, 5.0])
    alpha = ak.skew_from_rewards(rewards, group_size=2)
    nan_groups = torch.tensor([True, False, True, True, False]).repeat_interleave(2)
    assert torch.isnan(alpha[nan_groups]).all(), alpha
    assert torch.equal(alpha[~nan_groups], ak.skew_from_rewards(rewards[~nan_groups], group_size=2))
    _check(alpha[~nan_groups], _by_hand([1.0, 3.0, 5.0, 5.0], 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rewards_near_the_largest_float(dtype):
    """fp64 [1e308, −1e308]: mean 0, sample std √2·1e308 — which overflows when computed as is
    (this gave 0.5, 0.5). Scaled by a power of two first, r̂ = ±1/√2 (eps is negligible here)."""
    big = 1e308 if dtype == torch.float64 else 3e38
    alpha = ak.skew_from_rewards(torch.tensor([big, -big], dtype=dtype))
    _check(alpha, torch.tensor([_phi(math.sqrt(0.5)), _phi(-math.sqrt(0.5))], dtype=torch.float64))
    # three responses near ±1.7e308: the same α as the group scaled down by 2^1000 (with eps too)
    top = torch.tensor([1.7e308, -1.7e308, 1.7e308, 0.0], dtype=torch.float64)
    if dtype == torch.float64:
        _check(ak.skew_from_rewards(top), _by_hand((top / 2.0**1000).tolist(), eps=EPS / 2.0**1000))


# The oracle is the plain fp64 computation on u: its sum of squares underflows for entries below
# ~2^-537 (u = [0, 3e-173] gives std 0 there, hence α ∈ {0, 1}, while the library, which scales each
# group by a power of two first, rightly gives Φ(±1/√2)). Entries are 0 or at least 2^-300 in
# magnitude, where the oracle's squares (≥ 2^-600) are exact enough to be the truth.
_U = st.floats(-1.9, 1.9, allow_nan=False).filter(lambda x: x == 0.0 or abs(x) >= 2.0**-300)


@settings(max_examples=100)
@given(u=st.lists(_U, min_size=2, max_size=8),
       k=st.sampled_from([-1000, -500, 0, 500, 1000, 1022]), beta=st.sampled_from([1.0, 0.3]))
def test_hypothesis_scale_is_a_power_of_two_away(u, k, beta):
    """Rewards u·2^k (exact in fp64, from 2^-1000 to 2^1023) give what u gives with eps scaled by
    2^-k, in the library and in the oracle: standardisation only sees the group relative to its
    largest magnitude, whatever that is — including the 8-ulp equal-rewards rule."""
    scaled = torch.tensor(u, dtype=torch.float64) * 2.0**k
    assert torch.isfinite(scaled).all()
    alpha = ak.skew_from_rewards(scaled, beta=beta)
    expected = skew_from_rewards_ref(torch.tensor(u, dtype=torch.float64), beta=beta, eps=EPS * 2.0**-k)
    _check(alpha, expected)


def _unscaled(rewards, group_size, beta, eps=EPS):
    """The plain float64 computation, without the power-of-two scaling (right wherever nothing
    overflows): the library must agree with it bit for bit there."""
    ulp = torch.finfo(rewards.dtype).eps
    r = rewards.to(torch.float64).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    spread = r.amax(dim=1, keepdim=True) - r.amin(dim=1, keepdim=True)
    noise = 8 * ulp * r.abs().amax(dim=1, keepdim=True)
    r_hat = torch.where(spread <= noise, 0.0, centred / (std + eps))
    return torch.special.ndtr(beta * r_hat).to(torch.float32).view(-1)


@settings(max_examples=100)
@given(case=reward_batches())
def test_hypothesis_scaling_changes_no_bit_of_ordinary_rewards(case):
    """The per-group scaling (of the rewards and of eps, by a power of two: exact) changes no bit of
    the result for rewards that do not overflow: it is bitwise the unscaled computation's. (Leaving
    eps unscaled fails this and the reference tests.)"""
    rewards, group_size, beta = case
    g = rewards.numel() if group_size is None else group_size
    assert torch.equal(ak.skew_from_rewards(rewards, group_size=group_size, beta=beta),
                       _unscaled(rewards, g, beta))


def test_tiny_rewards_scaled_up_are_standardised_not_saturated():
    """The example that showed the oracle's underflow above: [0, 3.1e-173]·2^1000 is a group of two
    distinct rewards, r̂ = ±1/√2 (eps is negligible next to the spread), whatever the scale."""
    u = torch.tensor([0.0, 3.146218431651371e-173], dtype=torch.float64)
    want = torch.tensor([_phi(-math.sqrt(0.5)), _phi(math.sqrt(0.5))], dtype=torch.float64)
    _check(ak.skew_from_rewards(u * 2.0**1000), want)
    _check(ak.skew_from_rewards(u * 2.0**1000, eps=0.0), want)
