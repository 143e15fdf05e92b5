"""Exhaustive-enumeration proofs that the estimators are unbiased (docs/contract.md §3, §4).

A tabular autoregressive student (one learnable row of logits per prefix) and a fixed tabular
teacher over V = 3, T = 3. The batch is all V^T = 27 sequences, so expectations are finite sums:

    SRKL: ∇ Σ_y q(y) Σ_t log(q_t/m_t)  ==  Σ_y q(y) · (op gradient for sequence y)   (all SGO)
    SKL:  ∇ Σ_y p(y) Σ_t log(p_t/m_t)  ==  Σ_y p(y) · (op gradient for sequence y)   (all TGO)

with m_t = α q_t + (1 - α) p_t the token-level mixture. The same identity must FAIL for
estimator="paper", which shows the check has teeth.

The second half does the same for estimator="rao_blackwell" (equal to "exact" in expectation at
every γ, with importance weights too) and shows that the leave-one-out baseline (``baseline_groups``)
leaves the expected gradient of "exact" and "rao_blackwell" unchanged, by enumerating pairs of
variable-length responses; see the comments there.
"""
import itertools
import math

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


# ====================================================================================================
# estimator="rao_blackwell": the same expectations, and the leave-one-out baseline
#
# At every position, rao_blackwell replaces the sampled-token factor of "exact" by its expectation
# over the token drawn there (full-vocabulary skl_t / srkl_t), keeping only the future return F_t
# as a one-sample factor of ∇log q(y_t). Its expected gradient must therefore equal exact's at the
# same γ (and, at γ = 1, the gradient of the divergence itself). Each check runs on the oracle and
# on the library, the latter through the ``backend`` fixture of tests/conftest.py (parametrised
# explicitly below: the Triton interpreter runs ~30 ms per row and stage, so it gets a subset of
# the cases — the torch path runs them all, and the kernels must agree with it on the rest by the
# parity tests).
# ====================================================================================================


def _ref_call(student_logits, labels, teacher_logits, **kw):
    loss, _ = reference.askd_loss_ref(student_logits, labels, teacher_logits, reduction="none",
                                      dtype=torch.float64, **kw)
    return loss


def _lib_call(student_logits, labels, teacher_logits, **kw):
    # float32 logits; the cast is in the graph, so the gradient reaches the fp64 table
    kw = {k: (v.float() if k == "old_logprobs" else v) for k, v in kw.items()}
    out = ak.askd_loss(student_logits.float(), labels, teacher_logits.float(), reduction="none", **kw)
    return out.double()


def _expected(call, student, teacher, rows, labels, weights, **kw):
    """Σ_y weight(y)·∇(loss of y) w.r.t. the student table, and Σ_y weight(y)·D_y."""
    per_seq = call(student[rows], labels, teacher[rows], **kw)
    assert per_seq.shape == (labels.shape[0],)
    (grad,) = torch.autograd.grad((per_seq * weights.detach()).sum(), student)
    return grad, (per_seq.detach() * weights.detach()).sum()


def _student_moves_divergence(source, alpha):
    """False where the divergence does not depend on the student at all: SKL at α = 0 (m = p) and
    SRKL at α = 1 (m = q)."""
    return not ((source == "tgo" and alpha == 0.0) or (source == "sgo" and alpha == 1.0))


def _check_rao_blackwell_unbiased(call, tol, source, alpha, gamma):
    student, teacher = _tables(seed=11)
    div, true_grad, weights = _exact(student, teacher, alpha, source)
    sg = torch.full((len(SEQS),), source == "sgo")
    kw = dict(student_generated=sg, alpha=alpha, gamma=gamma)
    ex_grad, _ = _expected(call, student, teacher, ROW, LABELS, weights, estimator="exact", **kw)
    # rao_blackwell's batch holds every sequence twice, the second copy with clip=True: a clipped
    # SGO must add nothing (value and gradient), a clip flag on a TGO nothing either (κ = 1 there)
    n = len(SEQS)
    clip = torch.arange(2 * n) >= n
    rb_grad, rb_value = _expected(call, student, teacher, ROW.repeat(2, 1), LABELS.repeat(2, 1), weights.repeat(2),
                                  estimator="rao_blackwell", clip=clip, **{**kw, "student_generated": sg.repeat(2)})
    if source == "tgo":
        rb_grad, rb_value = rb_grad / 2, rb_value / 2
    torch.testing.assert_close(rb_grad, ex_grad, **tol)  # the same expectation as "exact" at this γ
    if gamma == 1.0:
        torch.testing.assert_close(rb_grad, true_grad, **tol)  # = ∇ of the token-factorised divergence
    # the value sums full-vocabulary terms at the sampled prefixes: its expectation is the divergence
    torch.testing.assert_close(rb_value, div, **tol)
    if _student_moves_divergence(source, alpha):
        assert true_grad.abs().max() > 1e-2 and rb_grad.abs().max() > 1e-2  # not vacuous
        if source == "sgo" and gamma != 1.0:  # γ < 1 really changes the expectation (it is a bias)
            assert (rb_grad - true_grad).abs().max() > 1e-3
    else:
        assert true_grad.abs().max() == 0.0
        torch.testing.assert_close(rb_grad, torch.zeros_like(rb_grad), rtol=0, atol=tol["atol"])


