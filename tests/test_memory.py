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
