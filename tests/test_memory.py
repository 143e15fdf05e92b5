"""The CPU path's peak extra memory is bounded by one chunk of rows × vocab, not tokens × vocab.

Measured, not estimated: every allocation and free of the CPU allocator during the call, read from
the profiler's event tree (``bench.measure.cpu_allocations``), summed in time order.
"""
import pytest
import torch

import askd_kernels as ak
from askd_kernels import _torch_math
from bench.measure import cpu_allocations

V = 1024
CHUNK = 1 << 15  # 32 rows of 1024 fp32 columns = 128 KiB per temporary


def _forward_peak(n_tokens, monkeypatch, teacher_logprobs=False):
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", CHUNK)
    g = torch.Generator().manual_seed(0)
    B, T = 4, n_tokens // 4
    student = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    teacher = {"teacher_logprobs": torch.randn(B, T, generator=g) - 5} if teacher_logprobs else \
        {"teacher_logits": torch.randn(B, T, V, generator=g)}
    kw = dict(student_generated=torch.tensor([True, False, True, False]), alpha=0.5, **teacher)
    ak.askd_loss(student, labels, **kw).backward()  # warm-up: first-call allocations of torch itself
    student.grad = None
    loss, peak, _ = cpu_allocations(lambda: ak.askd_loss(student, labels, **kw))
    if peak is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    _, bwd_peak, _ = cpu_allocations(loss.backward)
    return peak, bwd_peak


@pytest.mark.parametrize("teacher_logprobs", [False, True])
def test_forward_peak_is_one_chunk_not_tokens_by_vocab(monkeypatch, teacher_logprobs):
    small, _ = _forward_peak(512, monkeypatch, teacher_logprobs)
    large, _ = _forward_peak(4096, monkeypatch, teacher_logprobs)
    chunk_bytes = CHUNK * 4
    full_bytes = 4096 * V * 4  # one fp32 tokens × vocab tensor: what an unchunked path would hold
    # A handful of chunk temporaries (rows, fp32 copy, exp for the log-sum-exp, teacher's) plus
    # O(tokens) vectors (log q, ℓ, lse, λ, coef, index lists: well under 64 bytes per token).
    assert large <= 6 * chunk_bytes + 64 * 4096, (large, chunk_bytes)
    assert large < full_bytes / 8
    # Growing the tokens 8× grows the peak only by the O(tokens) vectors.
    assert large - small <= 64 * (4096 - 512)


def test_backward_allocates_the_gradient_plus_one_chunk(monkeypatch):
    _, bwd = _forward_peak(4096, monkeypatch)
    grad_bytes = 4096 * V * 4
    assert grad_bytes <= bwd <= grad_bytes + 6 * CHUNK * 4 + 64 * 4096, (bwd, grad_bytes)


# ---- divergence_loss: at most three chunk-sized temporaries per pass ------------------------------
DIV_KINDS = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
DIV_CHUNK = 1 << 16  # 64 rows of 1024 fp32 columns = 256 KiB per chunk-sized temporary
DIV_TOKENS = 256     # 4 chunks: one fp32 tokens × vocab tensor alone would exceed the bound


def _divergence_peaks(kind, monkeypatch, *, dtype, holes):
    """(forward peak, backward peak − the gradient) in bytes of one divergence_loss step on the CPU
    path. ``holes`` ignores a third of the positions, so chunks gather rows by index (and, for a
    low-precision dtype, convert them) instead of taking views."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", DIV_CHUNK)
    g = torch.Generator().manual_seed(1)
    B, T = 4, DIV_TOKENS // 4
    student = torch.randn(B, T, V, generator=g).to(dtype).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if holes:
        labels[:, ::3] = -100
    kw = dict(kind=kind, alpha=torch.tensor([0.3, 0.7, 0.5, 0.9]), beta=0.4)
    ak.divergence_loss(student, teacher, labels, **kw).backward()  # warm-up
    student.grad = None
    loss, fwd, _ = cpu_allocations(lambda: ak.divergence_loss(student, teacher, labels, **kw))
    if fwd is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    _, bwd, _ = cpu_allocations(loss.backward)
    return fwd, bwd - student.numel() * student.element_size()


@pytest.mark.parametrize("dtype, holes", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-views", "bf16-gathered"])
@pytest.mark.parametrize("kind", DIV_KINDS)
def test_divergence_holds_at_most_three_chunks_per_pass(monkeypatch, kind, dtype, holes):
    """The forward's peak, and the backward's beyond the gradient it returns, are at most three
    chunk-sized fp32 temporaries (log q, log p, and divergence_terms' working memory on slices of a
    chunk) plus O(tokens) vectors: value, S and the two (max, log-sum) pairs (24 bytes per token),
    the list of active rows (8) and masks (measured in all: 32 bytes per token; 48 allowed).
    Before the in-place rewrite the forward held 9–13 chunk-sized temporaries."""
    fwd, bwd = _divergence_peaks(kind, monkeypatch, dtype=dtype, holes=holes)
    bound = 3 * DIV_CHUNK * 4 + 48 * DIV_TOKENS
    assert fwd <= bound, (fwd / (DIV_CHUNK * 4), "chunks")
    assert bwd <= bound, (bwd / (DIV_CHUNK * 4), "chunks")