# the α boundaries (0: SKL has no gradient, SRKL is reverse KL; 1: SKL is forward KL, SRKL has none)
# at γ = 1; interior α at both γ
_RB_CASES = [(s, a, 1.0) for s in ("sgo", "tgo") for a in (0.0, 0.3, 0.7, 1.0)] + \
            [(s, a, 0.5) for s in ("sgo", "tgo") for a in (0.3, 0.7)]
_RB_TRITON = [("sgo", 0.3, 1.0), ("tgo", 0.7, 1.0), ("sgo", 0.7, 0.5), ("tgo", 0.0, 1.0)]


@pytest.mark.parametrize("source, alpha, gamma", _RB_CASES)
def test_rao_blackwell_is_unbiased_reference(source, alpha, gamma):
    _check_rao_blackwell_unbiased(_ref_call, TOL["reference"], source, alpha, gamma)


@pytest.mark.parametrize("backend, source, alpha, gamma",
                         [("torch", *c) for c in _RB_CASES] + [("triton", *c) for c in _RB_TRITON],
                         indirect=["backend"])
def test_rao_blackwell_is_unbiased_library(backend, source, alpha, gamma):
    _check_rao_blackwell_unbiased(_lib_call, TOL[backend], source, alpha, gamma)


# ---- importance weights ------------------------------------------------------------------------
#
# SGOs sampled from a behaviour policy q_old ≠ q (an independent table), weighted per token by
# w_t = q_t / q_old,t (uncapped). Per-token weights make each token's factor on-policy GIVEN the
# rest of the sequence, i.e. E_{y_t~q_old}[w_t·X(y_t)] = E_{y_t~q}[X(y_t)] at a fixed prefix and
# future; the prefix and the future stay off-policy. So:
#  * for ONE token the weighted expectation over y ~ q_old is the on-policy gradient, for both
#    estimators (for rao_blackwell trivially: with no future there is nothing sampled);
#  * for whole sequences, rao_blackwell's expectation over y ~ q_old equals exact's (both weighted):
#    exact's sampled-token part w_t(u_t + ρ_t − 1)∇log q_t averages to −∇srkl_t, which is what
#    rao_blackwell computes unweighted, and the future term w_t·F_t·∇log q_t is common to both.
#    This is what would break if the weight were dropped from the future term. It is NOT the
#    on-policy gradient of the whole sequence (per-token weights do not correct the distribution
#    of the prefix and of the future), and the test does not pretend it is.


def _behaviour_table(student, seed=12):
    g = torch.Generator().manual_seed(seed)
    return student.detach() + 1.2 * torch.randn(student.shape, generator=g, dtype=torch.float64)


def _one_step_srkl_grad(student, teacher, alpha):
    """∇ of the first token's SRKL alone, Σ_v q_v log(q_v/m_v) at the root row."""
    log_q = torch.log_softmax(student[0], -1)
    log_p = torch.log_softmax(teacher[0], -1)
    log_m = torch.logaddexp(math.log(alpha) + log_q, math.log(1 - alpha) + log_p)
    (grad,) = torch.autograd.grad((log_q.exp() * (log_q - log_m)).sum(), student)
    return grad


