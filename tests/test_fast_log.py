"""The fast log2 of the divergence terms is accurate enough: the parity checks against the fp64 oracle
(``reference/``) hold with its documented error injected at its worst sign.

Compiled for a GPU, :func:`askd_kernels._triton_math.fast_log2` is one ``MUFU.LG2``
(``lg2.approx.ftz.f32``): absolute error ≤ 2^-22 for an argument in [0.5, 2], ≤ 2 ulp of the result
elsewhere (CUDA C Programming Guide, ``__log2f``). It is the log of the mixture m itself in skl /
srkl (α·q + (1−α)·p, bounded below by log2(α·q) and log2((1−α)·p); at α ∈ {0, 1} the log of 0, −inf,
kept exact here as by the hardware) and jsd (0 < β < 1), in the divergence kernels and in
rao_blackwell's (tests/test_mixture_numerics.py checks the mixture alone against fp64). The
interpreter has no inline assembly and computes np.log2, so here every log2 the interpreted kernels
take is moved by max(2^-22, 2 ulp) — up, then down — and values and gradients must still meet the
suite's tolerance rule against the oracle (``tests/_compare.py``), boundaries α ∈ {0, 1} included. A
perturbation 10⁴ times larger must fail it: the check can fail.
"""
import numpy as np
import pytest
import torch
from _backends import INTERPRETED, use_triton_on_cpu
from test_divergence_parity import _check_case

import askd_kernels as ak
from askd_kernels import _triton_math

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="injects the error into the interpreter's log2")

ERROR = 2.0 ** -22


def _perturbed_log2(sign, scale):
    def log2(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log2(x)
            ulp = np.spacing(np.abs(r).astype(np.float32)).astype(r.dtype)
            moved = (r + sign * scale * np.maximum(ERROR, 2 * ulp)).astype(r.dtype)
        # log2(0) = −inf stays exact (lg2.approx(+0) = −inf): the mixture's direct term of a row at
        # α ∈ {0, 1} is the log2 of 0
        return np.where(np.isfinite(r), moved, r)
    return log2


@pytest.fixture
def inject(monkeypatch):
    from triton.runtime import interpreter

    use_triton_on_cpu(monkeypatch)
    assert not _triton_math.FAST_LOG2  # the interpreted kernels take tl.log2, patched here

    def set_error(sign, scale=1.0):
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_log2",
                            lambda self, arg: self.unary_op(arg, _perturbed_log2(sign, scale)))
    return set_error


def _case(kind, dtype, alpha):
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(3, 4, 75, generator=g) * 2).to(dtype)
    teacher = (torch.randn(3, 4, 80, generator=g) * 2).to(dtype)[..., 5:72]
    labels = torch.randint(0, 75, (3, 4), generator=g)
    labels[1, ::2] = -100
    kw = dict(kind=kind, alpha=alpha, beta=0.3, temperature=0.9, reduction="none")
    return student, teacher, labels, kw, torch.rand(3, 4, generator=g) + 0.5


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["skl", "srkl", "jsd"])
def test_divergences_meet_the_tolerance_with_the_fast_log_error(inject, kind, dtype, sign):
    inject(sign)
    for alpha in (torch.tensor([0.2, 0.7, 0.5]), torch.tensor([0.0, 1.0, 0.35])):
        _check_case(_case(kind, dtype, alpha))


def test_rao_blackwell_with_the_fast_log_error_matches_the_exact_log(inject):
    """rao_blackwell's skl / srkl terms: the loss and gradient with the error injected stay within the
    tolerance rule's slack of the exact-log run (the oracle comparison of that run is
    tests/test_rao_blackwell.py's)."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 6, 53, generator=g) * 2
    teacher = torch.randn(2, 6, 53, generator=g) * 2
    labels = torch.randint(0, 53, (2, 6), generator=g)
    runs = []
    for sign in (0.0, 1.0, -1.0):
        inject(sign)
        leaf = student.clone().requires_grad_()
        loss = ak.askd_loss(leaf, labels, teacher, student_generated=torch.tensor([True, False]), alpha=0.4,
                            estimator="rao_blackwell")
        loss.backward()
        runs.append((loss.detach(), leaf.grad))
    for loss, grad in runs[1:]:
        assert (loss - runs[0][0]).abs().item() <= 1e-5 * (1 + runs[0][0].abs().item())
        assert (grad - runs[0][1]).abs().max().item() <= 1e-5 * (1 + runs[0][1].abs().max().item())


def test_a_far_larger_log_error_fails_the_check(inject):
    inject(1.0, scale=1e4)
    with pytest.raises(AssertionError):
        _check_case(_case("jsd", torch.float32, torch.tensor([0.2, 0.7, 0.5])))
