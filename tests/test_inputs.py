"""Bad input to ``askd_loss`` fails with a ``TypeError`` / ``ValueError`` that names the argument,
before any kernel runs (``askd_kernels/_checks.py``; docs/contract.md §7).

Every stage implementation of both backends (row stats, coefficients, gradient) is replaced by a
sentinel (the ``no_kernels`` fixture of conftest.py) that fails the test if it is ever called, so a
check that runs too late — or not at all, letting a kernel see the bad input — is caught.
``test_sentinel_trips_on_valid_input`` shows the sentinel is live.
"""
import re

import pytest
import torch

import askd_kernels as ak
from _backends import KernelRan

B, T, V = 2, 3, 7
DROP = object()  # an override value that removes the keyword


def _base():
    g = torch.Generator().manual_seed(0)
    return dict(
        student_logits=torch.randn(B, T, V, generator=g).requires_grad_(),
        labels=torch.randint(0, V, (B, T), generator=g),
        teacher_logits=torch.randn(B, T, V, generator=g),
        student_generated=torch.tensor([True, False]),
        alpha=0.5,
    )


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# (id, overrides built from the base kwargs, exception, argument name that must be in the message)
CASES = [
    # student_logits
    ("logits-2d", lambda b: {"student_logits": b["student_logits"][0]}, ValueError, "student_logits"),
    ("logits-4d", lambda b: {"student_logits": b["student_logits"][None]}, ValueError, "student_logits"),
    ("logits-int", lambda b: {"student_logits": torch.zeros(B, T, V, dtype=torch.int64)}, TypeError, "student_logits"),
    ("logits-bool", lambda b: {"student_logits": torch.zeros(B, T, V, dtype=torch.bool)}, TypeError, "student_logits"),
    ("logits-float64", lambda b: {"student_logits": b["student_logits"].double()}, TypeError, "student_logits"),
    ("logits-not-tensor", lambda b: {"student_logits": b["student_logits"].tolist()}, TypeError, "student_logits"),
    ("logits-empty-vocab", lambda b: {"student_logits": torch.zeros(B, T, 0)}, ValueError, "student_logits"),
    # labels
    ("labels-1d", lambda b: {"labels": b["labels"].view(-1)}, ValueError, "labels"),
    ("labels-B-mismatch", lambda b: {"labels": b["labels"][:1]}, ValueError, "labels"),
    ("labels-T-mismatch", lambda b: {"labels": b["labels"][:, :2]}, ValueError, "labels"),
    ("labels-float", lambda b: {"labels": b["labels"].float()}, TypeError, "labels"),
    ("labels-bool", lambda b: {"labels": b["labels"] > 2}, TypeError, "labels"),
    ("labels-not-tensor", lambda b: {"labels": b["labels"].tolist()}, TypeError, "labels"),
    ("labels-ge-vocab", lambda b: {"labels": b["labels"].index_fill(1, torch.tensor([1]), V)}, ValueError, "labels"),
    ("labels-negative", lambda b: {"labels": b["labels"].index_fill(1, torch.tensor([0]), -1)}, ValueError, "labels"),
    # teacher_logits / teacher_logprobs
    ("teacher-B-mismatch", lambda b: {"teacher_logits": b["teacher_logits"][:1]}, ValueError, "teacher_logits"),
    ("teacher-T-mismatch", lambda b: {"teacher_logits": b["teacher_logits"][:, :1]}, ValueError, "teacher_logits"),
    ("teacher-2d", lambda b: {"teacher_logits": b["teacher_logits"][0]}, ValueError, "teacher_logits"),
    ("teacher-empty-vocab", lambda b: {"teacher_logits": torch.zeros(B, T, 0)}, ValueError, "teacher_logits"),
    ("teacher-int", lambda b: {"teacher_logits": torch.zeros(B, T, V, dtype=torch.int32)}, TypeError, "teacher_logits"),
    ("teacher-float64", lambda b: {"teacher_logits": b["teacher_logits"].double()}, TypeError, "teacher_logits"),
    ("logprobs-shape", lambda b: {"teacher_logits": None, "teacher_logprobs": torch.zeros(B, T + 1)},
     ValueError, "teacher_logprobs"),
    ("logprobs-3d", lambda b: {"teacher_logits": None, "teacher_logprobs": torch.zeros(B, T, 1)},
     ValueError, "teacher_logprobs"),
    ("logprobs-int", lambda b: {"teacher_logits": None, "teacher_logprobs": torch.zeros(B, T, dtype=torch.long)},
     TypeError, "teacher_logprobs"),
    ("both-teachers", lambda b: {"teacher_logprobs": torch.zeros(B, T)}, ValueError, "teacher_logprobs"),
    ("neither-teacher", lambda b: {"teacher_logits": None}, ValueError, "teacher_logprobs"),
    # old_logprobs
    ("old-logprobs-shape", lambda b: {"old_logprobs": torch.zeros(B, T - 1)}, ValueError, "old_logprobs"),
    ("old-logprobs-int", lambda b: {"old_logprobs": torch.zeros(B, T, dtype=torch.long)}, TypeError, "old_logprobs"),
    # devices: a second device is "meta"
    ("labels-on-meta", lambda b: {"labels": _meta(B, T, dtype=torch.long)}, ValueError, "labels"),
    ("teacher-on-meta", lambda b: {"teacher_logits": _meta(B, T, V)}, ValueError, "teacher_logits"),
    ("logprobs-on-meta", lambda b: {"teacher_logits": None, "teacher_logprobs": _meta(B, T)},
     ValueError, "teacher_logprobs"),
    ("old-logprobs-on-meta", lambda b: {"old_logprobs": _meta(B, T)}, ValueError, "old_logprobs"),
    ("clip-on-meta", lambda b: {"clip": _meta(B, dtype=torch.bool)}, ValueError, "clip"),
    ("alpha-on-meta", lambda b: {"alpha": _meta(B)}, ValueError, "alpha"),
    ("sgo-on-meta", lambda b: {"student_generated": _meta(B, dtype=torch.bool)}, ValueError, "student_generated"),
    ("num-items-on-meta", lambda b: {"num_items": _meta(())}, ValueError, "num_items"),
    ("student-on-meta", lambda b: {"student_logits": _meta(B, T, V)}, ValueError, "labels"),
    # alpha
    ("alpha-negative", lambda b: {"alpha": -0.01}, ValueError, "alpha"),
    ("alpha-above-one", lambda b: {"alpha": 1.01}, ValueError, "alpha"),
    ("alpha-nan", lambda b: {"alpha": float("nan")}, ValueError, "alpha"),
    ("alpha-inf", lambda b: {"alpha": float("inf")}, ValueError, "alpha"),
    ("alpha-bool", lambda b: {"alpha": True}, TypeError, "alpha"),
    ("alpha-str", lambda b: {"alpha": "0.5"}, TypeError, "alpha"),
    ("alpha-tensor-negative", lambda b: {"alpha": torch.tensor([0.5, -0.1])}, ValueError, "alpha"),
    ("alpha-tensor-above-one", lambda b: {"alpha": torch.tensor([1.5, 0.5])}, ValueError, "alpha"),
    ("alpha-tensor-nan", lambda b: {"alpha": torch.tensor([0.5, float("nan")])}, ValueError, "alpha"),
    ("alpha-tensor-shape", lambda b: {"alpha": torch.tensor([0.5, 0.5, 0.5])}, ValueError, "alpha"),
    ("alpha-tensor-2d", lambda b: {"alpha": torch.full((B, 1), 0.5)}, ValueError, "alpha"),
    ("alpha-tensor-int", lambda b: {"alpha": torch.tensor([0, 1])}, TypeError, "alpha"),
    ("alpha-missing", lambda b: {"alpha": DROP}, TypeError, "alpha"),
    # student_generated / clip
    ("sgo-int", lambda b: {"student_generated": torch.tensor([1, 0])}, TypeError, "student_generated"),
    ("sgo-shape", lambda b: {"student_generated": torch.tensor([True, False, True])}, ValueError, "student_generated"),
    ("sgo-2d", lambda b: {"student_generated": torch.tensor([[True], [False]])}, ValueError, "student_generated"),
    ("sgo-python-int", lambda b: {"student_generated": 1}, TypeError, "student_generated"),
    ("sgo-missing", lambda b: {"student_generated": DROP}, TypeError, "student_generated"),
    ("clip-int", lambda b: {"clip": torch.tensor([1, 0])}, TypeError, "clip"),
    ("clip-float", lambda b: {"clip": torch.tensor([1.0, 0.0])}, TypeError, "clip"),
    ("clip-shape", lambda b: {"clip": torch.tensor([True])}, ValueError, "clip"),
    ("clip-2d", lambda b: {"clip": torch.tensor([[True, False]])}, ValueError, "clip"),
    ("clip-python-bool", lambda b: {"clip": True}, TypeError, "clip"),
    # options
    ("estimator-unknown", lambda b: {"estimator": "exakt"}, ValueError, "estimator"),
    ("reduction-unknown", lambda b: {"reduction": "avg"}, ValueError, "reduction"),
    ("temperature-zero", lambda b: {"temperature": 0.0}, ValueError, "temperature"),
    ("temperature-negative", lambda b: {"temperature": -1.0}, ValueError, "temperature"),
    ("temperature-inf", lambda b: {"temperature": float("inf")}, ValueError, "temperature"),
    ("temperature-nan", lambda b: {"temperature": float("nan")}, ValueError, "temperature"),
    ("temperature-str", lambda b: {"temperature": "1"}, TypeError, "temperature"),
    ("gamma-zero", lambda b: {"gamma": 0.0}, ValueError, "gamma"),
    ("gamma-negative", lambda b: {"gamma": -0.5}, ValueError, "gamma"),
    ("gamma-above-one", lambda b: {"gamma": 1.0001}, ValueError, "gamma"),
    ("gamma-nan", lambda b: {"gamma": float("nan")}, ValueError, "gamma"),
    ("is-max-zero", lambda b: {"is_max": 0.0}, ValueError, "is_max"),
    ("is-max-negative", lambda b: {"is_max": -2.0}, ValueError, "is_max"),
    ("is-max-nan", lambda b: {"is_max": float("nan")}, ValueError, "is_max"),
    ("num-items-zero", lambda b: {"num_items": 0}, ValueError, "num_items"),
    ("num-items-negative", lambda b: {"num_items": -3.0}, ValueError, "num_items"),
    ("num-items-nan", lambda b: {"num_items": float("nan")}, ValueError, "num_items"),
    ("num-items-tensor-shape", lambda b: {"num_items": torch.tensor([3.0, 4.0])}, ValueError, "num_items"),
    ("num-items-inf", lambda b: {"num_items": float("inf")}, ValueError, "num_items"),
    ("num-items-tensor-zero", lambda b: {"num_items": torch.tensor(0.0)}, ValueError, "num_items"),
    ("num-items-tensor-negative", lambda b: {"num_items": torch.tensor(-4)}, ValueError, "num_items"),
    ("num-items-tensor-nan", lambda b: {"num_items": torch.tensor(float("nan"))}, ValueError, "num_items"),
    ("num-items-tensor-inf", lambda b: {"num_items": torch.tensor([float("inf")])}, ValueError, "num_items"),
    ("num-items-tensor-bool", lambda b: {"num_items": torch.tensor(True)}, TypeError, "num_items"),
    ("is-max-str", lambda b: {"is_max": "2"}, TypeError, "is_max"),
    ("num-items-bool", lambda b: {"num_items": True}, TypeError, "num_items"),
    ("alpha-tensor-0d-above-one", lambda b: {"alpha": torch.tensor(1.5)}, ValueError, "alpha"),
    ("alpha-tensor-0d-int", lambda b: {"alpha": torch.tensor(1)}, TypeError, "alpha"),
    # 0-d tensors where a number is: checked as the number they hold
    ("gamma-tensor-0d-zero", lambda b: {"gamma": torch.tensor(0.0)}, ValueError, "gamma"),
    ("gamma-tensor-1d", lambda b: {"gamma": torch.tensor([0.9])}, ValueError, "gamma"),
    ("gamma-tensor-bool", lambda b: {"gamma": torch.tensor(True)}, TypeError, "gamma"),
    ("temperature-tensor-0d-negative", lambda b: {"temperature": torch.tensor(-1.0)}, ValueError, "temperature"),
    ("is-max-tensor-0d-zero", lambda b: {"is_max": torch.tensor(0.0)}, ValueError, "is_max"),
    ("ignore-index-tensor-float", lambda b: {"ignore_index": torch.tensor(-100.0)}, TypeError, "ignore_index"),
    ("ignore-index-tensor-1d", lambda b: {"ignore_index": torch.tensor([-100])}, ValueError, "ignore_index"),
    ("sgo-tensor-0d-int", lambda b: {"student_generated": torch.tensor(1)}, TypeError, "student_generated"),
    # the argument order of the other family: the error says so
    ("labels-and-teacher-swapped", lambda b: {"labels": b["teacher_logits"], "teacher_logits": b["labels"]},
     TypeError, "swapped"),
    ("logprobs-float64", lambda b: {"teacher_logits": None, "teacher_logprobs": torch.zeros(B, T, dtype=torch.float64)},
     TypeError, "teacher_logprobs"),
    ("ignore-index-bool", lambda b: {"ignore_index": False}, TypeError, "ignore_index"),
    ("ignore-index-float", lambda b: {"ignore_index": -100.0}, TypeError, "ignore_index"),
    ("ignore-index-2**70", lambda b: {"ignore_index": 2**70}, ValueError, "ignore_index"),
    ("ignore-index-2**63", lambda b: {"ignore_index": 2**63}, ValueError, "ignore_index"),
    ("ignore-index-below-int64", lambda b: {"ignore_index": -(2**63) - 1}, ValueError, "ignore_index"),
    ("length-normalize-int", lambda b: {"length_normalize": 1}, TypeError, "length_normalize"),
]


