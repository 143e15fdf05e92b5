"""Parity of ``askd_loss`` (both backends) with the fp64 oracle in ``reference/`` — values, gradients
and per-token stats — under the tolerance rule of ``_compare.py``. Hypothesis draws the shapes (odd
sizes, V not a multiple of the block, T = 1, B = 1, V_s ≠ V_t both ways) and every option of docs/contract.md §7.
"""
import pytest
import torch
from _inputs import logits_and_labels
from _compare import assert_no_worse
from _backends import use_triton_on_cpu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import askd_kernels as ak
from reference import askd_loss_ref

SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@st.composite
def askd_cases(draw, estimators=("exact", "paper", "sequence")):
    """One random problem: tensors from a drawn seed plus every keyword option."""
    g, student, teacher, labels = logits_and_labels(draw, max_T=40)
    (B, T, V_s), V_t = student.shape, teacher.shape[2]
    dtype = student.dtype
    labels[torch.rand(B, T, generator=g) < draw(st.sampled_from([0.0, 0.2, 0.6]))] = -100
    if draw(st.booleans()):  # a masked vocabulary entry (−inf) that is not the label
        b, t = int(torch.randint(0, B, (1,), generator=g)), int(torch.randint(0, T, (1,), generator=g))
        if V_s > 1 and labels[b, t] != V_s - 1:
            student[b, t, V_s - 1] = float("-inf")
    if draw(st.booleans()):  # non-contiguous logits: a slice of a wider buffer
        student = torch.cat([student, student[:, :1]], dim=1)[:, :T]
    sgo = torch.rand(B, generator=g) < 0.5
    alpha_kind = draw(st.sampled_from(["tensor", "float", "boundary"]))
    if alpha_kind == "tensor":
        alpha = torch.rand(B, generator=g)
    elif alpha_kind == "float":
        alpha = draw(st.floats(0.05, 0.95))
    else:
        alpha = torch.tensor([float(draw(st.sampled_from([0.0, 1.0]))) for _ in range(B)])
    kw = dict(
        student_generated=sgo, alpha=alpha,
        estimator=draw(st.sampled_from(estimators)),
        gamma=draw(st.sampled_from([1.0, 0.9, 0.5])),
        length_normalize=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.7, 2.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    if draw(st.booleans()):
        kw["clip"] = torch.rand(B, generator=g) < 0.5
    if draw(st.booleans()):
        kw["old_logprobs"] = (torch.randn(B, T, generator=g) - 3.0).to(dtype)
        kw["is_max"] = draw(st.sampled_from([None, 1.5]))
    if kw["reduction"] == "mean":
        kw["num_items"] = draw(st.sampled_from([None, 7, "tensor"]))
        if kw["num_items"] == "tensor":
            kw["num_items"] = torch.tensor(5.0)
    full_vocab = kw["estimator"] == "rao_blackwell"
    if full_vocab:  # γ = 0 is its token-level limit; no length normalisation
        kw.update(gamma=draw(st.sampled_from([1.0, 0.9, 0.0])), length_normalize=False)
    if kw["estimator"] in ("exact", "rao_blackwell") and draw(st.booleans()):
        kw["baseline_groups"] = torch.randint(0, 2, (B,), generator=g)
    teacher_arg, teacher_kw = teacher, {}
    if not full_vocab and draw(st.booleans()):  # the teacher's log-probs instead of its logits
        lp = torch.log_softmax(teacher.double(), -1).gather(-1, labels.clamp(0, V_t - 1).unsqueeze(-1))
        teacher_arg, teacher_kw = None, {"teacher_logprobs": lp.squeeze(-1).float()}
    upstream = torch.rand(B, generator=g) * 2 + 0.5 if kw["reduction"] == "none" else torch.tensor(2.5)
    return student, labels, teacher_arg, {**kw, **teacher_kw}, upstream


def _run(fn, student, labels, teacher, kw, upstream, *, leaf_dtype):
    leaf = student.detach().to(leaf_dtype).requires_grad_()
    loss, stats = fn(leaf, labels, teacher, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, leaf.grad


def _check_case(case):
    student, labels, teacher, kw, upstream = case
    dtype = student.dtype
    ours = _run(lambda *a, **k: ak.askd_loss(*a, **k, return_stats=True), *case, leaf_dtype=dtype)
    truth = _run(askd_loss_ref, *case, leaf_dtype=torch.float64)
    naive = _run(lambda *a, **k: askd_loss_ref(*a, **k, dtype=dtype), *case, leaf_dtype=dtype)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype
    assert_no_worse("loss", ours[0], truth[0], naive[0])
    for key in ("log_q", "log_ratio", "lam", "coef"):
        assert_no_worse(key, ours[1][key], truth[1][key], naive[1][key])
    assert_no_worse("grad", ours[2], truth[2], naive[2], stored_dtype=dtype)


@settings(max_examples=60, suppress_health_check=SUPPRESSED)
@given(case=askd_cases())
def test_parity_torch_path(monkeypatch, case):
    from askd_kernels import _torch_math

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 97)  # several chunks even on tiny shapes
    _check_case(case)


@settings(max_examples=25, suppress_health_check=SUPPRESSED)
@given(case=askd_cases())
def test_parity_triton_kernels(monkeypatch, case):
    use_triton_on_cpu(monkeypatch)  # several vocabulary blocks per row, several chunks per sequence
    _check_case(case)


@pytest.mark.parametrize("estimator", ["exact", "paper", "sequence"])
def test_parity_long_sequence(backend, estimator):
    """T far beyond one scan chunk, with γ < 1, length normalisation and holes in the mask."""
    g = torch.Generator().manual_seed(7)
    B, T, V = 2, 150, 5
    student, teacher = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, ::7] = -100
    kw = dict(student_generated=torch.tensor([True, False]), alpha=torch.tensor([0.4, 0.8]),
              estimator=estimator, gamma=0.95, length_normalize=True, reduction="none")
    _check_case((student, labels, teacher, kw, torch.tensor([1.0, 3.0])))


# The rao_blackwell estimator (and the leave-one-out baseline) drawn on their own, so that the budget
# of examples above stays on the three sampled-token estimators.
@settings(max_examples=40, suppress_health_check=SUPPRESSED)
@given(case=askd_cases(estimators=("rao_blackwell",)))
def test_parity_rao_blackwell_torch_path(monkeypatch, case):
    from askd_kernels import _torch_math

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 97)
    _check_case(case)


@settings(max_examples=15, suppress_health_check=SUPPRESSED)
@given(case=askd_cases(estimators=("rao_blackwell",)))
def test_parity_rao_blackwell_triton_kernels(monkeypatch, case):
    use_triton_on_cpu(monkeypatch)
    _check_case(case)
