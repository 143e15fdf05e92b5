"""Sanity checks of the `reference/` oracle against independent hand computations (docs/contract.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference import askd_loss_ref, divergence_loss_ref, skew_from_rewards_ref

F64 = torch.float64


# ---------------------------------------------------------------- askd_loss_ref, contract §2–4


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_one_token_tgo_alpha1_is_nll(tau):
    """α = 1 TGO: u = 0, ρ = 1, so the gradient is the NLL gradient and the value is ℓ
    (docs/contract.md §2)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 1, 7, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(1, 1, 7, generator=g, dtype=F64)
    y = torch.tensor([[4]])
    loss, stats = askd_loss_ref(z, y, w, student_generated=torch.tensor([False]), alpha=1.0,
                                temperature=tau, reduction="sum")
    loss.backward()

    z2 = z.detach().clone().requires_grad_(True)
    nll = F.cross_entropy(z2[0] / tau, y[0])
    nll.backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-12, atol=1e-14)

    ell = torch.log_softmax(w[0, 0] / tau, -1)[4] - torch.log_softmax(z.detach()[0, 0] / tau, -1)[4]
    torch.testing.assert_close(loss.detach(), ell)
    assert stats["lam"].item() == 1.0 and stats["coef"].item() == 1.0


def _hand(alpha, ells):
    u = [math.log(alpha + (1 - alpha) * math.exp(e)) for e in ells]
    rho = [alpha / (alpha + (1 - alpha) * math.exp(e)) for e in ells]
    return u, rho