def _kwargs(make_overrides):
    kwargs = _base()
    for key, value in make_overrides(kwargs).items():
        if value is DROP:
            del kwargs[key]
        else:
            kwargs[key] = value
    return kwargs


@pytest.mark.parametrize("make_overrides, exc, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_before_any_kernel(no_kernels, make_overrides, exc, name):
    kwargs = _kwargs(make_overrides)
    with pytest.raises(exc, match=rf"\b{re.escape(name)}\b") as info:
        ak.askd_loss(**kwargs)
    assert not isinstance(info.value, KernelRan)


def test_sentinel_trips_on_valid_input(no_kernels):
    """Without this, 'no kernel ran' above would be vacuous."""
    with pytest.raises(KernelRan):
        ak.askd_loss(**_base())


def test_bogus_backend_env_is_rejected_before_any_kernel(no_kernels, monkeypatch):
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"ASKD_KERNELS_BACKEND") as info:
        ak.askd_loss(**_base())
    assert not isinstance(info.value, KernelRan)


def test_boundary_values_are_accepted(backend):
    """The edges of every interval are valid: α ∈ {0, 1}, γ = 1, tiny τ, is_max tiny, num_items tiny,
    labels = V − 1 and ignore_index everywhere else, student_generated as a python bool."""
    kw = _base()
    kw["labels"] = torch.full((B, T), -100)
    kw["labels"][:, 0] = V - 1
    loss = ak.askd_loss(**{**kw, "alpha": torch.tensor([0.0, 1.0]), "gamma": 1.0, "temperature": 1e-3,
                           "is_max": 1e-6, "num_items": 1e-6, "student_generated": True})
    assert torch.isfinite(loss)
    loss = ak.askd_loss(**{**kw, "alpha": 1.0, "clip": torch.tensor([True, True])})
    assert torch.isfinite(loss)


