"""The CPU divergence path's two kinds of guard (``askd_kernels._torch_math.DIVERGENCE_TERMS``).

On a block whose (max, log-sum) pairs and log weights are all finite, ``finite=True`` zeroes the
0·log 0 terms with one ``nan_to_num_`` pass instead of a bool mask and a ``masked_fill_``: the same
results, ±0 aside, wherever a guard fires. Every other block (a NaN or +inf logit, a row that is −inf
everywhere, α ∈ {0, 1}) keeps the masks, so that NaN in stays NaN out, on every path that runs the
terms: the forward, the vocabulary-parallel second pass from given pairs, and the backward."""
import math

import pytest
import torch

from askd_kernels import _torch_math
from askd_kernels.divergence import cpu

KINDS = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
INF, NAN = math.inf, math.nan
V = 24
# (log w_q, log w_p) of the mixture: skl/srkl α = 0.3, jsd β = 0.4 (w_q = 1 − β), else unused
LOG_W = {"skl": (0.3, 0.7), "srkl": (0.3, 0.7), "jsd": (0.6, 0.4)}


def _edge_logits():
    """Rows whose log-probabilities reach every guard, each row's max finite: −inf columns in the
    student only, in both, in the teacher only; columns 200 below the rest (e^x underflows to 0 with
    x finite); disjoint supports (infinite fkl and rkl); p = q; a one-hot student; a mix."""
    g = torch.Generator().manual_seed(5)
    z, w = torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3
    z[0, :4] = -INF
    w[0, 2:6] = -INF
    z[1, 5:] -= 200.0
    w[1, :10] -= 200.0
    z[2, V // 2:] = -INF
    w[2, :V // 2] = -INF
    w[3] = z[3]
    z[4, 1:] = -INF
    w[5, ::2] = -INF
    z[5, 1::2] -= 150.0
    return z, w


def _log_weights(kind, rows):
    wq, wp = LOG_W.get(kind, (1.0, 1.0))
    return torch.full((rows, 1), math.log(wq)), torch.full((rows, 1), math.log(wp))


def _terms(kind, x, y, given, grad, finite):
    """The kind's in-place terms on copies of the inputs: the forward's columns (with the
    probabilities given, as the fused forward passes them, or computed inside) or the gradient rows."""
    q, p = (x.exp(), y.exp()) if given else (None, None)
    la, lb = _log_weights(kind, x.shape[0])
    out = _torch_math.DIVERGENCE_TERMS[kind](
        x.clone(), y.clone(), None if q is None else q.clone(), None if p is None else p.clone(), la, lb,
        grad=grad, exp2=True, finite=finite)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("mode", ["forward-given", "forward", "gradient"])
@pytest.mark.parametrize("kind", KINDS)
def test_finite_guards_equal_the_masks(kind, mode):
    """``finite=True`` gives the masks' results on every guard case: the same values, infinities and
    NaNs (of an infinite S in the gradient), zeros of either sign."""
    z, w = _edge_logits()
    x, y = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    grad = None
    if mode == "gradient":
        total = _terms(kind, x, y, False, None, False)[1].sum(-1, keepdim=True)
        grad = (total, torch.linspace(0.5, 1.5, x.shape[0]).unsqueeze(1))
    given = mode == "forward-given"
    fast, masked = (_terms(kind, x, y, given, grad, finite) for finite in (True, False))
    for got, want in zip(fast, masked):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if mode != "gradient":  # the cases reach the guards: −inf log-probabilities and zero probabilities
        assert bool(torch.isinf(fast[0]).any()) == (kind in ("fkl", "rkl"))


@pytest.mark.parametrize("rows_per_block", [1, 24], ids=["one-row-blocks", "one-block"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_row_keeps_the_masks_in_every_pass(monkeypatch, kind, side, rows_per_block):
    """A NaN logit gives a NaN pair, so its block keeps the masks: that token's value and gradient
    row are NaN — in the forward, in the second pass from given (vocabulary-parallel) pairs and in
    the backward — while the other tokens are as without the NaN (bit for bit; with one row per
    block they take the finite guards). (With the finite guards the NaN terms would be zeroed: a
    finite value and gradient.) Both ways a block's pairs are checked: few rows and many."""
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", V * rows_per_block)
    g = torch.Generator().manual_seed(6)
    z, w = torch.randn(2, 12, V, generator=g), torch.randn(2, 12, V, generator=g)
    labels = torch.zeros(2, 12, dtype=torch.long)
    kappa = torch.ones(2)
    la, lb = _log_weights(kind, 2)
    log_w = torch.cat([la, lb], 1)
    opts = dict(kind=kind, temperature=0.7, ignore_index=-100)
    results = []
    for poison in (False, True):
        student, teacher = z.clone(), w.clone()
        if poison:  # token (1, 1)
            (student if side == "student" else teacher)[1, 1, 7] = NAN
        value, row_sum, lse_s, lse_t = cpu.forward(student, teacher, labels, kappa, log_w, **opts)
        p_s, p_t = cpu.pairs(student, teacher, labels, kappa, temperature=0.7, ignore_index=-100)
        split, _ = cpu.forward_given_pairs(student, teacher, labels, kappa, log_w, p_s, p_t, **opts)
        grad = cpu.backward(student, teacher, labels, kappa, log_w, lse_s, lse_t, row_sum, torch.ones(24), **opts)
        results.append((value, split, grad.reshape(24, V)))
    row = 13  # token (1, 1)
    for clean, poisoned in zip(*results):
        assert torch.isnan(poisoned[row]).any(), "the NaN logit's token must stay NaN"
        keep = torch.arange(24) != row
        torch.testing.assert_close(poisoned[keep], clean[keep], rtol=0, atol=0)