def _check_importance_weights(call, tol, alpha, gamma):
    student, teacher = _tables(seed=11)
    old_table = _behaviour_table(student)
    old_lp = _token_logprobs(old_table)  # [B, T] log q_old of each token
    q_old = old_lp.sum(-1).exp()  # sampling weights of the 27 sequences
    sg = torch.full((len(SEQS),), True)
    kw = dict(student_generated=sg, alpha=alpha, gamma=gamma, old_logprobs=old_lp)
    rb, _ = _expected(call, student, teacher, ROW, LABELS, q_old, estimator="rao_blackwell", **kw)
    ex, _ = _expected(call, student, teacher, ROW, LABELS, q_old, estimator="exact", **kw)
    torch.testing.assert_close(rb, ex, **tol)
    # not vacuous: without the weights, the expectation over y ~ q_old is a different vector
    kw.pop("old_logprobs")
    unweighted, _ = _expected(call, student, teacher, ROW, LABELS, q_old, estimator="rao_blackwell", **kw)
    assert (unweighted - rb).abs().max() > 1e-2

    # one token: the weighted expectation over y ~ q_old is the on-policy gradient
    labels1 = torch.arange(V).unsqueeze(1)  # [V, 1]: every one-token response
    rows1 = torch.zeros(V, 1, dtype=torch.long)  # the root row of the tables
    old1 = torch.log_softmax(old_table[0], -1)
    kw1 = dict(student_generated=torch.full((V,), True), alpha=alpha, gamma=gamma,
               old_logprobs=old1.unsqueeze(1))
    true1 = _one_step_srkl_grad(student, teacher, alpha)
    assert true1.abs().max() > 1e-2
    for estimator in ("exact", "rao_blackwell"):
        g1, _ = _expected(call, student, teacher, rows1, labels1, old1.exp(), estimator=estimator, **kw1)
        torch.testing.assert_close(g1, true1, **tol)


_IS_CASES = [(0.3, 1.0), (0.7, 1.0), (0.3, 0.5)]


@pytest.mark.parametrize("alpha, gamma", _IS_CASES)
def test_importance_weights_reference(alpha, gamma):
    _check_importance_weights(_ref_call, TOL["reference"], alpha, gamma)


@pytest.mark.parametrize("backend, alpha, gamma",
                         [("torch", *c) for c in _IS_CASES] + [("triton", 0.3, 1.0)], indirect=["backend"])
def test_importance_weights_library(backend, alpha, gamma):
    _check_importance_weights(_lib_call, TOL[backend], alpha, gamma)


# ---- the leave-one-out baseline ------------------------------------------------------------------
#
# A tabular student/teacher over a vocabulary of n_vocab tokens where token 0 ends the response (at
# most T = 3 tokens, the rest of the row ignore_index), so responses have different lengths and
# "position t valid in the other sequence" matters. The batch holds every PAIR of responses as two
# SGOs of one group; weighting pair (y1, y2) by q(y1)·q(y2) takes the expectation over both samples.
# The baseline b_{1,t} is built from y2 only, which is independent of y1, so the expected gradient
# must not move — while the per-sample gradients do. n_vocab = 3: 15 responses, 225 pairs (B = 450);
# n_vocab = 2 (for the Triton interpreter): 4 responses, 16 pairs (B = 32).

EOS = 0


def _responses(n_vocab):
    return [r for n in range(1, T + 1) for r in itertools.product(range(n_vocab), repeat=n)
            if all(tok != EOS for tok in r[:-1]) and (r[-1] == EOS or n == T)]


def _open_prefixes(n_vocab):
    """Prefixes without EOS, i.e. the rows of the tables: 7 for n_vocab = 3, 3 for n_vocab = 2."""
    return [p for n in range(T) for p in itertools.product(range(1, n_vocab), repeat=n)]


def _responses_batch(responses, n_vocab):
    """rows [B, T] (table row per position; 0 at padding, where nothing may be read) and labels."""
    row_id = {p: i for i, p in enumerate(_open_prefixes(n_vocab))}
    rows = torch.tensor([[row_id[r[:t]] if t < len(r) else 0 for t in range(T)] for r in responses])
    labels = torch.tensor([[r[t] if t < len(r) else -100 for t in range(T)] for r in responses])
    return rows, labels