def _tiny_batch():
    """B = 2 (row 0 SGO, row 1 TGO), T = 4 with position 1 masked, uniform student over V = 4,
    teacher log-probs given directly so ℓ_t = log p_t + log 4 is known in closed form."""
    V = 4
    z = torch.zeros(2, 4, V, dtype=F64, requires_grad=True)
    labels = torch.tensor([[0, -100, 2, 3], [1, -100, 0, 2]])
    tlp = torch.tensor([[-1.0, 5.0, -2.5, -0.3], [-0.2, -9.0, -1.7, -3.0]], dtype=F64)
    ells = [[tlp[b, t].item() + math.log(V) for t in (0, 2, 3)] for b in range(2)]
    return z, labels, tlp, ells


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("estimator", ["exact", "paper"])
def test_hand_computed_suffix_sums(estimator, length_normalize):
    alpha, gamma = 0.3, 0.5
    z, labels, tlp, ells = _tiny_batch()
    sg = torch.tensor([True, False])
    loss, stats = askd_loss_ref(z, labels, teacher_logprobs=tlp, student_generated=sg, alpha=alpha,
                                gamma=gamma, length_normalize=length_normalize,
                                estimator=estimator, reduction="sum")
    loss.backward()

    # normaliser: valid positions 0, 2, 3 -> remaining discounted counts 1.75, 1.5, 1
    norm = [1 + gamma + gamma ** 2, 1 + gamma, 1.0] if length_normalize else [1.0, 1.0, 1.0]
    expected_lam = torch.zeros(2, 4, dtype=F64)
    expected_val = []
    for b in range(2):
        u, rho = _hand(alpha, ells[b])
        G = [u[0] + gamma * (u[1] + gamma * u[2]), u[1] + gamma * u[2], u[2]]
        G = [G[i] / norm[i] for i in range(3)]
        P = [rho[0] * rho[1] * rho[2], rho[1] * rho[2], rho[2]]
        fac = rho if estimator == "exact" else P
        for i, t in enumerate((0, 2, 3)):
            expected_lam[b, t] = (G[i] + fac[i] - 1) if b == 0 else fac[i]
        expected_val.append(-sum(u) if b == 0 else sum(ells[b]) - sum(u))

    torch.testing.assert_close(stats["lam"], expected_lam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["coef"], expected_lam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["per_seq"], torch.tensor(expected_val, dtype=F64))
    torch.testing.assert_close(loss.detach(), torch.tensor(sum(expected_val), dtype=F64))
    lr = torch.tensor([[e[0], 0.0, e[1], e[2]] for e in ells], dtype=F64)
    torch.testing.assert_close(stats["log_ratio"], lr)
    assert stats["log_q"][:, 1].eq(0).all() and stats["log_q"][0, 0].item() == pytest.approx(-math.log(4))

    # ∂loss/∂z = λ (softmax - onehot), zero at the masked position
    onehot = F.one_hot(labels.clamp(min=0), 4).to(F64)
    expected_grad = expected_lam[..., None] * (0.25 - onehot)
    torch.testing.assert_close(z.grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert z.grad[:, 1].eq(0).all()


def test_hand_computed_sequence_estimator():
    alpha = 0.7
    z, labels, tlp, ells = _tiny_batch()
    sg = torch.tensor([True, False])
    # gamma / length_normalize must not affect "sequence"
    loss, stats = askd_loss_ref(z, labels, teacher_logprobs=tlp, student_generated=sg, alpha=alpha,
                                estimator="sequence", gamma=0.5, length_normalize=True,
                                reduction="none")
    for b in range(2):
        X = sum(ells[b]) + math.log(1 - alpha) - math.log(alpha)
        U = math.log(alpha) + math.log1p(math.exp(X))
        sig = 1 / (1 + math.exp(X))
        lam = U + sig - 1 if b == 0 else sig
        val = -U if b == 0 else sum(ells[b]) - U
        assert loss[b].item() == pytest.approx(val, rel=1e-12)
        for t in (0, 2, 3):
            assert stats["lam"][b, t].item() == pytest.approx(lam, rel=1e-12)
        assert stats["lam"][b, 1].item() == 0.0


def test_alpha_boundaries_are_exact():
    """α = 1 SGO has zero gradient; α = 0 SGO is vanilla reverse KL: u = ℓ, ρ = 0
    (docs/contract.md §2)."""
    z, labels, tlp, ells = _tiny_batch()
    sg = torch.tensor([True, True])
    _, s1 = askd_loss_ref(z, labels, teacher_logprobs=tlp, student_generated=sg, alpha=1.0)
    assert s1["lam"].eq(0).all() and s1["per_seq"].eq(0).all()
    _, s0 = askd_loss_ref(z, labels, teacher_logprobs=tlp, student_generated=sg, alpha=0.0)
    for b in range(2):
        e = ells[b]
        expected = [e[0] + e[1] + e[2] - 1, e[1] + e[2] - 1, e[2] - 1]  # G + ρ - 1 with ρ = 0
        torch.testing.assert_close(s0["lam"][b, [0, 2, 3]], torch.tensor(expected, dtype=F64))
        assert s0["per_seq"][b].item() == pytest.approx(-sum(e), rel=1e-12)
    assert torch.isfinite(s0["lam"]).all() and torch.isfinite(s1["lam"]).all()


def test_label_outside_teacher_vocab_is_exact_limit():
    """label >= V_t: log p = -inf, u = log α, ρ = 1; SGO value/gradient finite for α > 0."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 2, 6, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(1, 2, 4, generator=g, dtype=F64)
    labels = torch.tensor([[5, 1]])
    loss, stats = askd_loss_ref(z, labels, w, student_generated=torch.tensor([True]), alpha=0.4,
                                reduction="sum")
    loss.backward()
    assert stats["log_ratio"][0, 0].item() == -math.inf
    u1 = torch.logaddexp(torch.tensor(math.log(0.4), dtype=F64),
                         math.log(0.6) + stats["log_ratio"][0, 1]).item()
    assert stats["per_seq"].item() == pytest.approx(-(math.log(0.4) + u1), rel=1e-12)
    # λ_0 = G_0 + ρ_0 - 1 = (log α + u_1) + 1 - 1
    assert stats["lam"][0, 0].item() == pytest.approx(math.log(0.4) + u1, rel=1e-12)
    assert torch.isfinite(z.grad).all()


def test_importance_weights_clip_and_mean_reduction():
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 5, 6
    z = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(B, T, V, generator=g, dtype=F64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3:] = -100
    sg = torch.tensor([True, True, False])
    clip = torch.tensor([False, True, True])  # clips row 1 (SGO); ignored for row 2 (TGO)
    old = torch.randn(B, T, generator=g, dtype=F64) - 2.0
    loss, st = askd_loss_ref(z, labels, w, student_generated=sg, alpha=torch.tensor([0.2, 0.5, 0.9]),
                             clip=clip, old_logprobs=old, is_max=2.0)
    valid = labels != -100
    iw = torch.clamp(torch.exp(st["log_q"] - old), max=2.0)
    torch.testing.assert_close(st["coef"][0], st["lam"][0] * iw[0])  # SGO: weighted
    assert st["coef"][1].eq(0).all() and st["per_seq"][1].item() == 0.0  # clipped SGO
    torch.testing.assert_close(st["coef"][2], st["lam"][2])  # TGO: w = 1, clip ignored
    assert st["per_seq"][2].item() != 0.0
    assert st["lam"][~valid].eq(0).all()
    # mean divides by all valid tokens, clipped sequences included
    assert loss.item() == pytest.approx(st["per_seq"].sum().item() / valid.sum().item(), rel=1e-12)
    loss.backward()
    sm = torch.softmax(z.detach(), -1)
    onehot = F.one_hot(labels.clamp(min=0), V).to(F64)
    expected = st["coef"][..., None] * (sm - onehot) / valid.sum()
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-14)
    # num_items overrides N; N = 0 gives 0, not NaN
    l2, _ = askd_loss_ref(z, labels, w, student_generated=sg, alpha=0.5, num_items=7)
    l3, s3 = askd_loss_ref(z, labels, w, student_generated=sg, alpha=0.5, reduction="sum")
    assert l2.item() == pytest.approx(l3.item() / 7, rel=1e-12)
    l0, _ = askd_loss_ref(z, torch.full_like(labels, -100), w, student_generated=sg, alpha=0.5)
    assert l0.item() == 0.0


def test_low_precision_baseline_keeps_input_dtype_grad():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 8, generator=g, dtype=torch.float32, requires_grad=True)
    w = torch.randn(2, 3, 8, generator=g, dtype=torch.float32)
    labels = torch.randint(0, 8, (2, 3), generator=g)
    sg = torch.tensor([True, False])
    loss, st = askd_loss_ref(z, labels, w, student_generated=sg, alpha=0.5, dtype=torch.bfloat16)
    assert loss.dtype == torch.bfloat16 and st["lam"].dtype == torch.bfloat16
    loss.backward()
    assert z.grad.dtype == torch.float32
    ref, _ = askd_loss_ref(z.detach(), labels, w, student_generated=sg, alpha=0.5)
    assert abs(loss.item() - ref.item()) < 0.05 * max(1.0, abs(ref.item()))


# ---------------------------------------------------------------- skew_from_rewards_ref, contract §5


def test_skew_all_equal_group_is_half_exactly():
    a = skew_from_rewards_ref(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 0.5]), group_size=3)
    assert a.dtype == F64
    assert a[:3].eq(0.5).all()
    assert (a[3] > 0.5) and (a[4] < 0.5)


def test_skew_group_size_one_is_half():
    a = skew_from_rewards_ref(torch.tensor([0.1, 5.0, -3.0]), group_size=1)
    assert a.eq(0.5).all()


def test_skew_float_noise_does_not_blow_up():
    r = torch.tensor([0.1 + 0.2, 0.3, 0.3], dtype=F64)
    assert r[0] != r[1]  # genuinely not all equal
    a = skew_from_rewards_ref(r, group_size=3)
    assert torch.isfinite(a).all()
    assert (a - 0.5).abs().max().item() < 1e-6


def _pair_alpha(lo, hi, eps=1e-6):
    """α of a group of two distinct rewards [lo, hi], by hand: mean ± d/2, unbiased std d/√2."""
    d = hi - lo
    r_hat = (d / 2) / (d / math.sqrt(2) + eps)
    return [0.5 * math.erfc(r_hat / math.sqrt(2)), 0.5 * math.erfc(-r_hat / math.sqrt(2))]


@pytest.mark.parametrize("dtype, lo, hi, equal", [
    # fp32 above 1024 (ulp 2^-13): the bound 8·2^-23·max is just over 8 ulps of 1024
    (torch.float32, 1024.0, 1024.0 + 8 * 2.0 ** -13, True),
    (torch.float32, 1024.0, 1024.0 + 9 * 2.0 ** -13, False),
    # just below 1024 the ulp is 2^-14, and the bound relative to max = 1024 is 16 of them
    (torch.float32, 1024.0 - 16 * 2.0 ** -14, 1024.0, True),
    (torch.float32, 1024.0 - 17 * 2.0 ** -14, 1024.0, False),
    # bf16 (precision 2^-7) and negative rewards: the largest *magnitude* sets the bound
    (torch.bfloat16, 1.0, 1.0 + 8 * 2.0 ** -7, True),
    (torch.bfloat16, 1.0, 1.0 + 9 * 2.0 ** -7, False),
    (torch.float32, -1024.0 - 8 * 2.0 ** -13, -1024.0, True),
    # integers are exact: any difference counts
    (torch.int64, 1000, 1001, False),
])
def test_skew_equal_up_to_rounding_by_hand(dtype, lo, hi, equal):
    """contract §5: a spread ≤ 8 × precision(dtype) × max|r| is all-equal (boundary included)."""
    r = torch.tensor([lo, hi]).to(dtype)
    assert r[0].item() == lo and r[1].item() == hi  # the values are exact in that dtype
    a = skew_from_rewards_ref(r, group_size=2)
    expected = [0.5, 0.5] if equal else _pair_alpha(float(lo), float(hi))
    assert a.tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    if not equal:
        assert abs(a[0].item() - 0.5) > 1e-3  # the spread is far above the absolute eps: it matters


def test_skew_nan_reward_poisons_only_its_group():
    a = skew_from_rewards_ref(torch.tensor([math.nan, 1.0, 2.0, 2.0, 0.0, 1.0]), group_size=2)
    assert a[:2].isnan().all() and a[2:4].eq(0.5).all() and not a[4:].isnan().any()


def test_skew_matches_formula_and_batch_mode():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.5], dtype=F64)
    a = skew_from_rewards_ref(r, group_size=None, beta=2.0)
    mean, std = r.mean().item(), r.std(unbiased=True).item()
    for i in range(6):
        rh = (r[i].item() - mean) / (std + 1e-6)
        assert a[i].item() == pytest.approx(0.5 * math.erfc(-2.0 * rh / math.sqrt(2)), rel=1e-12)
    a2 = skew_from_rewards_ref(r, group_size=2)
    g = r.view(3, 2)
    expected = torch.special.ndtr((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6))
    torch.testing.assert_close(a2, expected.reshape(-1))


# ---------------------------------------------------------------- divergence_loss_ref, contract §6


def _div_inputs(Vs=7, Vt=7, seed=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, Vs, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(2, 3, Vt, generator=g, dtype=F64) * 2
    labels = torch.randint(0, min(Vs, Vt), (2, 3), generator=g)
    labels[0, 1] = -100
    return z, w, labels


def test_fkl_matches_kl_div():
    z, w, labels = _div_inputs()
    loss = divergence_loss_ref(z, w, labels, kind="fkl", reduction="sum")
    loss.backward()
    z2 = z.detach().clone().requires_grad_(True)
    valid = labels != -100
    kl = F.kl_div(torch.log_softmax(z2, -1), torch.log_softmax(w, -1), reduction="none",
                  log_target=True).sum(-1)
    expected = kl[valid].sum()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(z.grad, z2.grad)
    per_tok = divergence_loss_ref(z.detach(), w, labels, kind="fkl", reduction="none")
    assert per_tok[0, 1].item() == 0.0
    mean = divergence_loss_ref(z.detach(), w, labels, kind="fkl")
    assert mean.item() == pytest.approx(expected.item() / valid.sum().item(), rel=1e-12)


def test_jsd_endpoints_and_skew_endpoints():
    z, w, labels = _div_inputs()
    fkl = divergence_loss_ref(z, w, labels, kind="fkl", reduction="none")
    rkl = divergence_loss_ref(z, w, labels, kind="rkl", reduction="none")
    assert fkl.sum() > 0 and rkl.sum() > 0 and not torch.allclose(fkl, rkl)
    torch.testing.assert_close(divergence_loss_ref(z, w, labels, kind="jsd", beta=0.0, reduction="none"), fkl)
    torch.testing.assert_close(divergence_loss_ref(z, w, labels, kind="jsd", beta=1.0, reduction="none"), rkl)
    torch.testing.assert_close(divergence_loss_ref(z, w, labels, kind="skl", alpha=1.0, reduction="none"), fkl)
    torch.testing.assert_close(divergence_loss_ref(z, w, labels, kind="srkl", alpha=0.0, reduction="none"), rkl)
    # jsd β = 0.5 by hand on one token
    p = torch.softmax(w[1, 2], -1)
    q = torch.softmax(z.detach()[1, 2], -1)
    m = 0.5 * (p + q)
    hand = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    jsd = divergence_loss_ref(z, w, labels, kind="jsd", beta=0.5, reduction="none")
    torch.testing.assert_close(jsd[1, 2].detach(), hand)
    tvd = divergence_loss_ref(z, w, labels, kind="tvd", reduction="none")
    torch.testing.assert_close(tvd[1, 2].detach(), 0.5 * (p - q).abs().sum())
    with pytest.raises(ValueError):
        divergence_loss_ref(z, w, labels, kind="skl")


def test_divergence_shared_vocab_and_clip():
    z, w, labels = _div_inputs(Vs=9, Vt=6)
    loss = divergence_loss_ref(z, w, labels, kind="srkl", alpha=torch.tensor([0.3, 0.6]),
                               clip=torch.tensor([True, False]), reduction="sum")
    loss.backward()
    assert z.grad[..., 6:].eq(0).all()  # student columns beyond V_t
    assert z.grad[0].eq(0).all()  # clipped sequence
    assert z.grad[1].abs().sum() > 0
    # the value uses renormalised distributions over the first 6 columns
    q = torch.softmax(z.detach()[1, 0, :6], -1)
    p = torch.softmax(w[1, 0], -1)
    m = 0.6 * q + 0.4 * p
    per_tok = divergence_loss_ref(z, w, labels, kind="srkl", alpha=torch.tensor([0.3, 0.6]),
                                  clip=torch.tensor([True, False]), reduction="none")
    torch.testing.assert_close(per_tok[1, 0].detach(), (q * (q / m).log()).sum())
    assert per_tok[0].eq(0).all()