# ---- 0-d tensors wherever a number is; the argument orders of the two families ----------------------

def test_zero_dim_tensors_are_the_numbers_they_hold(backend):
    """Every number option of every public function takes a 0-d tensor and gives the result of the
    python number it holds, bit for bit (value and gradient). (The number it holds: ``torch.tensor(0.3)``
    is fp32, so its number is 0.30000001192…, compared with that.)"""
    kw = _base()
    numbers = dict(alpha=0.3, gamma=0.9, temperature=1.5, is_max=2.0, num_items=5, ignore_index=-100)

    def run(fn, **given):
        leaf = kw["student_logits"].detach().clone().requires_grad_()
        loss = fn(leaf, **given)
        loss.backward()
        return loss.detach(), leaf.grad

    def tensors(d):
        return {k: torch.tensor(v) for k, v in d.items()}

    def askd(x, **o):
        return ak.askd_loss(x, kw["labels"], kw["teacher_logits"], student_generated=kw["student_generated"],
                            estimator="exact", **o)

    def div(x, **o):
        return ak.divergence_loss(x, kw["teacher_logits"], kw["labels"], **o)
    cases = [(askd, numbers),
             (lambda x, **o: askd(x, **o, old_logprobs=torch.zeros(B, T)), dict(numbers)),
             (div, dict(kind="jsd", beta=0.3, temperature=2.0, num_items=4, ignore_index=-100)),
             (div, dict(kind="skl", alpha=0.3, temperature=2.0))]
    for fn, options in cases:
        plain = run(fn, **{k: v if k == "kind" else torch.tensor(v).item() for k, v in options.items()})
        as_tensors = run(fn, **{k: v for k, v in options.items() if k == "kind"},
                         **tensors({k: v for k, v in options.items() if k != "kind"}))
        assert torch.equal(plain[0], as_tensors[0]) and torch.equal(plain[1], as_tensors[1]), options
    # a 0-d bool tensor is the python bool for the flag
    assert torch.equal(ak.askd_loss(kw["student_logits"], kw["labels"], kw["teacher_logits"], alpha=0.5,
                                    student_generated=torch.tensor(True)),
                       ak.askd_loss(kw["student_logits"], kw["labels"], kw["teacher_logits"], alpha=0.5,
                                    student_generated=True))


