"""Mathematical and API properties of ``askd_loss`` (docs/contract.md §2–4, §7), each checked on both backends.

These are not parity-with-the-oracle tests (``test_askd_parity.py`` does that); they check closed-form
identities the loss must satisfy whatever the implementation: ρ ∈ [0, 1] and increasing in α, the
boundaries α = 1 (NLL on TGOs) and α = 0 (vanilla reverse-KL policy gradient on SGOs), clipping,
upstream gradients, degenerate inputs, the stats / module API, ``torch.compile`` and 64-bit offsets.
"""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_no_worse
from _inputs import problem

import askd_kernels as ak
from reference import askd_loss_ref

IGNORE = -100


def _problem(seed, B=2, T=6, V_s=13, V_t=None, *, dtype=torch.float32, scale=1.0, holes=True):
    """Random student/teacher logits and labels with a few ignored positions (fixed seed)."""
    return problem(seed, B, T, V_s, V_t, dtype=dtype, scale=scale, ignore=[(0, 1), (-1, -1)] if holes else ())


def _run(student, labels, teacher=None, *, upstream=None, **kw):
    """(loss, stats, grad) for one call; the leaf is a fresh copy of ``student``."""
    leaf = student.detach().clone().requires_grad_()
    loss, stats = ak.askd_loss(leaf, labels, teacher, return_stats=True, **kw)
    out = loss if upstream is None else loss * upstream
    out.sum().backward()
    return loss.detach(), stats, leaf.grad


# ------------------------------------------------------------------------- ρ (docs/contract.md §2)


ALPHAS = [0.0, 0.05, 0.2, 0.4, 0.5, 0.6, 0.8, 0.95, 1.0]


def test_rho_in_unit_interval_and_increasing_in_alpha(backend):
    student, teacher, labels = _problem(1, B=2, T=6, V_s=13, scale=1.5)
    valid = labels != IGNORE
    tgo = torch.tensor([False, False])
    rhos, ell = [], None
    for a in ALPHAS:
        _, stats = ak.askd_loss(student, labels, teacher, student_generated=tgo, alpha=a,
                                estimator="exact", return_stats=True)
        rhos.append(stats["lam"])
        if ell is None:
            ell = stats["log_ratio"]
        else:  # ℓ does not depend on α
            assert torch.equal(stats["log_ratio"], ell)
    rho = torch.stack(rhos)  # [len(ALPHAS), B, T]
    assert ((ell != 0) & valid).sum() == valid.sum(), "p == q somewhere: strictness would be vacuous"

    assert bool(((rho >= 0) & (rho <= 1)).all())
    assert torch.equal(rho[:, ~valid], torch.zeros_like(rho[:, ~valid]))
    # the boundaries are exact, not clamped (docs/contract.md §2)
    assert torch.equal(rho[0][valid], torch.zeros_like(rho[0][valid]))
    assert torch.equal(rho[-1][valid], torch.ones_like(rho[-1][valid]))
    # ρ = α / (α + (1−α)e^ℓ) has dρ/dα = e^ℓ / (α + (1−α)e^ℓ)² > 0 for finite ℓ: strictly increasing
    # on the whole grid; with |ℓ| ≤ 4.6 here the smallest step is ~5e-4, ≫ fp32 resolution.
    steps = rho[1:, valid] - rho[:-1, valid]
    assert bool((steps > 0).all()), f"ρ not strictly increasing in α: min step {steps.min().item():.3e}"
    # and it is that closed form (fp32 sigmoid vs fp64 formula: a few ulp of a number ≤ 1)
    for a, r in zip(ALPHAS, rho):
        e = ell.double()[valid]
        truth = a / (a + (1 - a) * torch.exp(e))
        torch.testing.assert_close(r[valid].double(), truth, rtol=0, atol=2e-6)


