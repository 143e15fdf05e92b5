"""The bytes each op's Triton kernels move, counted under the interpreter (``bench/traffic.py``), equal
the design — and regressions fail here.

Per logit element of bf16 (2-byte) logits, with V_s = V_t = V and no ignored position:

    op                                  forward (loads)              backward (loads + stores)
    askd_loss, sampled-token estimators student 2 + teacher 2        student 2 + gradient 2
    askd_loss, teacher_logprobs         student 2                    student 2 + gradient 2
    askd_loss, rao_blackwell            (student 2 + teacher 2) × 2  student 2 + teacher 2 + gradient 2
    divergence_loss, every kind         (student 2 + teacher 2) × 2  student 2 + teacher 2 + gradient 2

plus, for askd_loss's forward, one label logit per row and model (2 bytes per row each). So the
rao_blackwell estimator moves the same bytes per element as the divergence kernels it generalises
(14 per logit pair, fwd + bwd). Ignored positions are read by no kernel (the gradient kernels still
write their zero rows). The per-token fp32 vectors are not logits and are not counted here.
"""
import pytest
import torch
from _backends import use_triton_on_cpu
from _inputs import problem

import askd_kernels as ak
from bench.traffic import count_traffic

B, T, V = 2, 5, 100     # V not a multiple of the (lowered) block: masked tails must count nothing
E = 2                   # bytes per bf16 element


def _traffic(call, student, teacher):
    """``(forward, backward)`` Traffic of ``call(leaf)`` with the student as a fresh leaf."""
    leaf = student.clone().requires_grad_()
    with count_traffic() as forward:
        loss = call(leaf)
    with count_traffic() as backward:
        loss.backward()
    return leaf, forward, backward


@pytest.fixture
def kernels(monkeypatch):
    use_triton_on_cpu(monkeypatch)  # MAX_BLOCK = 32: four blocks per row, the last one masked


def _inputs(ignored=()):
    student, teacher, labels = problem(0, B, T, V, dtype=torch.bfloat16, ignore=ignored)
    return student, teacher, labels, B * T - len(ignored)


@pytest.mark.parametrize("estimator", ["exact", "paper", "sequence", "rao_blackwell"])
@pytest.mark.parametrize("ignored", [(), ((0, 1), (1, 4))], ids=["all-valid", "two-ignored"])
def test_askd_bytes_per_element(kernels, estimator, ignored):
    student, teacher, labels, rows = _inputs(ignored)
    sgo = torch.tensor([True, False])
    leaf, fwd, bwd = _traffic(lambda z: ak.askd_loss(z, labels, teacher, student_generated=sgo, alpha=0.4,
                                                     estimator=estimator), student, teacher)
    passes = 2 if estimator == "rao_blackwell" else 1
    assert fwd.loaded(leaf) == passes * rows * V * E + rows * E
    assert fwd.loaded(teacher) == passes * rows * V * E + rows * E
    assert fwd.stored(leaf) == fwd.stored(teacher) == 0
    assert bwd.loaded(leaf) == rows * V * E
    assert bwd.loaded(teacher) == (rows * V * E if estimator == "rao_blackwell" else 0)
    assert bwd.stored(leaf.grad) == B * T * V * E  # every row written, zero rows without reading


def test_askd_teacher_logprobs_reads_only_the_student(kernels):
    student, teacher, labels, rows = _inputs()
    tlp = torch.log_softmax(teacher.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    leaf, fwd, bwd = _traffic(lambda z: ak.askd_loss(z, labels, teacher_logprobs=tlp, student_generated=True,
                                                     alpha=0.4), student, teacher)
    assert fwd.loaded(leaf) == rows * V * E + rows * E
    assert fwd.loaded(teacher) == 0
    assert bwd.loaded(leaf) == rows * V * E and bwd.stored(leaf.grad) == B * T * V * E


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"])
def test_divergence_bytes_per_element(kernels, kind):
    student, teacher, labels, rows = _inputs(((1, 2),))
    leaf, fwd, bwd = _traffic(lambda z: ak.divergence_loss(z, teacher, labels, kind=kind, alpha=0.3), student,
                              teacher)
    assert fwd.loaded(leaf) == fwd.loaded(teacher) == 2 * rows * V * E
    assert bwd.loaded(leaf) == bwd.loaded(teacher) == rows * V * E
    assert bwd.stored(leaf.grad) == B * T * V * E


def test_rao_blackwell_moves_no_more_than_jsd(kernels):
    """The fused forward + backward of rao_blackwell moves at most the jsd kernels' bytes, apart from
    the two label logits per row (4 bytes a row: 3e-5 bytes per element at V = 151936)."""
    student, teacher, labels, rows = _inputs()

    def total(call):
        leaf, fwd, bwd = _traffic(call, student, teacher)
        return sum(t.loaded(leaf) + t.loaded(teacher) for t in (fwd, bwd)) + bwd.stored(leaf.grad)

    rb = total(lambda z: ak.askd_loss(z, labels, teacher, student_generated=torch.tensor([True, False]),
                                      alpha=0.4, estimator="rao_blackwell"))
    jsd = total(lambda z: ak.divergence_loss(z, teacher, labels, kind="jsd"))
    assert rb - 2 * rows * E <= jsd
