"""Exhaustive-enumeration proof that the `exact` estimator is unbiased (docs/contract.md §3, §4).

A tabular autoregressive student (one learnable row of logits per prefix) and a fixed tabular
teacher over V = 3, T = 3. The batch is all V^T = 27 sequences, so expectations are finite sums:

    SRKL: ∇ Σ_y q(y) Σ_t log(q_t/m_t)  ==  Σ_y q(y) · (op gradient for sequence y)   (all SGO)
    SKL:  ∇ Σ_y p(y) Σ_t log(p_t/m_t)  ==  Σ_y p(y) · (op gradient for sequence y)   (all TGO)

with m_t = α q_t + (1 - α) p_t the token-level mixture. The same identity must FAIL for
estimator="paper", which shows the check has teeth.
"""
import itertools

import pytest
import torch

import askd_kernels as ak
import reference

V, T = 3, 3
SEQS = list(itertools.product(range(V), repeat=T))  # B = 27
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]  # 1 + 3 + 9 = 13
PREFIX_ID = {p: i for i, p in enumerate(PREFIXES)}
ROW = torch.tensor([[PREFIX_ID[s[:t]] for t in range(T)] for s in SEQS])  # [B, T] table row per position
LABELS = torch.tensor(SEQS)  # [B, T]

# fp32 tolerance for the askd_kernels variants: every gradient entry is a sum over <= 27 sequences
# of (probability weight <= 1) x (λ = O(1) sums of 3 log-ratios) x (softmax - onehot, |.| <= 1).
# fp32 log-softmax / logaddexp carry a few ulp (~1e-7 relative) on O(1) quantities, so the total
# absolute error is ~1e-6 at worst; 2e-5 absolute leaves margin while staying ~4 orders of
# magnitude below the exact-vs-paper gap asserted below (> 1e-2).
TOL = {
    "reference": dict(rtol=1e-10, atol=1e-12),
    "torch": dict(rtol=1e-4, atol=2e-5),
    "triton": dict(rtol=1e-4, atol=2e-5),
}


def _tables(seed):
    g = torch.Generator().manual_seed(seed)
    student = (1.5 * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = 1.5 * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    return student, teacher


def _token_logprobs(table):
    """log prob of each sampled token, [B, T], differentiable w.r.t. the table."""
    logits = table[ROW]  # [B, T, V]
    return torch.log_softmax(logits, -1).gather(-1, LABELS.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(params=["reference", "torch", "triton"])
def op(request, monkeypatch):
    """(per-sequence loss function, tolerance) for one implementation; reduction="none" -> [B]."""
    impl = request.param
    if impl == "reference":
        def call(student_logits, teacher_logits, **kw):
            loss, _ = reference.askd_loss_ref(student_logits, LABELS, teacher_logits,
                                              reduction="none", dtype=torch.float64, **kw)
            return loss
    else:
        monkeypatch.setenv("ASKD_KERNELS_BACKEND", impl)

        def call(student_logits, teacher_logits, **kw):
            # float32 logits; the cast is in the graph, so the gradient reaches the fp64 table
            out = ak.askd_loss(student_logits.float(), LABELS, teacher_logits.float(),
                               reduction="none", **kw)
            return out.double()
    return call, TOL[impl]


def _op_expected_grad(call, student, teacher, weights, **kw):
    """Σ_y weight(y) · ∇(op loss for sequence y) w.r.t. the student table, and Σ_y weight(y)·D_y."""
    per_seq = call(student[ROW], teacher[ROW], gamma=1.0, **kw)
    assert per_seq.shape == (len(SEQS),)
    (grad,) = torch.autograd.grad((per_seq * weights.detach()).sum(), student)
    return grad, (per_seq.detach() * weights.detach()).sum()


def _exact(student, teacher, alpha, source):
    """Exact token-factorised SRKL (source="sgo") or SKL (source="tgo") by enumeration, and its gradient."""
    log_q = _token_logprobs(student)
    log_p = _token_logprobs(teacher)
    log_m = torch.logaddexp(torch.log(torch.tensor(alpha, dtype=torch.float64)) + log_q,
                            torch.log(torch.tensor(1 - alpha, dtype=torch.float64)) + log_p)
    if source == "sgo":
        weights = log_q.sum(-1).exp()  # q(y), sums to 1
        div = (weights * (log_q - log_m).sum(-1)).sum()
    else:
        weights = log_p.sum(-1).exp()  # p(y), constant
        div = (weights * (log_p - log_m).sum(-1)).sum()
    assert abs(weights.sum().item() - 1.0) < 1e-12
    (grad,) = torch.autograd.grad(div, student)
    return div.detach(), grad, weights.detach()


@pytest.mark.parametrize("alpha", [0.3, 0.7])
@pytest.mark.parametrize("source", ["sgo", "tgo"])
def test_exact_estimator_is_unbiased(op, source, alpha):
    call, tol = op
    student, teacher = _tables(seed=11)
    div, true_grad, weights = _exact(student, teacher, alpha, source)
    sg = torch.full((len(SEQS),), source == "sgo")
    grad, value = _op_expected_grad(call, student, teacher, weights, student_generated=sg,
                                    alpha=alpha, estimator="exact")
    assert true_grad.abs().max() > 1e-2  # the check is not vacuous
    torch.testing.assert_close(grad, true_grad, **tol)
    # the returned value is the Monte-Carlo estimate: its expectation is the divergence itself
    torch.testing.assert_close(value, div, **tol)


@pytest.mark.parametrize("alpha", [0.3, 0.7])
@pytest.mark.parametrize("source", ["sgo", "tgo"])
def test_paper_estimator_is_biased(op, source, alpha):
    """The same identity with the printed Eqs. (10)-(11) must not hold: products of ρ replace ρ_t."""
    call, tol = op
    student, teacher = _tables(seed=11)
    _, true_grad, weights = _exact(student, teacher, alpha, source)
    sg = torch.full((len(SEQS),), source == "sgo")
    grad, _ = _op_expected_grad(call, student, teacher, weights, student_generated=sg,
                                alpha=alpha, estimator="paper")
    gap = (grad - true_grad).norm() / true_grad.norm()
    assert gap > 0.05, f"paper estimator unexpectedly matched the exact gradient (rel. gap {gap:.3g})"
    assert (grad - true_grad).abs().max() > 1e-2
