"""The CPU path's peak extra memory is bounded by its block of rows × vocab, not tokens × vocab —
for every op: askd_loss, divergence_loss (every kind), askd_loss_from_hidden and token_logprobs.

Measured, not estimated: every allocation and free of the CPU allocator during the call, read from
the profiler's event tree (``bench.measure.cpu_allocations``), summed in time order. Under the
profiler the blocks run in the calling thread (``_torch_math.for_blocks``), so the count is
complete; with n worker threads the working memory is n sets of the block buffers measured here.
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
    # One reused fp32 block buffer (student and teacher take turns in it) and the block's small
    # vectors, plus O(tokens) vectors (log q, ℓ, lse, λ, coef, masks: well under 64 bytes per token).
    # Before the blocked rewrite: up to 6 chunk temporaries.
    assert large <= 2 * chunk_bytes + 64 * 4096, (large, chunk_bytes)
    assert large < full_bytes / 8
    # Growing the tokens 8× grows the peak only by the O(tokens) vectors.
    assert large - small <= 64 * (4096 - 512)


def test_backward_allocates_the_gradient_plus_one_chunk(monkeypatch):
    """fp32: the block is computed in the gradient's own rows, so nothing but the gradient and
    O(tokens) vectors (the row factors, label columns, the list of dead rows)."""
    _, bwd = _forward_peak(4096, monkeypatch)
    grad_bytes = 4096 * V * 4
    assert grad_bytes <= bwd <= grad_bytes + 64 * 4096, (bwd, grad_bytes)


def test_backward_bf16_adds_one_block_buffer(monkeypatch):
    """bf16: one reused fp32 block buffer besides the bf16 gradient, and O(tokens) vectors (row
    factors, label columns, masks, the dead rows' indices: measured ≈ 75 bytes per token)."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", CHUNK)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 1024, V, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(4, 1024, V, generator=g).bfloat16()
    labels = torch.randint(0, V, (4, 1024), generator=g)
    labels[:, :100] = -100  # ignored rows: skipped or zeroed in place, never gathered
    kw = dict(student_generated=torch.tensor([True, False, True, False]), alpha=0.5)
    loss = ak.askd_loss(student, labels, teacher, **kw)
    _, bwd, _ = cpu_allocations(loss.backward)
    if bwd is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    grad_bytes = student.numel() * 2
    assert grad_bytes <= bwd <= grad_bytes + CHUNK * 4 + 96 * 4096, ((bwd - grad_bytes) / (CHUNK * 4), "blocks")


# ---- divergence_loss: a bounded number of block-sized temporaries per pass --------------------------
DIV_KINDS = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
DIV_CHUNK = 1 << 14  # 16 rows of 1024 fp32 columns = 64 KiB per block-sized temporary
DIV_TOKENS = 512     # 32 blocks: one fp32 tokens × vocab tensor is 2.5× the bound


def _divergence_peaks(kind, monkeypatch, *, dtype, holes, tokens=DIV_TOKENS):
    """(forward peak, backward peak − the gradient) in bytes of one divergence_loss step on the CPU
    path. ``holes`` ignores a third of the positions, so chunks gather rows by index (and, for a
    low-precision dtype, convert them) instead of taking views."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", DIV_CHUNK)
    g = torch.Generator().manual_seed(1)
    B, T = 4, tokens // 4
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
def test_divergence_holds_a_few_blocks_per_pass(monkeypatch, kind, dtype, holes):
    """The forward's peak, and the backward's beyond the gradient it returns, are a bounded number of
    block-sized fp32 buffers — three to six per pass by kind (the in-place terms of
    ``_torch_math.DIVERGENCE_TERMS``), plus bool masks and the bf16 gathered rows; measured with the
    vectors: 2.3 (fkl backward) to 7.3 (jsd forward, bf16) blocks — independent of the number of
    tokens: 8 blocks here, where one fp32 tokens × vocab tensor is 32. Plus O(tokens) vectors:
    value, S and the two (max, log-sum) pairs, per-row log weights and masks (≤ 80 bytes per
    token). (Before the in-place terms the same cases measured 6.5 to 10.5 blocks.)"""
    fwd, bwd = _divergence_peaks(kind, monkeypatch, dtype=dtype, holes=holes)
    bound = 8 * DIV_CHUNK * 4 + 80 * DIV_TOKENS
    assert fwd <= bound, (fwd / (DIV_CHUNK * 4), "chunks")
    assert bwd <= bound, (bwd / (DIV_CHUNK * 4), "chunks")


@pytest.mark.parametrize("kind", ["fkl", "srkl"])
def test_divergence_peak_does_not_grow_with_tokens(monkeypatch, kind):
    """8× the tokens: the peak grows only by the O(tokens) vectors — it is bounded by the block."""
    peaks = [_divergence_peaks(kind, monkeypatch, dtype=torch.bfloat16, holes=True, tokens=n) for n in (256, 2048)]
    (small_fwd, small_bwd), (large_fwd, large_bwd) = peaks
    assert large_fwd - small_fwd <= 80 * (2048 - 256), (small_fwd, large_fwd)
    assert large_bwd - small_bwd <= 80 * (2048 - 256), (small_bwd, large_bwd)


# ---- askd_loss_from_hidden and token_logprobs: one chunk of logits plus the stages' blocks --------
H_MEM, ROWS_MEM = 64, 32


def _hidden_peaks(n_tokens, monkeypatch, fn):
    from askd_kernels.askd import fused_linear

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", CHUNK)
    monkeypatch.setattr(fused_linear, "LOGITS_CHUNK_ELEMENTS", ROWS_MEM * V)
    g = torch.Generator().manual_seed(0)
    B, T = 4, n_tokens // 4
    hidden = torch.randn(B, T, H_MEM, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H_MEM, generator=g) / 8).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :T // 8] = -100
    fn(hidden, weight, labels).backward()  # warm-up
    hidden.grad = weight.grad = None
    out, fwd, _ = cpu_allocations(lambda: fn(hidden, weight, labels))
    if fwd is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    _, bwd, _ = cpu_allocations(out.backward)
    # the gradients (and grad_weight's fp32 accumulator) are outputs, not working memory
    return fwd, bwd - (n_tokens * H_MEM * 2 + V * H_MEM * (4 + 2))


def _from_hidden(hidden, weight, labels):
    with torch.no_grad():
        teacher_logprobs = ak.token_logprobs(hidden.detach(), weight.detach(), labels)
    return ak.askd_loss_from_hidden(hidden, weight, labels, teacher_logprobs=teacher_logprobs - 0.1,
                                    student_generated=torch.tensor([True, False, True, False]), alpha=0.5)


def _token_logprobs(hidden, weight, labels):
    return ak.token_logprobs(hidden, weight, labels).sum()


@pytest.mark.parametrize("fn", [_from_hidden, _token_logprobs], ids=["askd_loss_from_hidden", "token_logprobs"])
def test_from_hidden_peak_is_one_chunk_of_logits(monkeypatch, fn):
    """Forward and backward: one chunk of logits in bf16 with its fp32 block work, the backward's
    gradient rows and their fp32 copies for the weight's GEMM (CPU has no mixed-precision GEMM) —
    a few chunks of ROWS_MEM × V — and 8× the tokens grows only the O(tokens) vectors."""
    small = _hidden_peaks(512, monkeypatch, fn)
    large = _hidden_peaks(4096, monkeypatch, fn)
    chunk_fp32 = ROWS_MEM * V * 4
    for low, high in zip(small, large):
        assert high <= 4 * chunk_fp32 + 2 * CHUNK * 4 + 64 * 4096, (high / chunk_fp32, "chunks")
        assert high < 4096 * V * 4 / 8  # far from one fp32 tokens × vocab tensor
        assert high - low <= 64 * (4096 - 512), (low, high)
