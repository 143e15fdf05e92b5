"""`rao_blackwell` has the expected gradient of `exact` (tests/test_enumeration.py) — and less variance.

A fixed tiny model: a tabular autoregressive student and teacher (one row of logits per prefix,
seeded), V = 4 tokens, T = 4 positions, so the V^T = 256 responses can be enumerated. Two
measurements of the same thing, for `exact` and `rao_blackwell`:

* **enumerated**: the per-sequence variance E_y‖g(y) − E g‖² of the gradient w.r.t. the student
  table, summed exactly over all responses (y ~ q for SGOs, y ~ p for TGOs). No sampling noise.
* **sampled**: R independent batches of n SGOs (y ~ q) and n TGOs (y ~ p), drawn with a seeded
  generator; each batch's gradient (one call per estimator on the same draws) is compared with
  the true gradient n·(∇SRKL + ∇SKL) of the token-factorised divergences (γ = 1, where both
  estimators are unbiased). The mean squared deviation over the R batches is n·(σ²_SGO + σ²_TGO)
  in expectation; its standard error is estimated from the spread over the batches.

The numbers are printed (``pytest -s``). The thresholds are set from them; see ``_THRESHOLDS``.
Runs on the oracle and on the library's torch path; the Triton interpreter (``backend`` fixture) (~30 ms per row and
stage) runs only the enumerated measurement on a smaller model (V = 3, T = 3: 27 responses).
"""
import itertools

import pytest
import torch

import askd_kernels as ak
import reference

F64 = torch.float64
ALPHA_SGO, ALPHA_TGO = 0.3, 0.7


class Model:
    """Tabular student/teacher over V tokens and T positions, with every response enumerated."""

    def __init__(self, V, T, seed):
        prefixes = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
        row_id = {p: i for i, p in enumerate(prefixes)}
        seqs = list(itertools.product(range(V), repeat=T))
        self.V, self.T, self.n_rows = V, T, len(prefixes)
        self.rows = torch.tensor([[row_id[s[:t]] for t in range(T)] for s in seqs])  # [N, T]
        self.labels = torch.tensor(seqs)  # [N, T]
        g = torch.Generator().manual_seed(seed)
        self.student = 1.5 * torch.randn(self.n_rows, V, generator=g, dtype=F64)
        self.teacher = 1.5 * torch.randn(self.n_rows, V, generator=g, dtype=F64)
        self.q = self._seq_logprob(self.student).exp()  # q(y) of each response
        self.p = self._seq_logprob(self.teacher).exp()

    def _token_logprobs(self, table):
        return torch.log_softmax(table[self.rows], -1).gather(-1, self.labels.unsqueeze(-1)).squeeze(-1)

    def _seq_logprob(self, table):
        return self._token_logprobs(table).sum(-1)

    def true_grad(self, source, alpha):
        """∇ of the token-factorised SRKL (source "sgo") or SKL ("tgo"), by enumeration."""
        student = self.student.clone().requires_grad_(True)
        log_q, log_p = self._token_logprobs(student), self._token_logprobs(self.teacher)
        log_m = torch.logaddexp(torch.log(torch.tensor(alpha, dtype=F64)) + log_q,
                                torch.log(torch.tensor(1 - alpha, dtype=F64)) + log_p)
        if source == "sgo":
            div = (log_q.sum(-1).exp() * (log_q - log_m).sum(-1)).sum()
        else:
            div = (self.p * (log_p - log_m).sum(-1)).sum()
        (grad,) = torch.autograd.grad(div, student)
        return grad.reshape(-1)


def _ref_call(logits, labels, teacher, **kw):
    return reference.askd_loss_ref(logits, labels, teacher, reduction="none", **kw)[0]


def _lib_call(logits, labels, teacher, **kw):
    return ak.askd_loss(logits.float(), labels, teacher.float(), reduction="none", **kw).double()


