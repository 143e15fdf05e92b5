"""Sanity checks of the `reference/` oracle against independent hand computations (docs/contract.md)."""
import itertools
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


# ---------------------------------------------------------------- askd_loss_ref, estimator="rao_blackwell"


def _softmax(row, tau=1.0):
    """Plain-python softmax of a list of floats."""
    mx = max(row)
    e = [math.exp((x - mx) / tau) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _xlogx_over(x, y):
    """x log(x/y) with 0 log 0 = 0."""
    return 0.0 if x == 0.0 else x * math.log(x / y)


def _rb_hand(z, w, labels, sgo, alpha, gamma, tau, old=None, is_max=None):
    """estimator="rao_blackwell" by hand, in python floats, straight from the definition: per
    position the skl/srkl over the student's vocabulary against m = αq + (1−α)p (the teacher's
    columns beyond V_s dropped, not renormalised), F_t the discounted sum of the
    later u's, c_t = w_t·F_t on SGOs. Returns (per-sequence value, lam, coef, gradient [B][T][V_s])
    with the gradient from the closed forms of docs/contract.md §6.2 (a_v − q_v·Σa)/τ for the
    full-vocabulary part and c_t·(q − onehot(y_t))/τ for the sampled future term."""
    B, T, V_s = len(z), len(z[0]), len(z[0][0])
    V_t = len(w[0][0])
    V_u = V_s
    values, lam, coef = [], [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    grad = [[[0.0] * V_s for _ in range(T)] for _ in range(B)]
    for b in range(B):
        a = alpha[b]
        pos = [t for t in range(T) if labels[b][t] != -100]
        u, value = {}, 0.0
        for t in pos:
            q = _softmax(z[b][t], tau) + [0.0] * (V_u - V_s)
            p = (_softmax(w[b][t], tau) + [0.0] * max(0, V_u - V_t))[:V_u]
            m = [a * q[v] + (1 - a) * p[v] for v in range(V_u)]
            y = labels[b][t]
            u[t] = math.log(a + (1 - a) * p[y] / q[y])
            if sgo[b]:
                value += sum(_xlogx_over(q[v], m[v]) for v in range(V_u))
                av = [q[v] * (math.log(q[v] / m[v]) + (1 - a) * p[v] / m[v]) if q[v] > 0 else 0.0
                      for v in range(V_u)]
            else:
                value += sum(_xlogx_over(p[v], m[v]) for v in range(V_u))
                av = [-p[v] * a * q[v] / m[v] if q[v] > 0 else 0.0 for v in range(V_u)]
            S = sum(av)
            for v in range(V_s):
                grad[b][t][v] = (av[v] - q[v] * S) / tau
        values.append(value)
        if not sgo[b]:
            continue
        for i, t in enumerate(pos):
            F = sum(gamma ** (k + 1) * u[t2] for k, t2 in enumerate(pos[i + 1:]))
            q = _softmax(z[b][t], tau)
            y = labels[b][t]
            iw = 1.0 if old is None else math.exp(math.log(q[y]) - old[b][t])
            if is_max is not None:
                iw = min(iw, is_max)
            lam[b][t], coef[b][t] = F, iw * F
            for v in range(V_s):
                grad[b][t][v] += iw * F * (q[v] - (1.0 if v == y else 0.0)) / tau
    return values, lam, coef, grad


def _rb_inputs(V_s=4, V_t=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(2, 4, V_s, generator=g, dtype=F64)
    w = 1.5 * torch.randn(2, 4, V_t, generator=g, dtype=F64)
    labels = torch.tensor([[0, -100, 2, 1], [1, -100, 0, 2]])
    return z, w, labels


@pytest.mark.parametrize("V_s, V_t", [(4, 4), (5, 3), (3, 5)])
@pytest.mark.parametrize("use_is", [False, True])
def test_rao_blackwell_hand_computed(V_s, V_t, use_is):
    """Value, λ = F_t, coef = w·F_t and the gradient against a plain-python evaluation of the
    definition, with a masked position, τ ≠ 1, γ = 0.5, per-sequence α, unequal vocabularies both
    ways and (use_is) importance weights of which one is capped."""
    alpha, gamma, tau, is_max = [0.3, 0.6], 0.5, 1.3, 1.5
    z, w, labels = _rb_inputs(V_s, V_t)
    sg = torch.tensor([True, False])
    # log q_old = log q − shift: weights exp(shift) = 2 (capped to 1.5), 0.74, 1.1 on row 0
    log_q = torch.log_softmax(z / tau, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    old = log_q - torch.tensor([math.log(2.0), 0.0, -0.3, 0.1], dtype=F64)
    kw = dict(old_logprobs=old, is_max=is_max) if use_is else {}
    zz = z.clone().requires_grad_(True)
    loss, st = askd_loss_ref(zz, labels, w, student_generated=sg, alpha=torch.tensor(alpha, dtype=F64),
                             estimator="rao_blackwell", gamma=gamma, temperature=tau,
                             reduction="sum", **kw)
    loss.backward()
    values, lam, coef, grad = _rb_hand(z.tolist(), w.tolist(), labels.tolist(), [True, False], alpha, gamma,
                                       tau, old.tolist() if use_is else None, is_max if use_is else None)
    if use_is:  # the weights are not all 1 and at least one is capped, one is not
        iw = [coef[0][t] / lam[0][t] for t in (0, 2)]
        assert any(x == is_max for x in iw) and any(x != is_max and x != 1.0 for x in iw), iw
    torch.testing.assert_close(st["per_seq"], torch.tensor(values, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.detach(), torch.tensor(sum(values), dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["lam"], torch.tensor(lam, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["coef"], torch.tensor(coef, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zz.grad, torch.tensor(grad, dtype=F64), rtol=1e-10, atol=1e-12)
    assert zz.grad[:, 1].eq(0).all()  # the masked position
    assert st["lam"][1].eq(0).all() and st["lam"][0, 3].item() == 0.0  # TGO; last valid position F = 0
    # F by hand once more, from the exposed log-ratios: F_0 = γ u_2 + γ² u_3, F_2 = γ u_3
    u = [math.log(alpha[0] + (1 - alpha[0]) * math.exp(st["log_ratio"][0, t].item())) for t in (0, 2, 3)]
    assert st["lam"][0, 0].item() == pytest.approx(gamma * u[1] + gamma ** 2 * u[2], rel=1e-12)
    assert st["lam"][0, 2].item() == pytest.approx(gamma * u[2], rel=1e-12)
    # "mean": the same over the 6 valid tokens
    m, _ = askd_loss_ref(z, labels, w, student_generated=sg, alpha=torch.tensor(alpha, dtype=F64),
                         estimator="rao_blackwell", gamma=gamma, temperature=tau, **kw)
    assert m.item() == pytest.approx(sum(values) / 6, rel=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_rao_blackwell_gamma0_is_full_vocab_divergence(tau):
    """γ = 0 (allowed only for rao_blackwell): F = 0, so value and gradient are the per-token
    full-vocabulary skl (TGO) / srkl (SGO) of reference.divergences, clip on SGOs only."""
    g = torch.Generator().manual_seed(6)
    B, T, V = 4, 5, 6
    z = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    w = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[3, 4] = -100
    sg = torch.tensor([True, False, True, False])
    clip = torch.tensor([False, True, True, False])  # clips row 2 (SGO); ignored on row 1 (TGO)
    alpha = torch.tensor([0.2, 0.5, 0.8, 0.9], dtype=F64)
    z1 = z.clone().requires_grad_(True)
    loss, st = askd_loss_ref(z1, labels, w, student_generated=sg, alpha=alpha, clip=clip,
                             estimator="rao_blackwell", gamma=0.0, temperature=tau, reduction="none")
    (loss * torch.arange(1.0, B + 1, dtype=F64)).sum().backward()  # a non-uniform upstream gradient
    assert st["lam"].eq(0).all() and st["coef"].eq(0).all()

    z2 = z.clone().requires_grad_(True)
    per_tok = {kind: divergence_loss_ref(z2, w, labels, kind=kind, alpha=alpha, temperature=tau,
                                         reduction="none") for kind in ("skl", "srkl")}
    kappa = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64)
    expected = torch.where(sg, per_tok["srkl"].sum(1), per_tok["skl"].sum(1)) * kappa
    (expected * torch.arange(1.0, B + 1, dtype=F64)).sum().backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-12)
    assert z1.grad[2].eq(0).all() and z1.grad[1].abs().sum() > 0
    # "mean" divides by every valid token, the clipped row's included
    m, _ = askd_loss_ref(z, labels, w, student_generated=sg, alpha=alpha, clip=clip,
                         estimator="rao_blackwell", gamma=0.0, temperature=tau)
    assert m.item() == pytest.approx(expected.sum().item() / (labels != -100).sum().item(), rel=1e-12)


@pytest.mark.parametrize("V_s, V_t", [(4, 4), (5, 3), (3, 5)])
def test_rao_blackwell_gamma0_gradient_is_derivative_of_value(V_s, V_t):
    """With γ = 0 nothing is sampled-token, so the gradient must be the derivative of the value
    (checked by central differences), also with V_s ≠ V_t, where the value sums over [0, V_s)."""
    z, w, labels = _rb_inputs(V_s, V_t, seed=7)
    sg = torch.tensor([True, False])

    def value(zz):
        loss, _ = askd_loss_ref(zz, labels, w, student_generated=sg, alpha=torch.tensor([0.4, 0.7], dtype=F64),
                                estimator="rao_blackwell", gamma=0.0, temperature=1.1, reduction="sum")
        return loss

    zz = z.clone().requires_grad_(True)
    value(zz).backward()
    h = 1e-6
    numeric = torch.zeros_like(z)
    for idx in itertools.product(*(range(n) for n in z.shape)):
        e = torch.zeros_like(z)
        e[idx] = h
        numeric[idx] = (value(z + e) - value(z - e)) / (2 * h)
    torch.testing.assert_close(zz.grad, numeric, rtol=1e-6, atol=1e-8)


def test_rao_blackwell_alpha_boundaries():
    """α = 0 TGO: m = p, value 0 and an exactly zero gradient even with V_s ≠ V_t; α = 1 SGO:
    m = q and u = 0, the same. α = 1 TGO is forward KL and α = 0 SGO reverse KL (over [0, V_s))."""
    for V_s, V_t in [(4, 4), (5, 3), (3, 5)]:
        z, w, labels = _rb_inputs(V_s, V_t, seed=8)
        for sgo, a in [(False, 0.0), (True, 1.0)]:
            zz = z.clone().requires_grad_(True)
            loss, st = askd_loss_ref(zz, labels, w, student_generated=sgo, alpha=a,
                                     estimator="rao_blackwell", reduction="sum")
            loss.backward()
            assert loss.item() == 0.0 and zz.grad.eq(0).all() and st["coef"].eq(0).all()
    z, w, labels = _rb_inputs(5, 4, seed=8)  # V_s > V_t: forward KL finite
    _, st = askd_loss_ref(z, labels, w, student_generated=False, alpha=1.0, estimator="rao_blackwell",
                          reduction="none")
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    fkl = (lp.exp() * (lp - lq[..., :4])).sum(-1)
    torch.testing.assert_close(st["per_seq"], torch.where(labels != -100, fkl, 0.0).sum(1))
    z, w, labels = _rb_inputs(4, 5, seed=8)  # V_s < V_t: reverse KL finite
    _, st = askd_loss_ref(z, labels, w, student_generated=True, alpha=0.0, estimator="rao_blackwell",
                          reduction="none")
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    rkl = (lq.exp() * (lq - lp[..., :4])).sum(-1)
    torch.testing.assert_close(st["per_seq"], torch.where(labels != -100, rkl, 0.0).sum(1))


def _baseline_batch(seed=9):
    """Rows 0–3 in group 7 (0, 1, 2 unclipped SGOs, 3 a clipped SGO), row 4 a TGO in group 7, row 5
    an SGO alone in group 9; row 1 has position 2 masked and row 2 position 0."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 6, 3, 4
    z = torch.randn(B, T, V, generator=g, dtype=F64)
    w = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = -100
    labels[2, 0] = -100
    sg = torch.tensor([True, True, True, True, False, True])
    clip = torch.tensor([False, False, False, True, False, False])
    alpha = torch.tensor([0.3, 0.5, 0.7, 0.4, 0.6, 0.2], dtype=F64)
    return z, w, labels, dict(student_generated=sg, clip=clip, alpha=alpha)


GROUPS = torch.tensor([7, 7, 7, 7, 7, 9])


def _hand_baseline(R, valid):
    """b[i, t] for _baseline_batch: the mean of R[j, t] over the other unclipped SGOs j ∈ {0, 1, 2}
    of group 7 with t valid in j; 0 for the TGO (unused) and for row 5, alone in its group."""
    b = torch.zeros_like(R)
    for i in range(4):  # rows 0..3 (row 3 is clipped: it gets a baseline but never serves as one)
        for t in range(R.shape[1]):
            others = [R[j, t].item() for j in (0, 1, 2) if j != i and bool(valid[j, t])]
            b[i, t] = sum(others) / len(others) if others else 0.0
    return b


@pytest.mark.parametrize("estimator", ["exact", "rao_blackwell"])
def test_baseline_by_hand(estimator):
    z, w, labels, kw = _baseline_batch()
    valid = labels != -100
    common = dict(estimator=estimator, gamma=0.8, reduction="sum", **kw)
    z0 = z.clone().requires_grad_(True)
    l0, s0 = askd_loss_ref(z0, labels, w, **common)
    l0.backward()
    z1 = z.clone().requires_grad_(True)
    l1, s1 = askd_loss_ref(z1, labels, w, baseline_groups=GROUPS, **common)
    l1.backward()
    # the return R (exact: G_t = λ_t − ρ_t + 1 on SGOs; rao_blackwell: F_t = λ_t), from the unbaselined run
    if estimator == "exact":
        a = kw["alpha"][:, None]
        rho = a / (a + (1 - a) * s0["log_ratio"].exp())
        R = torch.where(valid, s0["lam"] - rho + 1, 0.0)
    else:
        R = s0["lam"]
    b = _hand_baseline(R, valid)
    assert b[0, 0] == R[1, 0] and b[2, 0] == pytest.approx(0.5 * (R[0, 0] + R[1, 0]).item())  # spot checks
    assert b[0, 2] == R[2, 2] and b[3, 2] == pytest.approx(0.5 * (R[0, 2] + R[2, 2]).item())
    expected_lam = torch.where(valid & torch.tensor([True] * 4 + [False, True])[:, None], s0["lam"] - b, s0["lam"])
    torch.testing.assert_close(s1["lam"], expected_lam, rtol=1e-12, atol=1e-12)
    kappa = torch.tensor([1.0, 1, 1, 0, 1, 1], dtype=F64)[:, None]
    iw = torch.ones_like(b)  # no old_logprobs
    torch.testing.assert_close(s1["coef"], kappa * iw * expected_lam, rtol=1e-12, atol=1e-12)
    # the value is unchanged; the gradient moves by + κ·b·∇log q = − κ·b·(softmax − onehot)
    torch.testing.assert_close(l1.detach(), l0.detach(), rtol=0, atol=0)
    torch.testing.assert_close(s1["per_seq"], s0["per_seq"], rtol=0, atol=0)
    sm = torch.softmax(z, -1)
    onehot = F.one_hot(labels.clamp(min=0), z.shape[-1]).to(F64)
    shift = -(kappa * b * valid)[..., None] * (sm - onehot)
    torch.testing.assert_close(z1.grad, z0.grad + shift, rtol=1e-10, atol=1e-12)
    assert shift.abs().max() > 1e-2  # the baseline did something
    assert z1.grad[3].eq(0).all() and torch.equal(z1.grad[4], z0.grad[4])  # clipped SGO, TGO


def test_baseline_with_importance_weights_rao_blackwell():
    """c_t = w_t·(F_t − b_t): the importance weight multiplies the baselined return."""
    z, w, labels, kw = _baseline_batch(seed=10)
    g = torch.Generator().manual_seed(11)
    old = torch.randn(labels.shape, generator=g, dtype=F64) - 1.5
    _, s0 = askd_loss_ref(z, labels, w, estimator="rao_blackwell", **kw)
    _, s1 = askd_loss_ref(z, labels, w, estimator="rao_blackwell", old_logprobs=old, baseline_groups=GROUPS, **kw)
    valid = labels != -100
    b = _hand_baseline(s0["lam"], valid)
    sgo_rows = kw["student_generated"][:, None] & valid
    iw = torch.where(sgo_rows, torch.exp(s1["log_q"] - old), 0.0)
    kappa = (~kw["clip"]).to(F64)[:, None]
    torch.testing.assert_close(s1["coef"], torch.where(sgo_rows, kappa * iw * (s0["lam"] - b), 0.0),
                               rtol=1e-12, atol=1e-12)


def test_rao_blackwell_and_baseline_argument_errors():
    z, w, labels = _rb_inputs()
    sg = torch.tensor([True, False])
    tlp = torch.zeros(labels.shape, dtype=F64) - 1.0
    base = dict(student_generated=sg, alpha=0.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        askd_loss_ref(z, labels, teacher_logprobs=tlp, estimator="rao_blackwell", **base)
    with pytest.raises(ValueError, match="length_normalize"):
        askd_loss_ref(z, labels, w, estimator="rao_blackwell", length_normalize=True, **base)
    for est, gamma in [("rao_blackwell", -0.1), ("rao_blackwell", 1.5), ("exact", 0.0), ("paper", 0.0)]:
        with pytest.raises(ValueError, match="gamma"):
            askd_loss_ref(z, labels, w, estimator=est, gamma=gamma, **base)
    askd_loss_ref(z, labels, w, estimator="rao_blackwell", gamma=0.0, **base)  # allowed here only
    groups = torch.tensor([0, 0])
    for est in ("paper", "sequence"):
        with pytest.raises(ValueError, match="baseline_groups"):
            askd_loss_ref(z, labels, w, estimator=est, baseline_groups=groups, **base)
    for bad in (torch.tensor([0, 0, 0]), torch.tensor([0.0, 1.0]), [0, 0]):
        with pytest.raises(ValueError, match="baseline_groups"):
            askd_loss_ref(z, labels, w, estimator="exact", baseline_groups=bad, **base)
