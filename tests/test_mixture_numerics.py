"""The direct mixture ``log2 m``, m = α·q + (1−α)·p, of the skl / srkl terms against fp64.

:func:`askd_kernels._triton_math.log2_mixture` computes
``max(fast_log2(w_q·q + w_p·p), la + x, lb + y)`` with the row's weights (w_q, w_p) = (α, 1−α)
for 0 < α < 1 and (0, 0) at α ∈ {0, 1} (:func:`mixture_weights`). Its docstring argues: exact (bit
for bit) at the endpoints, never an infinity or a NaN from underflow, NaN in → NaN out, and an
absolute error ≤ 2^-19.6·max(1, |log2 m|) for m ≥ 2^-100 (checked with 2^-19.5), within 1 below.
Checked here on adversarial inputs — probabilities around the fp32 normal/denormal boundary 2^-126,
α = 1e-7, 1 − 1e-7 and below 2^-126, huge gaps between the two logs, −inf — two ways:

* the interpreted Triton helpers themselves (numpy arithmetic: no flush to zero, an exact log2);
* an emulation, in numpy, of what the compiled code computes: every fp32 result below 2^-126 flushed
  to zero (the FTZ arithmetic of the fast paths, ``ex2.approx.ftz`` / ``lg2.approx.ftz``), every
  exp2 off by its 2^-22 relative error and every log2 by max(2^-22, 2 ulp) (CUDA C Programming
  Guide, ``__log2f``), both signs.
"""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from _backends import INTERPRETED

from askd_kernels._triton_math import divergence_terms, log2_mixture, mixture_weights

TINY = 2.0 ** -126           # smallest normal fp32
BOUND = 2.0 ** -19.5         # the docstring's bound, in units of max(1, |log2 m|)
F32 = np.float32

# base-2 logs of probabilities: the denormal boundary (−126 ± a little, −149 the last denormal),
# ordinary values, 0, −inf, and huge gaps (a tiny-temperature row)
LOGS = np.array([0.0, -1e-7, -0.5, -1.0, -17.3, -60.0, -100.0, -103.5, -120.0, -125.0, -125.9, -126.0, -126.1,
                 -127.0, -130.0, -149.0, -150.0, -300.0, -1e4, -3e37, -np.inf], dtype=F32)
# α interior: ordinary, close to 0 and 1 (1 − 1e-7 is 1 − 2^-23.25 in fp32), below the normal range
ALPHAS = [0.5, 0.3, 1e-7, 1.0 - 1e-7, 2.0 ** -30, 1e-30, 1e-40]


def _log_weights(alpha):
    """fp32 base-2 log weights (la, lb) of α, as the kernels get them (natural logs × log2 e)."""
    a = np.float64(alpha)
    return (F32(np.log2(a)) if a > 0 else F32(-np.inf)), (F32(np.log1p(-a) / np.log(2.0)) if a < 1 else F32(-np.inf))


def _grid():
    x, y = np.meshgrid(LOGS, LOGS, indexing="ij")
    return x.ravel(), y.ravel()


def _truth(x, y, la, lb):
    """log2(2^(la + x) + 2^(lb + y)) in fp64 of the fp32 inputs (the row's log weights as given)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.logaddexp2(np.float64(la) + x.astype(np.float64), np.float64(lb) + y.astype(np.float64))


def _check_interior(got, x, y, la, lb, what):
    truth = _truth(x, y, la, lb)
    some = np.isfinite(x) | np.isfinite(y)
    assert np.array_equal(np.isfinite(got), some), f"{what}: an infinity or a NaN where q > 0 or p > 0"
    assert (got[~some] == -np.inf).all(), what
    t, g = truth[some], got[some].astype(np.float64)
    normal = t >= -100.0
    err = np.abs(g - t)
    allowed = BOUND * np.maximum(1.0, np.abs(t))
    worst = np.argmax(err[normal] / allowed[normal])
    assert (err[normal] <= allowed[normal]).all(), f"{what}: error {err[normal][worst]:.3e} at m = 2^{t[normal][worst]}"
    # below 2^-100: within 1 (of a log2 below −100) — the bounds la + x, lb + y where the direct
    # term flushed, a denormal product's rounding (no FTZ: the interpreter) where it did not
    assert (np.abs(g[~normal] - t[~normal]) <= 1.0).all(), what


# ---------------------------------------------------------------------------------------------
# The compiled arithmetic, emulated.

def _ftz(v):
    v = np.asarray(v, dtype=F32)
    return np.where(np.abs(v) < TINY, F32(0.0), v).astype(F32)


def _ex2(v, sign):
    """ex2.approx.ftz.f32: denormal results flushed, relative error ≤ 2^-22."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.exp2(np.asarray(v, dtype=np.float64)) * (1.0 + sign * 2.0 ** -22)
    return _ftz(r.astype(F32))