def _table_grads(call, model, idx, *, group_of=None, **kw):
    """Gradient w.r.t. the student table of every response model.labels[idx] (one op call; without
    a baseline the sequences do not interact, so this is each one's own gradient), flattened:
    [len(idx), n_rows·V]. ``group_of``: sums the rows into groups instead (batch gradients), which
    is required when the baseline couples the sequences of a group."""
    rows, labels = model.rows[idx], model.labels[idx]
    logits = model.student[rows].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(call(logits, labels, model.teacher[rows], **kw).sum(), logits)
    n_out = len(idx) if group_of is None else int(group_of.max()) + 1
    out_row = torch.arange(len(idx)) if group_of is None else group_of
    flat = torch.zeros(n_out * model.n_rows, model.V, dtype=F64)
    flat.index_add_(0, (out_row[:, None] * model.n_rows + rows).reshape(-1), g.reshape(-1, model.V))
    return flat.reshape(n_out, -1)


def enumerated_variance(call, model, source, estimator, gamma=1.0):
    """(E_y‖g(y) − E g‖², E g) over all responses, y ~ q (SGO) or y ~ p (TGO)."""
    alpha = ALPHA_SGO if source == "sgo" else ALPHA_TGO
    weights = model.q if source == "sgo" else model.p
    G = _table_grads(call, model, torch.arange(len(weights)), student_generated=source == "sgo",
                     alpha=alpha, estimator=estimator, gamma=gamma)
    mean = (weights[:, None] * G).sum(0)
    return (weights * ((G - mean) ** 2).sum(1)).sum().item(), mean


def sampled_mse(call, model, *, R, n, seed, estimators):
    """Mean over R batches (n SGOs + n TGOs each) of ‖batch gradient − n(∇SRKL + ∇SKL)‖², and its
    standard error, for each estimator (a (name, options) pair) on the same draws."""
    g = torch.Generator().manual_seed(seed)
    sgo_idx = torch.multinomial(model.q, R * n, replacement=True, generator=g).reshape(R, n)
    tgo_idx = torch.multinomial(model.p, R * n, replacement=True, generator=g).reshape(R, n)
    idx = torch.cat([sgo_idx, tgo_idx], 1).reshape(-1)  # batch r = rows [2n·r, 2n·(r+1))
    batch = torch.arange(R).repeat_interleave(2 * n)
    sgo = torch.cat([torch.ones(R, n, dtype=torch.bool), torch.zeros(R, n, dtype=torch.bool)], 1).reshape(-1)
    alpha = torch.where(sgo, ALPHA_SGO, ALPHA_TGO).to(F64)
    truth = n * (model.true_grad("sgo", ALPHA_SGO) + model.true_grad("tgo", ALPHA_TGO))
    out = {}
    for name, options in estimators:
        options = {k: (batch if v == "per_batch" else v) for k, v in options.items()}
        G = _table_grads(call, model, idx, group_of=batch, student_generated=sgo, alpha=alpha, **options)
        sq = ((G - truth) ** 2).sum(1)  # [R]
        out[name] = (sq.mean().item(), (sq.std() / R ** 0.5).item())
    return out


ESTIMATORS = [("exact", dict(estimator="exact")),
              ("rao_blackwell", dict(estimator="rao_blackwell")),
              ("rao_blackwell + baseline", dict(estimator="rao_blackwell", baseline_groups="per_batch"))]

# Thresholds on variance(rao_blackwell) / variance(exact), from the numbers printed by these tests
# (fp64 oracle; the library's fp32 agrees to ~1e-6 relative). Enumerated, exact values:
#   model A (V = 4, T = 4, seed 0), γ = 1:   SGO 2.036 / 4.103 = 0.496    TGO 0.107 / 0.597 = 0.179
#                                   γ = 0.5: SGO 0.354 / 2.027 = 0.175    (TGO: γ plays no part)
#   model B (V = 3, T = 3, seed 11), γ = 1:  SGO 0.751 / 1.181 = 0.636    TGO 0.047 / 0.289 = 0.164
# The enumerated ratios are exact properties of the fixed model, so the only slack they need is
# for a correct implementation's rounding (~1e-6); the bounds below sit well between the measured
# ratio and 1, so that a sampled-token term sneaking back in (e.g. the TGO keeping ρ_t·∇log q_t,
# or the SGO keeping u_t + ρ_t − 1 at the sampled token, i.e. exact's variance) fails them clearly.
# On SGOs at γ = 1 the future return F_t — which rao_blackwell keeps as a one-sample estimate —
# carries about half the variance, hence the weaker bound there.
ENUM_MAX_RATIO = {("A", "sgo", 1.0): 0.6, ("A", "tgo", 1.0): 0.3, ("A", "sgo", 0.5): 0.3,
                  ("B", "sgo", 1.0): 0.75, ("B", "tgo", 1.0): 0.3}
