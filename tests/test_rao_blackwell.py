"""``estimator="rao_blackwell"`` and ``baseline_groups`` beyond parity with the oracle: the identities
that define them, on both backends, and their argument checks. (Parity with ``reference/`` is in
``test_askd_parity.py`` and ``test_fused_linear.py``; unbiasedness in ``test_enumeration.py``;
variance in ``test_variance.py``.)"""
import re

import pytest
import torch
from _backends import KernelRan
from _inputs import problem

import askd_kernels as ak

SGO = torch.tensor([True, False, True])
ALPHA = torch.tensor([0.3, 0.6, 0.9])


def _loss_and_grad(fn, student):
    leaf = student.clone().requires_grad_()
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


def test_gamma_zero_is_the_token_level_full_vocabulary_loss(backend):
    """γ = 0: no future return, so value and gradient are Σ_t of the per-token skl (TGO) / srkl (SGO),
    i.e. divergence_loss's, when both models share one vocabulary."""
    student, teacher, labels = problem(3, B=3, T=5, V_s=23, ignore=[(0, 2)])
    ours = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, student_generated=SGO, alpha=ALPHA,
                                                 estimator="rao_blackwell", gamma=0.0, reduction="sum"), student)
    theirs = _loss_and_grad(
        lambda z: ak.divergence_loss(z, teacher, labels, kind="srkl", alpha=ALPHA, clip=~SGO, reduction="sum")
        + ak.divergence_loss(z, teacher, labels, kind="skl", alpha=ALPHA, clip=SGO, reduction="sum"), student)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)


def test_value_does_not_depend_on_gamma_or_the_baseline(backend):
    """The value is Σ_t of the full-vocabulary terms; γ and the baseline only move the gradient."""
    student, teacher, labels = problem(4, B=3, T=6, V_s=19, V_t=17)
    values, grads = [], []
    for gamma, groups in ((1.0, None), (0.5, None), (1.0, torch.tensor([0, 0, 0]))):
        v, g = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, student_generated=SGO, alpha=ALPHA,
                                                     estimator="rao_blackwell", gamma=gamma,
                                                     baseline_groups=groups), student)
        values.append(v)
        grads.append(g)
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0)
    torch.testing.assert_close(values[2], values[0], rtol=0, atol=0)
    assert (grads[1] - grads[0]).abs().max() > 1e-3 and (grads[2] - grads[0]).abs().max() > 1e-3


def test_stats_lam_is_the_future_return(backend):
    """lam = F_t = G_t − u_t = Σ_{t'>t} γ^(t'−t) u_{t'} on SGOs (0 at the last position), 0 on TGOs."""
    student, teacher, labels = problem(5, B=3, T=6, V_s=11)
    _, stats = ak.askd_loss(student, labels, teacher, student_generated=SGO, alpha=ALPHA,
                            estimator="rao_blackwell", gamma=0.7, return_stats=True)
    lam = stats["lam"]
    assert (lam[1] == 0).all() and (lam[:, -1] == 0).all()
    u = torch.log(ALPHA[:, None] + (1 - ALPHA[:, None]) * stats["log_ratio"].exp())
    for b in (0, 2):
        future = torch.stack([sum(0.7 ** (k - t) * u[b, k] for k in range(t + 1, 6)) if t < 5 else
                              torch.tensor(0.0) for t in range(6)])
        torch.testing.assert_close(lam[b], future, rtol=1e-5, atol=1e-6)


def test_baseline_of_a_lone_sgo_is_zero(backend):
    """Leave-one-out: an SGO alone in its group (or whose partners are clipped / TGOs) keeps its
    gradient; two SGOs in one group change theirs."""
    student, teacher, labels = problem(6, B=3, T=5, V_s=13)
    kw = dict(student_generated=SGO, alpha=ALPHA, estimator="exact")
    plain = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, **kw), student)[1]
    alone = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, baseline_groups=torch.tensor([0, 0, 1]),
                                                  **kw), student)[1]
    clipped = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, baseline_groups=torch.tensor([0, 0, 0]),
                                                    clip=torch.tensor([False, False, True]), **kw), student)[1]
    paired = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, baseline_groups=torch.tensor([0, 0, 0]),
                                                   **kw), student)[1]
    torch.testing.assert_close(alone, plain, rtol=0, atol=0)
    torch.testing.assert_close(clipped[:2], plain[:2], rtol=0, atol=0)
    assert (paired[0] - plain[0]).abs().max() > 1e-4 and (paired[2] - plain[2]).abs().max() > 1e-4
    torch.testing.assert_close(paired[1], plain[1], rtol=0, atol=0)  # a TGO has no return


CASES = [
    ("needs-teacher-logits", dict(teacher=None, teacher_logprobs=torch.zeros(3, 5)), ValueError, "teacher_logits"),
    ("no-length-normalize", dict(length_normalize=True), ValueError, "length_normalize"),
    ("gamma-negative", dict(gamma=-0.1), ValueError, "gamma"),
    ("gamma-zero-not-for-exact", dict(estimator="exact", gamma=0.0), ValueError, "gamma"),
    ("groups-shape", dict(baseline_groups=torch.zeros(2, dtype=torch.long)), ValueError, "baseline_groups"),
    ("groups-bool", dict(baseline_groups=torch.zeros(3, dtype=torch.bool)), TypeError, "baseline_groups"),
    ("groups-not-tensor", dict(baseline_groups=[0, 0, 1]), TypeError, "baseline_groups"),
    ("groups-sequence", dict(estimator="sequence", baseline_groups=torch.zeros(3, dtype=torch.long)),
     ValueError, "baseline_groups"),
]


@pytest.mark.parametrize("overrides, exc, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(no_kernels, overrides, exc, name):
    student, teacher, labels = problem(0, B=3, T=5, V_s=13)
    kw = {**dict(student_generated=SGO, alpha=ALPHA, estimator="rao_blackwell"), **overrides}
    teacher = kw.pop("teacher", teacher)
    with pytest.raises(exc, match=rf"\b{re.escape(name)}\b") as info:
        ak.askd_loss(student, labels, teacher, **kw)
    assert not isinstance(info.value, KernelRan)


@pytest.mark.parametrize("estimator", ["exact", "rao_blackwell"])
def test_alpha_one_sgo_with_q_zero_at_the_label_has_zero_gradient(backend, estimator):
    """α = 1 makes an SGO's mixture the student itself: value 0 and an exactly zero gradient, even
    where the student gives its label probability 0 (without old_logprobs the importance weight is
    1 there, not exp(−inf − (−inf)) = NaN)."""
    student, teacher, labels = problem(8, B=1, T=3, V_s=6)
    student[0, 1, labels[0, 1]] = float("-inf")
    loss, grad = _loss_and_grad(lambda z: ak.askd_loss(z, labels, teacher, student_generated=True, alpha=1.0,
                                                       estimator=estimator), student)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