def _lg2(v, sign):
    """lg2.approx.ftz.f32: a denormal argument is 0 (−inf), error ≤ max(2^-22, 2 ulp) of the result."""
    v = _ftz(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log2(v.astype(np.float64))
        moved = r + sign * np.maximum(2.0 ** -22, 2 * np.spacing(np.abs(r).astype(F32)).astype(np.float64))
    return np.where(np.isfinite(r), moved, r).astype(F32)


def _maxnan(a, b):
    return np.where(np.isnan(a) | np.isnan(b), F32(np.nan), np.maximum(a, b)).astype(F32)


def _compiled_log2_mixture(x, y, la, lb, sign):
    """log2_mixture as the compiled kernels evaluate it (mixture_weights once per row, then q, p
    from exp2 and one FMUL + FFMA, each rounded to fp32 and flushed)."""
    interior = (la > -np.inf) & (lb > -np.inf)
    wq = _ex2(la, sign)[()] if interior else F32(0.0)
    wp = _ex2(lb, sign)[()] if interior else F32(0.0)
    q, p = _ex2(x, sign), _ex2(y, sign)
    with np.errstate(invalid="ignore"):
        m = _ftz((np.float64(wq) * q.astype(np.float64)).astype(F32))
        m = _ftz((np.float64(wp) * p.astype(np.float64) + m.astype(np.float64)).astype(F32))  # one rounding: FFMA
        hi = _maxnan(_lg2(m, sign), (la + x).astype(F32))
        return _maxnan(hi, (lb + y).astype(F32))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_compiled_fast_path_is_within_its_bound_of_fp64(alpha, sign):
    x, y = _grid()
    la, lb = _log_weights(alpha)
    _check_interior(_compiled_log2_mixture(x, y, la, lb, sign), x, y, la, lb, f"α={alpha}")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_compiled_endpoints_are_exact_and_nan_propagates(sign):
    x, y = _grid()
    for alpha, want in ((1.0, x), (0.0, y)):
        la, lb = _log_weights(alpha)
        assert np.array_equal(_compiled_log2_mixture(x, y, la, lb, sign), want), alpha
    for alpha in (0.0, 1.0, 0.3, 1e-7):
        la, lb = _log_weights(alpha)
        for xn, yn in ((np.full_like(x, np.nan), y), (x, np.full_like(y, np.nan))):
            assert np.isnan(_compiled_log2_mixture(xn, yn, la, lb, sign)).all(), alpha
    assert np.isnan(_compiled_log2_mixture(x, y, F32(np.nan), F32(np.nan), sign)).all()


def test_a_direct_mixture_without_the_bounds_fails_the_check():
    """A direct mixture without the bounds la + x, lb + y fails the finiteness check (FTZ): the
    emulation can see what the bounds are for."""
    x, y = _grid()
    la, lb = _log_weights(1.0 - 1e-7)
    q, p = _ex2(x, 1.0), _ex2(y, 1.0)
    m = _ftz(np.float32(_ex2(la, 1.0)) * q + np.float32(_ex2(lb, 1.0)) * p)
    with pytest.raises(AssertionError):
        _check_interior(_lg2(m, 1.0), x, y, la, lb, "direct only")


# ---------------------------------------------------------------------------------------------
# The interpreted helpers (the code the kernels inline).

@triton.jit
def _mixture_kernel(X, Y, LA, LB, OUT, VAL, A, N: tl.constexpr, KIND: tl.constexpr):
    cols = tl.arange(0, N)
    x = tl.load(X + cols)
    y = tl.load(Y + cols)
    la = tl.load(LA)
    lb = tl.load(LB)
    wq, wp = mixture_weights(la, lb)
    tl.store(OUT + cols, log2_mixture(x, y, tl.exp2(x), tl.exp2(y), la, lb, wq, wp))
    v, a, _q = divergence_terms(x, y, la, lb, wq, wp, KIND)
    tl.store(VAL + cols, v)
    tl.store(A + cols, a)


def _interpreted(x, y, alpha, kind):
    n = triton.next_power_of_2(x.size)
    pad = np.full(n - x.size, -np.inf, dtype=F32)
    xs, ys = torch.from_numpy(np.concatenate([x, pad])), torch.from_numpy(np.concatenate([y, pad]))
    la, lb = (torch.tensor([v], dtype=torch.float32) for v in _log_weights(alpha))
    out, val, a = (torch.empty(n) for _ in range(3))
    _mixture_kernel[(1,)](xs, ys, la, lb, out, val, a, N=n, KIND=kind)
    return out.numpy()[:x.size], val.numpy()[:x.size], a.numpy()[:x.size], la.item(), lb.item()


needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs the Triton helpers under the interpreter")


@needs_interpreter
@pytest.mark.parametrize("alpha", ALPHAS)
def test_interpreted_mixture_is_within_its_bound_and_terms_are_finite(alpha):
    x, y = _grid()
    for kind in (2, 3):
        got, val, a, la, lb = _interpreted(x, y, alpha, kind)
        _check_interior(got, x, y, F32(la), F32(lb), f"α={alpha}")
        # skl: p (y − log m), srkl: q (x − log m) and their a: finite for every pair of finite-or-−inf
        # logs at 0 < α < 1 (0·log 0 = 0), never an inf/NaN from an underflowing mixture
        assert np.isfinite(val).all() and np.isfinite(a).all(), (alpha, kind)


@needs_interpreter
def test_interpreted_endpoints_are_the_limits_bit_for_bit():
    x, y = _grid()
    finite = np.isfinite(x)
    for kind in (2, 3):
        got1, v1, a1, _, _ = _interpreted(x, y, 1.0, kind)
        got0, v0, a0, _, _ = _interpreted(x, y, 0.0, kind)
        assert np.array_equal(got1, x) and np.array_equal(got0, y), kind
        _, vf, af, _, _ = _interpreted(x, y, 0.5, 0)   # fkl
        _, vr, ar, _, _ = _interpreted(x, y, 0.5, 1)   # rkl
        if kind == 2:   # skl(α=1) = fkl (a where q > 0: at q = 0 the value is infinite), skl(α=0) = 0
            assert np.array_equal(v1, vf) and np.array_equal(a1[finite & (x > -126)], af[finite & (x > -126)])
            assert not v0.any() and not a0.any()
        else:           # srkl(α=0) = rkl in value, srkl(α=1) = 0
            assert np.array_equal(v0, vr)
            assert not v1.any() and not a1.any()


def _guarded_jsd(x, y, la, lb):
    """jsd's terms with the explicit 0·log 0 guards the floors replaced (numpy, as the interpreter)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        wq, wp = np.exp2(la + x), np.exp2(lb + y)
        log_m = np.log2(wq + wp)
        a = np.where(wq == 0, F32(0), wq * (x - log_m))
        return np.where(wp == 0, F32(0), wp * (y - log_m)) + a, a


@needs_interpreter
@pytest.mark.parametrize("beta", [0.5, 0.3, 1e-7, 1.0 - 1e-7, 2.0 ** -30])
def test_interpreted_jsd_floors_are_the_guarded_terms(beta):
    """jsd's 0·log 0 = 0 by floors (max(x, −2^100) − max(log2 M, −2^100)) gives the guarded terms'
    values on the grid (finite or −inf logs, around the denormal boundary, huge gaps), finite
    everywhere, and NaN for a NaN log, as the guards did."""
    x, y = _grid()
    _, val, a, la, lb = _interpreted(x, y, 1.0 - beta, 4)   # jsd's weights: (1−β) for q, β for p
    want_val, want_a = _guarded_jsd(x, y, F32(la), F32(lb))
    assert np.isfinite(val).all() and np.isfinite(a).all(), beta
    assert np.array_equal(val, want_val) and np.array_equal(a, want_a), beta
    for xn, yn in ((np.full_like(x, np.nan), y), (x, np.full_like(y, np.nan))):
        _, vn, an, _, _ = _interpreted(xn, yn, 1.0 - beta, 4)
        assert np.isnan(vn).all() and np.isnan(an).all(), beta


@pytest.mark.parametrize("kind", ["skl", "srkl"])
def test_divergences_at_extreme_alpha_and_huge_gaps_match_fp64(backend, kind):
    """End to end, both backends: rows whose log-probabilities sit around the fp32 normal/denormal
    boundary (gaps of 80–100 nats: e^-87.3 = 2^-126) and far beyond it, −inf entries, and α = 1e-7,
    1 − 1e-7 per sequence. Finite values and gradients within the suite's tolerance rule of the fp64
    oracle (tests/_compare.py)."""
    from test_divergence_parity import _check_case, _run

    import askd_kernels as ak

    g = torch.Generator().manual_seed(3)
    gaps = torch.tensor([0.0, -1.0, -80.0, -86.0, -87.0, -87.5, -88.0, -90.0, -100.0, -104.0, -200.0, -1e4])
    student = torch.stack([gaps[torch.randperm(gaps.numel(), generator=g)] for _ in range(2 * 4)]).view(2, 4, -1)
    teacher = torch.stack([gaps[torch.randperm(gaps.numel(), generator=g)] for _ in range(2 * 4)]).view(2, 4, -1)
    student[0, 1, 3] = teacher[1, 2, 5] = float("-inf")
    teacher[0, 3] = student[0, 3]  # p = q: a zero divergence
    labels = torch.zeros(2, 4, dtype=torch.long)
    for alpha in (torch.tensor([1e-7, 1.0 - 1e-7]), torch.tensor([1.0 - 1e-7, 0.5])):
        kw = dict(kind=kind, alpha=alpha, temperature=1.0, reduction="none")
        case = (student, teacher, labels, kw, torch.rand(2, 4, generator=g) + 0.5)
        value, grad = _run(ak.divergence_loss, *case, leaf_dtype=torch.float32)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), alpha
        _check_case(case)