def _eos_tables(n_vocab, seed=13):
    g = torch.Generator().manual_seed(seed)
    shape = (len(_open_prefixes(n_vocab)), n_vocab)
    student = (1.5 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    return student, teacher


def _eos_srkl_grad(student, teacher, alpha, n_vocab):
    """∇ Σ_y q(y) Σ_t log(q_t/m_t) over the variable-length responses, and q(y) of each response."""
    rows, labels = _responses_batch(_responses(n_vocab), n_vocab)
    valid = labels != -100
    lab = labels.clamp(min=0).unsqueeze(-1)
    log_q = torch.log_softmax(student[rows], -1).gather(-1, lab).squeeze(-1)
    log_p = torch.log_softmax(teacher[rows], -1).gather(-1, lab).squeeze(-1)
    log_m = torch.logaddexp(math.log(alpha) + log_q, math.log(1 - alpha) + log_p)
    q_y = torch.where(valid, log_q, 0.0).sum(-1).exp()
    assert abs(q_y.sum().item() - 1.0) < 1e-12
    div = (q_y * torch.where(valid, log_q - log_m, 0.0).sum(-1)).sum()
    (grad,) = torch.autograd.grad(div, student)
    return grad, q_y.detach()


def _pairs(n_vocab):
    responses = _responses(n_vocab)
    pairs = list(itertools.product(range(len(responses)), repeat=2))
    rows, labels = _responses_batch([responses[k] for pair in pairs for k in pair], n_vocab)
    groups = torch.arange(len(pairs)).repeat_interleave(2)  # pair k = rows 2k, 2k+1 = group k
    return pairs, rows, labels, groups


def _per_sample(call, student, teacher, rows, labels, weights, **kw):
    """Each sequence's gradient w.r.t. its own per-position logits [B, T, V] (one call: the baseline
    is detached, so loss_b depends on no other sequence's logits), and from it the expected
    gradient Σ_b weight_b·∇loss_b w.r.t. the table (each position's gradient lands on its row)."""
    logits = student.detach()[rows].requires_grad_(True)
    (g,) = torch.autograd.grad(call(logits, labels, teacher[rows], **kw).sum(), logits)
    weighted = (weights[:, None, None] * g).reshape(-1, g.shape[-1])
    expected = torch.zeros_like(student).index_add_(0, rows.reshape(-1), weighted)
    return g, expected


def _check_baseline(call, tol, estimator, gamma, n_vocab, alpha=0.3):
    student, teacher = _eos_tables(n_vocab)
    true_grad, q_y = _eos_srkl_grad(student, teacher, alpha, n_vocab)
    pairs, rows, labels, groups = _pairs(n_vocab)
    weights = torch.tensor([q_y[i] * q_y[j] for i, j in pairs], dtype=torch.float64).repeat_interleave(2)
    sg = torch.full((labels.shape[0],), True)
    kw = dict(student_generated=sg, alpha=alpha, gamma=gamma, estimator=estimator)
    g0, plain = _per_sample(call, student, teacher, rows, labels, weights, **kw)
    g1, based = _per_sample(call, student, teacher, rows, labels, weights, baseline_groups=groups, **kw)
    torch.testing.assert_close(based, plain, **tol)
    if gamma == 1.0:  # γ < 1 is biased on its own (both estimators alike), baseline or not
        torch.testing.assert_close(plain, 2 * true_grad, **tol)  # two SGOs per pair
    assert true_grad.abs().max() > 1e-2
    assert (g1 - g0).abs().max() > 0.1  # not vacuous: the baseline moves the per-sample gradients
    return g0, g1


_BASELINE_CASES = [("exact", 1.0), ("rao_blackwell", 1.0), ("exact", 0.5), ("rao_blackwell", 0.5)]


@pytest.mark.parametrize("estimator, gamma", _BASELINE_CASES)
@pytest.mark.parametrize("n_vocab", [3, 2])
def test_baseline_keeps_expected_gradient_reference(estimator, gamma, n_vocab):
    _check_baseline(_ref_call, TOL["reference"], estimator, gamma, n_vocab)


@pytest.mark.parametrize("backend, estimator, gamma, n_vocab",
                         [("torch", *c, 3) for c in _BASELINE_CASES]
                         + [("triton", "rao_blackwell", 1.0, 2), ("triton", "exact", 0.5, 2)],
                         indirect=["backend"])
def test_baseline_keeps_expected_gradient_library(backend, estimator, gamma, n_vocab):
    g0, g1 = _check_baseline(_lib_call, TOL[backend], estimator, gamma, n_vocab)
    # and sample by sample it is the oracle's baseline (variable lengths: "t valid in j" matters)
    student, teacher = _eos_tables(n_vocab)
    _, rows, labels, groups = _pairs(n_vocab)
    kw = dict(student_generated=True, alpha=0.3, gamma=gamma, estimator=estimator)
    ones = torch.ones(labels.shape[0], dtype=torch.float64)
    r0, _ = _per_sample(_ref_call, student, teacher, rows, labels, ones, **kw)
    r1, _ = _per_sample(_ref_call, student, teacher, rows, labels, ones, baseline_groups=groups, **kw)
    torch.testing.assert_close(g0, r0, **TOL[backend])
    torch.testing.assert_close(g1, r1, **TOL[backend])