# Sampled (R = 300 batches of 4 SGOs + 4 TGOs): expected ratio (2.036 + 0.107)/(4.103 + 0.597)
# = 0.456; with R = 300 the standard error of each MSE is ~6–8 % of it (printed), so 0.65 leaves
# more than 3 standard errors of room and still demands a 35 % reduction.
SAMPLED_MAX_RATIO = 0.65
R, N_PER_SOURCE = 300, 4


def _run_enumerated(call, model, key, cases):
    results = {}
    for source, gamma in cases:
        var = {est: enumerated_variance(call, model, source, est, gamma) for est in ("exact", "rao_blackwell")}
        (v_ex, m_ex), (v_rb, m_rb) = var["exact"], var["rao_blackwell"]
        ratio = v_rb / v_ex
        print(f"[{key}] enumerated {source} γ={gamma}: var exact {v_ex:.4f}  rao_blackwell {v_rb:.4f}  "
              f"ratio {ratio:.3f}  (bound {ENUM_MAX_RATIO[(key, source, gamma)]})")
        # the same mean (tests/test_enumeration.py proves it; here it guards the comparison)
        torch.testing.assert_close(m_rb, m_ex, rtol=1e-4, atol=2e-5)
        assert v_ex > 0.01  # not vacuous
        results[(source, gamma)] = ratio
        assert ratio < ENUM_MAX_RATIO[(key, source, gamma)]
    return results


def _run_sampled(call, model, label):
    res = sampled_mse(call, model, R=R, n=N_PER_SOURCE, seed=1, estimators=ESTIMATORS)
    for name, (mse, se) in res.items():
        print(f"[{label}] sampled R={R}, {N_PER_SOURCE}+{N_PER_SOURCE} per batch: MSE {name:>26} "
              f"{mse:8.4f} ± {se:.4f}")
    ratio = res["rao_blackwell"][0] / res["exact"][0]
    print(f"[{label}] sampled ratio rao_blackwell/exact {ratio:.3f} (bound {SAMPLED_MAX_RATIO}); "
          f"with baseline/exact {res['rao_blackwell + baseline'][0] / res['exact'][0]:.3f}")
    assert ratio < SAMPLED_MAX_RATIO
    # the sampled MSE is what the enumeration predicts: n·(σ²_SGO + σ²_TGO), within 4 standard errors
    for est in ("exact", "rao_blackwell"):
        predicted = N_PER_SOURCE * sum(enumerated_variance(call, model, s, est)[0] for s in ("sgo", "tgo"))
        mse, se = res[est]
        assert abs(mse - predicted) < 4 * se, (est, mse, predicted, se)
    return res


MODEL_A_CASES = [("sgo", 1.0), ("tgo", 1.0), ("sgo", 0.5)]


def test_variance_reference():
    model = Model(4, 4, seed=0)
    _run_enumerated(_ref_call, model, "A", MODEL_A_CASES)
    _run_sampled(_ref_call, model, "reference")


def test_variance_library_torch(monkeypatch):
    # the torch path at its real chunk size (the ``backend`` fixture's tiny chunks, which exist to
    # exercise the chunk loops, make 2400 rows take 5× longer; tests/test_enumeration.py runs them)
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    model = Model(4, 4, seed=0)
    _run_enumerated(_lib_call, model, "A", MODEL_A_CASES)
    _run_sampled(_lib_call, model, "library torch")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_variance_library_triton_tiny(backend):
    model = Model(3, 3, seed=11)
    _run_enumerated(_lib_call, model, "B", [("sgo", 1.0), ("tgo", 1.0)])