def test_zero_dim_tensors_in_the_hidden_state_functions_and_skew(backend):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(B, T, 4, generator=g), torch.randn(V, 4, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    assert torch.equal(ak.token_logprobs(hidden, weight, labels, temperature=torch.tensor(0.5),
                                         ignore_index=torch.tensor(-1)),
                       ak.token_logprobs(hidden, weight, labels, temperature=0.5, ignore_index=-1))
    common = dict(teacher_logprobs=torch.zeros(B, T) - 1.0, student_generated=True)
    assert torch.equal(
        ak.askd_loss_from_hidden(hidden, weight, labels, alpha=torch.tensor(0.25), gamma=torch.tensor(0.5), **common),
        ak.askd_loss_from_hidden(hidden, weight, labels, alpha=0.25, gamma=0.5, **common))
    rewards = torch.tensor([1.0, 2.0, 0.5, 4.0])
    assert torch.equal(ak.skew_from_rewards(rewards, group_size=torch.tensor(2), beta=torch.tensor(0.7),
                                            eps=torch.tensor(1e-3)),
                       ak.skew_from_rewards(rewards, group_size=2, beta=0.7, eps=1e-3))


@pytest.mark.parametrize("call", ["askd_loss", "divergence_loss", "ASKDLoss"])
def test_swapped_labels_and_teacher_name_the_order(no_kernels, call):
    """askd_loss(student, labels, teacher) and divergence_loss(student, teacher, labels): called in the
    other family's order, the error says they look swapped and gives both orders."""
    kw = _base()
    student, labels, teacher = kw["student_logits"], kw["labels"], kw["teacher_logits"]
    calls = {
        "askd_loss": lambda: ak.askd_loss(student, teacher, labels, student_generated=True, alpha=0.5),
        "divergence_loss": lambda: ak.divergence_loss(student, labels, teacher, kind="fkl"),
        "ASKDLoss": lambda: ak.ASKDLoss(alpha=0.5, student_generated=True)(student, teacher, labels),
    }
    with pytest.raises(TypeError, match=r"labels .*teacher_logits.*look swapped.*askd_loss takes \(student_logits, "
                                        r"labels, teacher_logits\).*divergence_loss takes \(student_logits, "
                                        r"teacher_logits, labels\)") as info:
        calls[call]()
    assert not isinstance(info.value, KernelRan)