# ------------------------------------------------------------- α = 1 on TGOs is SFT / NLL


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_alpha_one_tgo_gradient_is_nll(backend, tau, reduction):
    student, teacher, labels = _problem(2, B=2, T=6, V_s=17, V_t=15)
    labels = labels.clamp(max=14).masked_fill(labels == IGNORE, IGNORE)  # keep p > 0 for a TGO
    _, stats, grad = _run(student, labels, teacher, student_generated=torch.tensor([False, False]),
                          alpha=1.0, temperature=tau, reduction=reduction)
    z = student.detach().clone().requires_grad_()
    nll = F.cross_entropy(z.view(-1, z.shape[-1]) / tau, labels.view(-1), ignore_index=IGNORE,
                          reduction="sum")
    n_valid = (labels != IGNORE).sum()
    (nll / n_valid if reduction == "mean" else nll).backward()
    valid = labels != IGNORE
    assert torch.equal(stats["lam"][valid], torch.ones(int(n_valid)))  # ρ = 1 exactly
    # Both are fp32 (softmax − onehot)/τ(/N) with |entries| ≤ 1/τ; they differ only in the order of
    # the fp32 log-sum-exp (online vs two-pass): a few ulp of O(1) numbers, hence atol 1e-6.
    torch.testing.assert_close(grad, z.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))


def test_alpha_one_tgo_gradient_is_nll_with_teacher_logprobs(backend):
    student, teacher, labels = _problem(3, B=2, T=5, V_s=11)
    logp = torch.randn(2, 5) - 2.0  # any teacher log-probs: the gradient must not depend on them
    _, _, grad = _run(student, labels, teacher_logprobs=logp, student_generated=False, alpha=1.0,
                      temperature=1.3, reduction="sum")
    z = student.detach().clone().requires_grad_()
    F.cross_entropy(z.view(-1, 11) / 1.3, labels.view(-1), ignore_index=IGNORE, reduction="sum").backward()
    torch.testing.assert_close(grad, z.grad, rtol=1e-5, atol=1e-6)  # as above


def test_boundary_alphas_give_zero_gradient(backend):
    """docs/contract.md §2: α = 1 gives zero gradient on SGOs (λ = 0 + 1 − 1), α = 0 zero gradient on TGOs (ρ = 0)."""
    student, teacher, labels = _problem(4, B=2, T=5, V_s=11)
    loss, stats, grad = _run(student, labels, teacher, student_generated=torch.tensor([True, False]),
                             alpha=torch.tensor([1.0, 0.0]), reduction="none")
    assert torch.equal(stats["coef"], torch.zeros_like(stats["coef"]))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(loss, torch.zeros(2))  # SGO: −Σu = 0; TGO: Σ(ℓ − ℓ) = 0


