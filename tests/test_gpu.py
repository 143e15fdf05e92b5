"""Real-GPU checks of the Triton kernels (skipped without CUDA; run them whenever a GPU is lent).

On CPU the kernels are checked under the interpreter and compiled ahead of time; these tests run the
compiled kernels at production shapes: a Qwen2-sized vocabulary (V_s = 151936, V_t = 152064), a
32768-token sequence, tokens × vocab beyond 2^31 elements, the forward memory budget, and
``torch.compile`` with inductor.
"""
import pytest
import torch
from _compare import assert_no_worse
from _inputs import problem

import askd_kernels as ak
from reference import askd_loss_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _inputs(B, T, V_s, V_t, dtype, seed=0):
    student, teacher, labels = problem(seed, B, T, V_s, V_t, dtype=dtype, scale=2.0,
                                       ignore=[(slice(None), slice(0, 3))], device=CUDA)
    g = torch.Generator(device=CUDA).manual_seed(seed + 1)
    sgo = torch.arange(B, device=CUDA) % 2 == 0
    alpha = torch.rand(B, device=CUDA, generator=g)
    return student, teacher, labels, sgo, alpha


def _run(fn, student, labels, teacher, leaf_dtype, **kw):
    leaf = student.detach().to(leaf_dtype).requires_grad_()
    loss, stats = fn(leaf, labels, teacher, **kw)
    (loss * 1.5).sum().backward()
    return loss.detach(), stats, leaf.grad


@pytest.mark.parametrize("estimator", ["exact", "paper", "sequence"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_parity_qwen2_vocabulary(estimator, dtype):
    student, teacher, labels, sgo, alpha = _inputs(2, 48, 151936, 152064, dtype)
    kw = dict(student_generated=sgo, alpha=alpha, estimator=estimator, gamma=0.99, temperature=0.9,
              clip=torch.tensor([True, False], device=CUDA))
    ours = _run(lambda *a, **k: ak.askd_loss(*a, **k, return_stats=True), student, labels, teacher, dtype, **kw)
    truth = _run(askd_loss_ref, student, labels, teacher, torch.float64, **kw)
    naive = _run(lambda *a, **k: askd_loss_ref(*a, **k, dtype=dtype), student, labels, teacher, dtype, **kw)
    assert_no_worse("loss", ours[0], truth[0], naive[0])
    for key in ("log_q", "log_ratio", "lam", "coef"):
        assert_no_worse(key, ours[1][key], truth[1][key], naive[1][key])
    assert_no_worse("grad", ours[2], truth[2], naive[2], stored_dtype=dtype)


def test_sequence_of_32768_tokens_matches_torch_path(monkeypatch):
    student, teacher, labels, sgo, alpha = _inputs(2, 32768, 64, 64, torch.float32)
    kw = dict(student_generated=sgo, alpha=alpha, gamma=0.999, length_normalize=True, reduction="none",
              return_stats=True)
    out = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("ASKD_KERNELS_BACKEND", backend)
        out[backend] = ak.askd_loss(student, labels, teacher, **kw)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["triton"][1]["coef"], out["torch"][1]["coef"], rtol=1e-4, atol=1e-3)


def test_tokens_times_vocab_beyond_int32(monkeypatch):
    """16384 × 151936 bf16 logits = 2.49e9 elements: row offsets past 2^31 must not wrap."""
    B, T, V = 1, 16384, 151936
    assert B * T * V > 2**31
    student, teacher, labels, sgo, alpha = _inputs(B, T, V, V, torch.bfloat16)
    student.requires_grad_()
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "triton")
    loss, stats = ak.askd_loss(student, labels, teacher, student_generated=sgo, alpha=alpha, return_stats=True)
    loss.backward()
    tail = slice(T - 64, T)  # rows that start beyond 2^31 elements
    ref_loss, ref_stats = askd_loss_ref(student[:, tail].detach(), labels[:, tail], teacher[:, tail],
                                        student_generated=sgo, alpha=alpha, reduction="sum")
    torch.testing.assert_close(stats["log_q"][:, tail].double(), ref_stats["log_q"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats["log_ratio"][:, tail].double(), ref_stats["log_ratio"], rtol=1e-5, atol=1e-4)
    assert torch.isfinite(student.grad[:, tail]).all()
    assert student.grad[:, tail].abs().sum() > 0


def test_forward_extra_memory_per_token():
    """Forward allocates only O(tokens) (the design: ≤ 64 bytes per token)."""
    B, T, V = 8, 2048, 151936
    student, teacher, labels, sgo, alpha = _inputs(B, T, V, V, torch.bfloat16)
    student.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ak.askd_loss(student, labels, teacher, student_generated=sgo, alpha=alpha)
    torch.cuda.synchronize()
    per_token = (torch.cuda.max_memory_allocated() - base) / (B * T)
    assert per_token <= 64, f"forward extra memory {per_token:.1f} B/token"
    loss.backward()
    assert student.grad.dtype == torch.bfloat16


def test_torch_compile_inductor_training_step():
    torch.manual_seed(0)
    B, T, H, V = 2, 16, 32, 1000
    head = torch.nn.Linear(H, V, device=CUDA)
    hidden = torch.randn(B, T, H, device=CUDA)
    teacher = torch.randn(B, T, V, device=CUDA)
    labels = torch.randint(0, V, (B, T), device=CUDA)
    sgo = torch.tensor([True, False], device=CUDA)

    def loss_fn(h):  # the forward of a training step; AOTAutograd traces its backward too
        return ak.askd_loss(head(h), labels, teacher, student_generated=sgo, alpha=0.3)

    eager = loss_fn(hidden)
    eager.backward()
    grad_eager = head.weight.grad.clone()
    head.weight.grad = None
    compiled = torch.compile(loss_fn, fullgraph=True)(hidden)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(head.weight.grad, grad_eager, rtol=1e-4, atol=1e-5)