# ------------------------------------------------------ α = 0 on SGOs is vanilla reverse KL


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_alpha_zero_sgo_is_reverse_kl_policy_gradient(backend, tau):
    student, teacher, labels = _problem(5, B=2, T=7, V_s=13, V_t=16)
    labels[1, 2] = IGNORE
    valid = labels != IGNORE
    loss, stats, grad = _run(student, labels, teacher, student_generated=torch.tensor([True, True]),
                             alpha=0.0, temperature=tau, reduction="sum")
    ell = stats["log_ratio"].double()
    assert torch.equal(ell[~valid], torch.zeros_like(ell[~valid]))
    # λ_t = Σ_{t' ≥ t, valid} ℓ_t' − 1 at valid positions, 0 elsewhere (G_t = suffix sum, ρ = 0)
    suffix = torch.flip(torch.cumsum(torch.flip(ell, (1,)), 1), (1,))
    lam = torch.where(valid, suffix - 1.0, 0.0)
    # fp32 suffix scans of ≤ 7 terms vs the fp64 sum of the same fp32 ℓ: ≤ 7 ulp of max|G|.
    tol = dict(rtol=0, atol=1e-6 * (1 + lam.abs().max().item()))
    torch.testing.assert_close(stats["coef"].double(), lam, **tol)
    torch.testing.assert_close(stats["lam"].double(), lam, **tol)
    # the value: SGO D = −Σ u = −Σ ℓ = Σ log(q/p)
    torch.testing.assert_close(loss.double(), -ell.sum(), **tol)
    # the gradient: −Σ_t λ_t ∇ log q_t, built by hand with autograd on log_softmax
    z = student.detach().double().requires_grad_()
    log_q = torch.log_softmax(z / tau, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (-(lam * torch.where(valid, log_q, 0.0)).sum()).backward()
    # |grad| ≤ |λ|/τ; fp32 softmax entries carry ~1e-7 relative error, times |λ|
    torch.testing.assert_close(grad.double(), z.grad, **tol)
    assert grad.abs().max() > 1e-2  # not vacuous


# -------------------------------------------------------------------------- clipping (κ)


def test_clip_zeroes_sequence_exactly_and_leaves_others(backend):
    student, teacher, labels = _problem(6, B=3, T=5, V_s=11)
    sgo = torch.tensor([True, True, False])
    clip = torch.tensor([True, False, True])  # seq 0 clipped; seq 2 is a TGO: clip ignored
    alpha = torch.tensor([0.3, 0.6, 0.4])
    loss, stats, grad = _run(student, labels, teacher, student_generated=sgo, alpha=alpha, clip=clip,
                             reduction="none")
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))  # exactly zero, not merely small
    assert loss[0].item() == 0.0
    assert torch.equal(stats["coef"][0], torch.zeros_like(stats["coef"][0]))
    assert grad[1].abs().max() > 1e-3 and grad[2].abs().max() > 1e-3
    for b in (1, 2):  # the same rows as running the sequence alone
        loss_b, _, grad_b = _run(student[b:b + 1], labels[b:b + 1], teacher[b:b + 1],
                                 student_generated=sgo[b:b + 1], alpha=alpha[b:b + 1], reduction="sum")
        # every row is computed independently of the others; allow a couple of fp32 ulp for a
        # vectorised reduction order that may depend on the batch layout
        torch.testing.assert_close(grad[b], grad_b[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(loss[b], loss_b, rtol=1e-6, atol=1e-7)
    # clip on a TGO is ignored: identical to not passing it
    loss_nc, _, grad_nc = _run(student, labels, teacher, student_generated=sgo, alpha=alpha,
                               clip=torch.tensor([True, False, False]), reduction="none")
    assert torch.equal(loss_nc, loss) and torch.equal(grad_nc, grad)


def test_clip_counts_in_mean_denominator(backend):
    """docs/contract.md §4: clipped sequences still count in N; their contribution is 0."""
    student, teacher, labels = _problem(7, B=2, T=4, V_s=9)
    kw = dict(student_generated=torch.tensor([True, True]), alpha=0.5, clip=torch.tensor([True, False]))
    mean = ak.askd_loss(student, labels, teacher, reduction="mean", **kw)
    per = ak.askd_loss(student, labels, teacher, reduction="none", **kw)
    n = (labels != IGNORE).sum().item()
    assert per[0].item() == 0.0 and per[1].item() != 0.0
    torch.testing.assert_close(mean, per.sum() / n, rtol=1e-6, atol=0)  # one fp32 division


# --------------------------------------------------------------------- upstream gradients


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_times_two_doubles_gradient(backend, reduction):
    student, teacher, labels = _problem(8, B=2, T=5, V_s=11)
    kw = dict(student_generated=torch.tensor([True, False]), alpha=torch.tensor([0.3, 0.7]),
              temperature=0.9, reduction=reduction)
    _, _, g1 = _run(student, labels, teacher, **kw)
    _, _, g2 = _run(student, labels, teacher, upstream=2.0, **kw)
    # scaling by a power of two is exact in floating point: bitwise double
    assert torch.equal(g2, 2 * g1)
    assert g1.abs().max() > 1e-3


def test_reduction_none_weights_equal_weighted_sum_of_runs(backend):
    student, teacher, labels = _problem(9, B=3, T=5, V_s=11)
    sgo = torch.tensor([True, False, True])
    alpha = torch.tensor([0.2, 0.5, 0.9])
    weights = torch.tensor([0.7, -1.3, 2.5])
    loss, _, grad = _run(student, labels, teacher, student_generated=sgo, alpha=alpha, reduction="none",
                         upstream=weights)
    for b in range(3):
        loss_b, _, grad_b = _run(student[b:b + 1], labels[b:b + 1], teacher[b:b + 1],
                                 student_generated=sgo[b:b + 1], alpha=alpha[b:b + 1], reduction="sum")
        # w·(c·1)/τ vs (c·w)/τ: one extra fp32 rounding per entry (~1e-7 relative)
        torch.testing.assert_close(grad[b], weights[b] * grad_b[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(loss[b], loss_b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ degenerate inputs


@pytest.mark.parametrize("teacher_input", ["logits", "logprobs"])
def test_all_ignored_batch(backend, teacher_input):
    student, teacher, _ = _problem(10, B=2, T=4, V_s=9)
    labels = torch.full((2, 4), IGNORE)
    t_arg, t_kw = (teacher, {}) if teacher_input == "logits" else (None, {"teacher_logprobs": torch.randn(2, 4)})
    for reduction in ("mean", "sum", "none"):
        for alpha in (0.0, 0.5, 1.0):
            loss, stats, grad = _run(student, labels, t_arg, student_generated=torch.tensor([True, False]),
                                     alpha=alpha, reduction=reduction, **t_kw)
            expected = torch.zeros(2) if reduction == "none" else torch.zeros(())
            assert torch.equal(loss, expected), (reduction, alpha, loss)
            assert torch.equal(grad, torch.zeros_like(grad)), (reduction, alpha)
            for key, value in stats.items():
                assert torch.equal(value, torch.zeros(2, 4)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_and_masked_logits_are_finite(backend, dtype):
    student, teacher, labels = _problem(11, B=2, T=5, V_s=12, dtype=torch.float32, holes=False)
    labels[:] = torch.arange(5) % 4  # labels < 4: the masked / extreme columns below are never the label
    student[0, :, 10] = 1e4
    student[1, :, 11] = -1e4
    student[:, 1::2, 5] = float("-inf")  # masked vocabulary entries
    student[1, 3, 6:] = float("-inf")
    teacher[0, :, 9] = -1e4
    teacher[1, :, 8] = 1e4
    teacher[:, ::2, 4] = float("-inf")
    student, teacher = student.to(dtype), teacher.to(dtype)
    case = dict(student_generated=torch.tensor([True, False]), alpha=torch.tensor([0.3, 0.6]),
                temperature=0.8, reduction="sum")
    loss, stats, grad = _run(student, labels, teacher, **case)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    for key in ("log_q", "log_ratio", "lam", "coef"):
        assert torch.isfinite(stats[key]).all(), key
    assert torch.equal(grad[:, 1::2, 5], torch.zeros_like(grad[:, 1::2, 5]))  # softmax = 0 there
    # and the values are right, under the suite's tolerance rule (see _compare.py)
    leaf = student.detach().double().requires_grad_()
    truth, t_stats = askd_loss_ref(leaf, labels, teacher, **case)
    truth.backward()
    leaf_n = student.detach().clone().requires_grad_()
    naive, n_stats = askd_loss_ref(leaf_n, labels, teacher, dtype=dtype, **case)
    naive.backward()
    assert_no_worse("loss", loss, truth, naive)
    assert_no_worse("lam", stats["lam"], t_stats["lam"], n_stats["lam"])
    assert_no_worse("grad", grad, leaf.grad, leaf_n.grad, stored_dtype=dtype)


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_label_outside_teacher_vocab_is_finite_for_sgo(backend, alpha):
    """docs/contract.md §1: a label ≥ V_t means p = 0, the exact limit; never NaN for α > 0."""
    student, teacher, labels = _problem(12, B=2, T=5, V_s=14, V_t=10, holes=False)
    labels[0, 1] = 12
    labels[0, 3] = 13
    labels[1, 0] = 10
    oov = labels >= 10
    loss, stats, grad = _run(student, labels, teacher, student_generated=torch.tensor([True, True]),
                             alpha=alpha, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.isfinite(stats["lam"]).all() and torch.isfinite(stats["coef"]).all()
    assert bool((stats["log_ratio"][oov] == float("-inf")).all())  # ℓ = log 0 − log q
    leaf = student.detach().double().requires_grad_()
    truth, t_stats = askd_loss_ref(leaf, labels, teacher, student_generated=torch.tensor([True, True]),
                                   alpha=alpha, reduction="none")
    truth.sum().backward()
    # fp32 vs fp64 oracle: O(1) quantities summed over ≤ 5 tokens, so 1e-5 of the scale
    torch.testing.assert_close(loss.double(), truth.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["lam"].double(), t_stats["lam"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("V_s", [12, 11])
def test_layout_and_index_dtype_do_not_matter(backend, V_s):
    """Strided / transposed / int32 / stride-0 inputs give bitwise the same result as compact ones
    (the op makes its own contiguous copies; the kernels take any logits strides).

    One exception, on the Triton kernels only: their 128-bit main loop starts at each row's first
    16-byte boundary, so when the two layouts put a row at different offsets modulo 16 bytes (V = 11
    fp32 here, transposed) its sums over the vocabulary are added in another order
    (docs/contract.md §7.7). Then the results agree to that reordering: a sum of n positive fp32
    terms in any order is within (n − 1)·ε of the exact sum, so two orders differ by at most
    2(n − 1)·ε relative; a row's log-sum and every value derived from it inherit that, and the
    coefficients sum such values over the T = 5 positions of a sequence: tolerance 2·V·T·ε."""
    student, _, labels = _problem(18, B=2, T=5, V_s=V_s)
    g = torch.Generator().manual_seed(18)
    logp, old = torch.randn(2, 5, generator=g) - 2, torch.randn(2, 5, generator=g) - 2
    kw = dict(reduction="none", is_max=2.0, temperature=0.8)
    base = _run(student, labels, teacher_logprobs=logp, old_logprobs=old, student_generated=torch.tensor([True, False]),
                alpha=torch.tensor([0.3, 0.3]), **kw)
    t = lambda x: x.t().contiguous().t()  # noqa: E731  same values, column-major strides
    other = _run(student.transpose(0, 1).contiguous().transpose(0, 1), t(labels).int(), teacher_logprobs=t(logp),
                 old_logprobs=t(old), student_generated=torch.tensor([True, True, False, False])[::2],
                 alpha=torch.tensor(0.3).expand(2), **kw)
    pairs = [(base[0], other[0]), (base[2], other[2])] + [(base[1][k], other[1][k]) for k in base[1]]
    if backend == "torch" or V_s % 4 == 0:  # fp32: 4 columns per 16 bytes, every row aligned alike
        assert all(torch.equal(a, b) for a, b in pairs)
    else:
        tol = 2 * V_s * 5 * torch.finfo(torch.float32).eps
        for a, b in pairs:
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)


# ------------------------------------------------------------------- stats and the module


def test_return_stats_keys_shapes_dtypes_detached(backend):
    student, teacher, labels = _problem(13, B=2, T=5, V_s=11, dtype=torch.bfloat16)
    leaf = student.clone().requires_grad_()
    kw = dict(student_generated=torch.tensor([True, False]), alpha=0.4)
    loss, stats = ak.askd_loss(leaf, labels, teacher, return_stats=True, **kw)
    assert set(stats) == {"log_q", "log_ratio", "lam", "coef"}
    valid = labels != IGNORE
    for key, value in stats.items():
        assert value.shape == (2, 5) and value.dtype == torch.float32, key
        assert not value.requires_grad and value.grad_fn is None, key
        assert torch.equal(value[~valid], torch.zeros_like(value[~valid])), key
    assert bool((stats["log_q"][valid] < 0).all())
    assert loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
    plain = ak.askd_loss(leaf, labels, teacher, **kw)
    assert torch.equal(plain.detach(), loss.detach())
    # gradient through the loss still works with the stats alive, and the stats did not change
    before = {k: v.clone() for k, v in stats.items()}
    loss.backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16
    assert all(torch.equal(before[k], stats[k]) for k in stats)


def test_module_matches_function_and_call_kwargs_override(backend):
    student, teacher, labels = _problem(14, B=2, T=5, V_s=11)
    sgo = torch.tensor([True, False])
    module = ak.ASKDLoss(estimator="paper", reduction="sum", temperature=1.5, alpha=0.3, student_generated=sgo)
    assert "estimator='paper'" in repr(module)
    leaf_m = student.clone().requires_grad_()
    out_m = module(leaf_m, labels, teacher)
    out_m.backward()
    _, _, grad_f = _run(student, labels, teacher, estimator="paper", reduction="sum", temperature=1.5,
                        alpha=0.3, student_generated=sgo)
    out_f = ak.askd_loss(student, labels, teacher, estimator="paper", reduction="sum", temperature=1.5,
                         alpha=0.3, student_generated=sgo)
    assert torch.equal(out_m.detach(), out_f) and torch.equal(leaf_m.grad, grad_f)
    # call-time keyword arguments win over the constructor's options
    over = module(student, labels, teacher, reduction="none", alpha=0.8, return_stats=True)
    ref = ak.askd_loss(student, labels, teacher, estimator="paper", reduction="none", temperature=1.5,
                       alpha=0.8, student_generated=sgo, return_stats=True)
    assert isinstance(over, tuple) and over[0].shape == (2,)
    assert torch.equal(over[0], ref[0]) and torch.equal(over[1]["lam"], ref[1]["lam"])
    assert not torch.equal(over[0].sum(), out_f)  # the override changed something
    # teacher log-probs through the module too
    logp = torch.randn(2, 5)
    assert torch.equal(module(student, labels, teacher_logprobs=logp),
                       ak.askd_loss(student, labels, teacher_logprobs=logp, estimator="paper",
                                    reduction="sum", temperature=1.5, alpha=0.3, student_generated=sgo))


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="estimater"):
        ak.ASKDLoss(estimater="exact")
    with pytest.raises(TypeError, match="bogus"):
        ak.ASKDLoss(reduction="sum", bogus=1)


# --------------------------------------------------------------------------- torch.compile

H = 8  # hidden width of the toy LM head
LR = 0.1


def _toy_batch():
    g = torch.Generator().manual_seed(15)
    B, T, V = 2, 5, 11
    x = torch.randn(B, T, H, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -1] = IGNORE
    return x, teacher, labels, V


def _train(step, V, x, teacher, labels, n_steps=3, **kw):
    torch.manual_seed(16)
    head = torch.nn.Linear(H, V)
    losses = [step(head, x, teacher, labels, **kw) for _ in range(n_steps)]
    return torch.stack(losses), [p.detach().clone() for p in head.parameters()]


def _sgd_step(head, x, teacher, labels, alpha):
    """One training step in one graph: head → logits → askd_loss → backward → SGD update."""
    logits = head(x)
    loss = ak.askd_loss(logits, labels, teacher, student_generated=torch.tensor([True, False]),
                        alpha=alpha, clip=torch.tensor([False, False]), temperature=1.2)
    loss.backward()
    with torch.no_grad():
        for p in head.parameters():
            p.sub_(LR * p.grad)
            p.grad = None
    return loss.detach()


def _compiled_step(compile_backend):
    # torch.optim's step() graph-breaks on purpose, hence the hand-written SGD update; tracing
    # loss.backward() inside the graph needs dynamo's trace_autograd_ops.
    compiled = torch.compile(_sgd_step, fullgraph=True, backend=compile_backend)

    def step(*args, **kw):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args, **kw)
    return step


def _check_compiled_matches_eager(compile_backend, alpha):
    torch._dynamo.reset()
    x, teacher, labels, V = _toy_batch()
    eager_losses, eager_params = _train(_sgd_step, V, x, teacher, labels, alpha=alpha)
    losses, params = _train(_compiled_step(compile_backend), V, x, teacher, labels, alpha=alpha)
    # aot_eager runs the same kernels; inductor may fuse/reorder the tiny matmul and the SGD update
    # (fp32 reassociation over H = 8 terms, 3 steps): 1e-5 relative covers it
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(eager_losses[0], eager_losses[-1])  # training moved


_HAS_CXX = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


@pytest.mark.parametrize("compile_backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not _HAS_CXX, reason="inductor on CPU needs a C++ compiler")),
])
def test_compile_fullgraph_training_step_matches_eager(monkeypatch, compile_backend):
    """The custom ops, their fake kernels and autograd formula under fullgraph compile (torch path).

    Alpha as a python float here; the next test passes it as a tensor.
    """
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    _check_compiled_matches_eager(compile_backend, alpha=0.3)


def test_compile_fullgraph_training_step_cpu_checks(monkeypatch):
    """The value checks of CPU tensors (alpha range, label range) step aside while dynamo traces:
    reading tensor values would be a data-dependent guard and break the graph."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    _check_compiled_matches_eager("aot_eager", alpha=torch.tensor([0.3, 0.7]))


# ------------------------------------------------------------------------ 64-bit offsets


def test_int64_element_offsets(backend):
    """Rows that start beyond 2^31 elements, with strides that fit in 32 bits (so only 64-bit
    offset arithmetic in the kernels reads the right rows). Untouched pages are never resident.
    V = 40 (a multiple of 8 bf16 columns = 16 bytes) keeps every row of both layouts on a 16-byte
    boundary, so the kernels add each row's terms in the same order and the results are bitwise
    equal (see test_layout_and_index_dtype_do_not_matter for rows that are not)."""
    V, S = 40, 2**30
    try:
        buf = torch.empty(2**31 + 2 * V, dtype=torch.bfloat16)
    except RuntimeError as exc:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 4 GiB of address space for the int64-offset test: {exc}")
    g = torch.Generator().manual_seed(17)
    s_rows = torch.randn(3, V, generator=g).to(torch.bfloat16)
    t_rows = torch.randn(3, V, generator=g).to(torch.bfloat16)
    for k in range(3):
        buf[k * S:k * S + V] = s_rows[k]
        buf[k * S + V:k * S + 2 * V] = t_rows[k]
    labels = torch.randint(0, V, (3, 1), generator=g)
    kw = dict(student_generated=torch.tensor([True, False, True]), alpha=torch.tensor([0.2, 0.5, 0.9]),
              temperature=0.9, reduction="none", return_stats=True)
    cases = {  # (batch-strided [3, 1, V], time-strided [1, 3, V]): element 2·2^30 = 2^31 is row 2
        "batch": (buf.as_strided((3, 1, V), (S, V, 1)), buf.as_strided((3, 1, V), (S, V, 1), V), labels),
        "time": (buf.as_strided((1, 3, V), (0, S, 1)), buf.as_strided((1, 3, V), (0, S, 1), V), labels.view(1, 3)),
    }
    for name, (student, teacher, lab) in cases.items():
        assert student.storage_offset() + 2 * S >= 2**31
        shape = student.shape
        leaf = student.detach().requires_grad_()  # a strided leaf: its .grad is a compact [.., V]
        compact = s_rows.view(shape).clone().requires_grad_()
        k = dict(kw, student_generated=kw["student_generated"].view(-1)[:shape[0]],
                 alpha=kw["alpha"][:shape[0]])
        loss, stats = ak.askd_loss(leaf, lab, teacher, **k)
        loss_c, stats_c = ak.askd_loss(compact, lab, t_rows.view(shape).clone(), **k)
        # the same numbers read from other addresses: identical results
        assert torch.equal(loss, loss_c), name
        for key in stats:
            assert torch.equal(stats[key], stats_c[key]), (name, key)
        loss.sum().backward()
        loss_c.sum().backward()
        assert torch.equal(leaf.grad, compact.grad), name
