"""``askd_loss_from_hidden`` and ``token_logprobs`` (``askd_kernels.askd.fused_linear``): ASKD and per-token
log-probs from hidden states and the lm_head weight, in chunks of rows, never tokens × vocab logits.

* parity with the fp64 oracle — ``reference.askd_loss_ref`` and ``log_softmax`` in fp64 — for the
  value, the stats and the gradients w.r.t. hidden, weight and bias, under the rule of
  ``_compare.py``: no worse than the same straightforward computation in the inputs' dtype
  (``F.linear`` then the reference in that dtype), plus its slack. The oracle is applied to the
  logits *as the inputs' dtype stores them* (one GEMM with fp32 accumulation, rounded once: what
  ``F.linear`` returns; in bf16/fp16 bit for bit what our chunks hold), and its fp64 gradient w.r.t.
  those logits is carried to hidden, weight and bias in fp64. Why: that rounding is part of the contract
  (materialised logits are rounded identically) and the naive baseline shares it, but it moves
  log q_t by up to 2·max|δz|/τ with |δz| ≤ eps/2·|z| (≈ 1e-2 in bf16), which the naive's own
  low-precision errors can partly cancel (seen before this choice: bf16 loss 7.5e-3 off the exact
  product for ours, 3.4e-3 for the naive). Conditioning the oracle on the stored logits is the slack
  that rounding needs, measured instead of bounded; everything after the GEMM is then compared as
  in the core op's tests;
* the same value, stats and gradients as ``askd_loss`` on the materialised logits;
* ``torch.compile(fullgraph=True)`` through the custom ops; the peak memory measured on CPU, bounded
  by a chunk and independent of the number of tokens; bad inputs rejected before any kernel.

Both backends run (the ``backend`` fixture), always with chunks of a few rows so that several
chunks, and chunks straddling two sequences, are exercised.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from _backends import use_triton_on_cpu
from _compare import assert_no_worse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from _backends import KernelRan

import askd_kernels as ak
from askd_kernels import _torch_math
from askd_kernels.askd import fused_linear
from reference import askd_loss_ref

H, V, H_TEACHER = 13, 37, 7   # odd sizes: V is not a multiple of any block
CHUNK = 5                     # rows per chunk in the tests (11-token sequences: chunks straddle them)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(fused_linear, "LOGITS_CHUNK_ELEMENTS", CHUNK * V)


def _teacher_logprobs(labels, dtype, g, vocab):
    """The teacher's log p(labels) from its own head (hidden size H_TEACHER), as a caller would."""
    B, T = labels.shape
    hidden = torch.randn(B, T, H_TEACHER, generator=g).to(dtype)
    weight = (torch.randn(vocab, H_TEACHER, generator=g) / 2).to(dtype)
    with torch.no_grad():
        return ak.token_logprobs(hidden, weight, labels, lm_head_bias=torch.randn(vocab, generator=g).to(dtype))


def _case(seed, dtype, *, bias=True, strided=False, B=2, T=11, hidden_size=H, vocab=V, teacher_head=False,
          **options):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T + strided, hidden_size, generator=g).to(dtype)[:, :T]  # hidden[:, :-1]
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.6).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[:, :2] = -100                                  # a prompt
    labels[torch.rand(B, T, generator=g) < 0.2] = -100    # and holes
    kw = dict(student_generated=torch.rand(B, generator=g) < 0.5, alpha=torch.rand(B, generator=g))
    if teacher_head:  # the teacher's own head (a vocabulary 3 rows smaller): logits formed in chunks
        kw["teacher_head"] = (torch.randn(B, T, H_TEACHER, generator=g).to(dtype),
                              (torch.randn(vocab - 3 if vocab > 3 else vocab, H_TEACHER, generator=g) / 2).to(dtype))
        kw["teacher_head"] += (torch.randn(kw["teacher_head"][1].shape[0], generator=g).to(dtype),)
    else:
        kw["teacher_logprobs"] = _teacher_logprobs(labels, dtype, g, vocab)
    kw.update(options)
    upstream = torch.rand(B, generator=g) * 2 + 0.5 if kw.get("reduction") == "none" else torch.tensor(2.5)
    return (hidden, weight, b), labels, kw, upstream


CASES = {
    "fp32-bias-exact": dict(seed=1, dtype=torch.float32),
    "bf16-nobias-paper-clip-is": dict(
        seed=2, dtype=torch.bfloat16, bias=False, estimator="paper", clip=torch.tensor([True, False]),
        old_logprobs=torch.full((2, 11), -3.0), is_max=1.5, gamma=0.9, length_normalize=True,
        temperature=0.7, reduction="none"),
    "bf16-bias-sequence-strided": dict(
        seed=3, dtype=torch.bfloat16, strided=True, estimator="sequence", reduction="sum",
        alpha=torch.tensor([0.0, 1.0])),
    "fp16-bias-exact-tau2": dict(seed=4, dtype=torch.float16, B=3, temperature=2.0, num_items=7),
    "fp32-head-exact": dict(seed=5, dtype=torch.float32, teacher_head=True),
    "bf16-head-rao-blackwell-baseline": dict(
        seed=6, dtype=torch.bfloat16, B=3, teacher_head=True, estimator="rao_blackwell", gamma=0.9,
        baseline_groups=torch.tensor([0, 0, 0]), old_logprobs=torch.full((3, 11), -3.0), is_max=1.5),
    "fp32-head-rao-blackwell-gamma0-clip": dict(
        seed=7, dtype=torch.float32, teacher_head=True, estimator="rao_blackwell", gamma=0.0,
        clip=torch.tensor([True, True]), student_generated=torch.tensor([True, False]), temperature=0.7),
}


def _leaves(params, dtype):
    return [None if p is None else p.detach().to(dtype).requires_grad_() for p in params]


def _grads(leaves):
    return [None if p is None else p.grad for p in leaves]


def _ours_kw(kw):
    """The teacher head as askd_loss_from_hidden takes it."""
    if "teacher_head" not in kw:
        return kw
    h, w, b = kw["teacher_head"]
    rest = {k: v for k, v in kw.items() if k != "teacher_head"}
    return {**rest, "teacher_hidden": h, "teacher_lm_head_weight": w, "teacher_lm_head_bias": b}


def _reference_kw(kw):
    """The teacher head as the oracle takes it: its logits as the inputs' dtype stores them."""
    if "teacher_head" not in kw:
        return kw
    rest = {k: v for k, v in kw.items() if k != "teacher_head"}
    return {**rest, "teacher_logits": F.linear(*kw["teacher_head"])}


def _ours(params, labels, kw, upstream):
    leaves = _leaves(params, params[0].dtype)
    hidden, weight, bias = leaves
    loss, stats = ak.askd_loss_from_hidden(hidden, weight, labels, lm_head_bias=bias, **_ours_kw(kw),
                                           return_stats=True)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, _grads(leaves)


def _naive(params, labels, kw, upstream):
    """The baseline: ``F.linear`` then the reference, all in the inputs' dtype."""
    leaves = _leaves(params, params[0].dtype)
    loss, stats = askd_loss_ref(F.linear(*leaves), labels, **_reference_kw(kw), dtype=params[0].dtype)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, _grads(leaves)


def _through_linear(params, fn):
    """The truth: ``fn`` of the logits as the inputs' dtype stores them (see the module docstring)
    in fp64, and its gradient w.r.t. those logits carried to hidden, weight and bias in fp64."""
    hidden, weight, bias = params
    with torch.no_grad():
        stored = F.linear(hidden.contiguous(), weight, bias)  # one addmm: the GEMM of our chunks
    logits = stored.double().requires_grad_()
    out, extra = fn(logits)
    out.backward()
    g = logits.grad.reshape(-1, weight.shape[0])
    h = hidden.double().reshape(-1, hidden.shape[-1])
    grads = [(g @ weight.double()).view(hidden.shape), g.T @ h, None if bias is None else g.sum(0)]
    return extra, grads


def _truth(params, labels, kw, upstream):
    def fn(logits):
        loss, stats = askd_loss_ref(logits, labels, **_reference_kw(kw))
        return (loss * upstream).sum(), (loss.detach(), stats)

    (loss, stats), grads = _through_linear(params, fn)
    return loss, stats, grads


def _check_parity(params, labels, kw, upstream):
    dtype = params[0].dtype
    ours = _ours(params, labels, kw, upstream)
    truth = _truth(params, labels, kw, upstream)
    naive = _naive(params, labels, kw, upstream)
    assert ours[0].dtype == torch.float32
    assert_no_worse("loss", ours[0], truth[0], naive[0])
    for key in ("log_q", "log_ratio", "lam", "coef"):
        assert_no_worse(key, ours[1][key], truth[1][key], naive[1][key])
    for what, o, t, n in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[2], truth[2], naive[2]):
        if t is None:
            assert o is None
            continue
        assert o.dtype == dtype and o.shape == t.shape
        assert_no_worse(what, o, t, n, stored_dtype=dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_askd_from_hidden_parity(backend, chunked, name):
    _check_parity(*_case(**CASES[name]))


@st.composite
def linear_cases(draw):
    """Random shapes (T = 1, V or H = 1…), chunk sizes, dtypes and every option of askd_loss."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    spec = dict(seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from(DTYPES)), B=B, T=T,
                hidden_size=draw(st.integers(1, 20)), vocab=draw(st.integers(2, 50)),
                bias=draw(st.booleans()), strided=draw(st.booleans()),
                estimator=draw(st.sampled_from(["exact", "paper", "sequence", "rao_blackwell"])),
                gamma=draw(st.sampled_from([1.0, 0.8])), length_normalize=draw(st.booleans()),
                temperature=draw(st.sampled_from([1.0, 0.7, 2.0])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    spec["teacher_head"] = spec["estimator"] == "rao_blackwell" or draw(st.booleans())
    if spec["estimator"] == "rao_blackwell":
        spec.update(length_normalize=False, gamma=draw(st.sampled_from([1.0, 0.8, 0.0])))
    if spec["estimator"] in ("exact", "rao_blackwell") and draw(st.booleans()):
        spec["baseline_groups"] = torch.randint(0, 2, (B,), generator=g)
    if draw(st.booleans()):
        spec["alpha"] = draw(st.sampled_from([0.0, 0.25, 1.0]))
    if draw(st.booleans()):
        spec["clip"] = torch.rand(B, generator=g) < 0.5
    if draw(st.booleans()):
        spec["old_logprobs"] = torch.randn(B, T, generator=g) - 3.0
        spec["is_max"] = draw(st.sampled_from([None, 1.5]))
    if spec["reduction"] == "mean":
        spec["num_items"] = draw(st.sampled_from([None, 7, torch.tensor(5.0)]))
    return spec, draw(st.integers(1, 8))


def _hypothesis_parity(monkeypatch, case):
    spec, rows = case
    monkeypatch.setattr(fused_linear, "LOGITS_CHUNK_ELEMENTS", rows * spec["vocab"])
    _check_parity(*_case(**spec))


@settings(max_examples=25, suppress_health_check=SUPPRESSED)
@given(case=linear_cases())
def test_askd_from_hidden_parity_drawn_torch(monkeypatch, case):
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 64)  # the stages' own sub-chunks, too
    _hypothesis_parity(monkeypatch, case)


@settings(max_examples=10, suppress_health_check=SUPPRESSED)
@given(case=linear_cases())
def test_askd_from_hidden_parity_drawn_triton(monkeypatch, case):
    use_triton_on_cpu(monkeypatch)
    _hypothesis_parity(monkeypatch, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_token_logprobs_parity(backend, chunked, dtype, bias):
    g = torch.Generator().manual_seed(10 + bias)
    B, T, tau = 2, 9, (0.7 if bias else 1.0)
    params = (torch.randn(B, T, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) * 0.6).to(dtype),
              torch.randn(V, generator=g).to(dtype) if bias else None)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    upstream = torch.randn(B, T, generator=g)

    def pick(logp):  # log p(labels), 0 at ignored positions
        logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(labels != -100, logp, torch.zeros((), dtype=logp.dtype))

    def run(fn):
        leaves = _leaves(params, dtype)
        out = fn(*leaves)
        (out * upstream.to(out.dtype)).sum().backward()
        return out.detach(), _grads(leaves)

    ours = run(lambda h, w, b: ak.token_logprobs(h, w, labels, lm_head_bias=b, temperature=tau))
    naive = run(lambda h, w, b: pick(torch.log_softmax(F.linear(h, w, b) / tau, dim=-1)))

    def exact(logits):
        out = pick(torch.log_softmax(logits / tau, dim=-1))
        return (out * upstream.double()).sum(), out.detach()

    truth = _through_linear(params, exact)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (B, T)
    assert bool((ours[0][labels == -100] == 0).all())
    assert_no_worse("log_probs", ours[0], truth[0], naive[0])
    for what, o, t, n in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[1], truth[1], naive[1]):
        if t is not None:
            assert o.dtype == dtype
            assert_no_worse(what, o, t, n, stored_dtype=dtype)
    assert bool((ours[1][0][0, :3] == 0).all())  # ignored positions get no gradient


def test_same_as_askd_loss_on_materialised_logits(backend, chunked):
    """fp32: the op is askd_loss of ``F.linear(hidden, W, b)``, value, stats and gradients."""
    params, labels, kw, upstream = _case(5, torch.float32, reduction="none", clip=torch.tensor([True, True]),
                                         estimator="paper")
    ours = _ours(params, labels, kw, upstream)
    leaves = _leaves(params, torch.float32)
    loss, stats = ak.askd_loss(F.linear(*leaves), labels, **kw, return_stats=True)
    (loss * upstream).sum().backward()
    torch.testing.assert_close(ours[0], loss.detach())
    for key, value in stats.items():
        torch.testing.assert_close(ours[1][key], value)
    for o, m in zip(ours[2], _grads(leaves)):
        torch.testing.assert_close(o, m, rtol=1e-5, atol=1e-6)


def test_frozen_head_and_chunk_independence(monkeypatch):
    """Only hidden needs a gradient (frozen lm_head): weight gets none; and the result does not
    depend on the chunk size (one chunk of all rows vs chunks of 1 and of 5 rows)."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    params, labels, kw, upstream = _case(6, torch.float32)
    results = []
    for rows in (1, CHUNK, 10**6):
        monkeypatch.setattr(fused_linear, "LOGITS_CHUNK_ELEMENTS", rows * V)
        hidden = params[0].clone().requires_grad_()
        loss = ak.askd_loss_from_hidden(hidden, params[1], labels, lm_head_bias=params[2], **kw)
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
    assert params[1].grad is None


def test_chunk_rule():
    assert fused_linear.chunk_rows(152064, 3584) == 832                    # Qwen2-7B: 2^27 // V, tiled
    assert fused_linear.chunk_rows(32000, 512) == 512                      # capped by H
    assert fused_linear.chunk_rows(V, H) == H
    assert fused_linear.chunk_rows(1 << 30, 4096) == 1                     # at least one row
    for v, h in [(151936, 1536), (50257, 768), (128256, 4096)]:
        rows = fused_linear.chunk_rows(v, h)
        assert rows % 64 == 0 and rows * v <= fused_linear.LOGITS_CHUNK_ELEMENTS and rows <= h


def test_torch_compile_fullgraph(monkeypatch, chunked):
    """The teacher's token_logprobs and the student's loss in one compiled graph (aot_eager on CPU)."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    params, labels, kw, _ = _case(7, torch.float32)
    teacher = (torch.randn(2, 11, H_TEACHER), torch.randn(V, H_TEACHER))
    kw = {k: v for k, v in kw.items() if k != "teacher_logprobs"}

    def step(hidden, weight, bias):
        with torch.no_grad():
            lp = ak.token_logprobs(*teacher, labels)
        return ak.askd_loss_from_hidden(hidden, weight, labels, lm_head_bias=bias, teacher_logprobs=lp, **kw)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = _leaves(params, torch.float32)
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *_grads(leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---- memory: peak extra bytes measured on the CPU allocator ----------------------------------------

MEM_V, MEM_H, MEM_ROWS = 1024, 64, 32


def _peaks(n_tokens, dtype, monkeypatch):
    from bench.measure import cpu_allocations

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(fused_linear, "LOGITS_CHUNK_ELEMENTS", MEM_ROWS * MEM_V)
    g = torch.Generator().manual_seed(0)
    B, T = 4, n_tokens // 4
    hidden = torch.randn(B, T, MEM_H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(MEM_V, MEM_H, generator=g) / 8).to(dtype).requires_grad_()
    bias = torch.zeros(MEM_V, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, MEM_V, (B, T), generator=g)
    kw = dict(lm_head_bias=bias, teacher_logprobs=torch.randn(B, T, generator=g) - 5,
              student_generated=torch.tensor([True, False, True, False]), alpha=0.5, temperature=0.9)
    ak.askd_loss_from_hidden(hidden, weight, labels, **kw).backward()  # warm-up
    hidden.grad = weight.grad = bias.grad = None
    loss, fwd, _ = cpu_allocations(lambda: ak.askd_loss_from_hidden(hidden, weight, labels, **kw))
    if fwd is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    _, bwd, _ = cpu_allocations(loss.backward)
    # The gradients themselves (and grad_weight's fp32 accumulator) are outputs, not working memory.
    size = dtype.itemsize
    outputs = n_tokens * MEM_H * size + MEM_V * MEM_H * (4 + (size if size != 4 else 0)) + MEM_V * 8
    return fwd, bwd - outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_is_one_chunk_not_tokens_by_vocab(monkeypatch, dtype):
    small, large = 256, 2048                 # 8 and 64 chunks of MEM_ROWS rows
    small_fwd, small_bwd = _peaks(small, dtype, monkeypatch)
    large_fwd, large_bwd = _peaks(large, dtype, monkeypatch)
    chunk_bytes = MEM_ROWS * MEM_V * 4       # one chunk of logits, in fp32
    per_token = 64                           # O(tokens) fp32 vectors: log q, ℓ, lse, λ, coef, scale…
    for low, high in ((small_fwd, large_fwd), (small_bwd, large_bwd)):
        # A handful of chunk-sized temporaries (logits, log-softmax, fp32 copies, grad rows) …
        assert high <= 6 * chunk_bytes + per_token * large, (high, chunk_bytes)
        # … far from one tokens × vocab tensor, and 8× the tokens only grows the O(tokens) vectors.
        assert high < large * MEM_V * 4 / 8
        assert high - low <= per_token * (large - small), (low, high)


# ---- bad inputs ------------------------------------------------------------------------------------

# ``no_kernels`` (the fixture of conftest.py) replaces every stage of both backends
# by a sentinel that raises ``KernelRan``: a check that runs too late, or not at all, is caught.

B, T = 2, 3


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _loss_args():
    g = torch.Generator().manual_seed(0)
    return dict(student_hidden=torch.randn(B, T, H, generator=g, requires_grad=True),
                lm_head_weight=torch.randn(V, H, generator=g, requires_grad=True),
                labels=torch.randint(0, V, (B, T), generator=g), lm_head_bias=torch.randn(V, generator=g),
                teacher_logprobs=torch.randn(B, T, generator=g) - 3,
                student_generated=torch.tensor([True, False]), alpha=0.5)


LOSS_CASES = [
    ("hidden-2d", {"student_hidden": torch.zeros(B * T, H)}, ValueError, "student_hidden"),
    ("hidden-float64", {"student_hidden": torch.zeros(B, T, H, dtype=torch.float64)}, TypeError, "student_hidden"),
    ("hidden-int", {"student_hidden": torch.zeros(B, T, H, dtype=torch.long)}, TypeError, "student_hidden"),
    ("hidden-empty", {"student_hidden": torch.zeros(B, 0, H)}, ValueError, "student_hidden"),
    ("weight-H-mismatch", {"lm_head_weight": torch.zeros(V, H + 1)}, ValueError, "lm_head_weight"),
    ("weight-1d", {"lm_head_weight": torch.zeros(V)}, ValueError, "lm_head_weight"),
    ("weight-empty-vocab", {"lm_head_weight": torch.zeros(0, H)}, ValueError, "lm_head_weight"),
    ("weight-dtype", {"lm_head_weight": torch.zeros(V, H, dtype=torch.bfloat16)}, TypeError, "lm_head_weight"),
    ("weight-not-tensor", {"lm_head_weight": [[0.0] * H] * V}, TypeError, "lm_head_weight"),
    ("weight-on-meta", {"lm_head_weight": _meta(V, H)}, ValueError, "lm_head_weight"),
    ("bias-V-mismatch", {"lm_head_bias": torch.zeros(V + 1)}, ValueError, "lm_head_bias"),
    ("bias-2d", {"lm_head_bias": torch.zeros(1, V)}, ValueError, "lm_head_bias"),
    ("bias-dtype", {"lm_head_bias": torch.zeros(V, dtype=torch.float16)}, TypeError, "lm_head_bias"),
    ("bias-on-meta", {"lm_head_bias": _meta(V)}, ValueError, "lm_head_bias"),
    ("labels-shape", {"labels": torch.zeros(B, T + 1, dtype=torch.long)}, ValueError, "labels"),
    ("labels-float", {"labels": torch.zeros(B, T)}, TypeError, "labels"),
    ("labels-ge-vocab", {"labels": torch.full((B, T), V)}, ValueError, "labels"),
    ("labels-on-meta", {"labels": _meta(B, T, dtype=torch.long)}, ValueError, "labels"),
    ("logprobs-missing", {"teacher_logprobs": None}, TypeError, "teacher_logprobs"),
    ("logprobs-shape", {"teacher_logprobs": torch.zeros(B, T, 1)}, ValueError, "teacher_logprobs"),
    ("logprobs-on-meta", {"teacher_logprobs": _meta(B, T)}, ValueError, "teacher_logprobs"),
    ("old-logprobs-shape", {"old_logprobs": torch.zeros(B, T - 1)}, ValueError, "old_logprobs"),
    ("clip-int", {"clip": torch.tensor([1, 0])}, TypeError, "clip"),
    ("sgo-missing", {"student_generated": None}, TypeError, "student_generated"),
    ("alpha-above-one", {"alpha": 1.5}, ValueError, "alpha"),
    ("estimator-unknown", {"estimator": "exakt"}, ValueError, "estimator"),
    ("gamma-zero", {"gamma": 0.0}, ValueError, "gamma"),
    ("temperature-zero", {"temperature": 0.0}, ValueError, "temperature"),
    ("reduction-unknown", {"reduction": "avg"}, ValueError, "reduction"),
    ("num-items-zero", {"num_items": 0}, ValueError, "num_items"),
    ("teacher-logits-not-accepted", {"teacher_logits": torch.zeros(B, T, V)}, TypeError, "teacher_logits"),
    ("teacher-both", {"teacher_hidden": torch.zeros(B, T, 3), "teacher_lm_head_weight": torch.zeros(V, 3)},
     ValueError, "teacher_hidden"),
    ("teacher-head-no-weight", {"teacher_logprobs": None, "teacher_hidden": torch.zeros(B, T, 3)},
     ValueError, "teacher_lm_head_weight"),
    ("teacher-head-T-mismatch", {"teacher_logprobs": None, "teacher_hidden": torch.zeros(B, T + 1, 3),
                                 "teacher_lm_head_weight": torch.zeros(V, 3)}, ValueError, "teacher_hidden"),
    ("teacher-head-dtype", {"teacher_logprobs": None, "teacher_hidden": torch.zeros(B, T, 3),
                            "teacher_lm_head_weight": torch.zeros(V, 3, dtype=torch.float16)},
     TypeError, "teacher_lm_head_weight"),
    ("teacher-head-bias-shape", {"teacher_logprobs": None, "teacher_hidden": torch.zeros(B, T, 3),
                                 "teacher_lm_head_weight": torch.zeros(V, 3),
                                 "teacher_lm_head_bias": torch.zeros(V + 2)}, ValueError, "teacher_lm_head_bias"),
    ("rao-blackwell-needs-head", {"estimator": "rao_blackwell"}, ValueError, "teacher_hidden"),
    ("baseline-groups-float", {"baseline_groups": torch.zeros(B)}, TypeError, "baseline_groups"),
    ("baseline-groups-paper", {"baseline_groups": torch.zeros(B, dtype=torch.long), "estimator": "paper"},
     ValueError, "baseline_groups"),
]


def _logprobs_args():
    g = torch.Generator().manual_seed(1)
    return dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g),
                labels=torch.randint(0, V, (B, T), generator=g), bias=torch.randn(V, generator=g))


LOGPROBS_CASES = [
    ("hidden-2d", {"hidden": torch.zeros(B * T, H)}, ValueError, "hidden"),
    ("weight-H-mismatch", {"weight": torch.zeros(V, H - 1)}, ValueError, "weight"),
    ("weight-dtype", {"weight": torch.zeros(V, H, dtype=torch.float16)}, TypeError, "weight"),
    ("bias-V-mismatch", {"bias": torch.zeros(V - 1)}, ValueError, "bias"),
    ("bias-dtype", {"bias": torch.zeros(V, dtype=torch.bfloat16)}, TypeError, "bias"),
    ("labels-shape", {"labels": torch.zeros(B, dtype=torch.long)}, ValueError, "labels"),
    ("labels-ge-vocab", {"labels": torch.full((B, T), V)}, ValueError, "labels"),
    ("labels-negative", {"labels": torch.full((B, T), -1)}, ValueError, "labels"),
    ("labels-on-meta", {"labels": _meta(B, T, dtype=torch.long)}, ValueError, "labels"),
    ("temperature-nan", {"temperature": float("nan")}, ValueError, "temperature"),
    ("ignore-index-float", {"ignore_index": -100.0}, TypeError, "ignore_index"),
]


def _call(fn, base, overrides):
    kwargs = {**base, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in overrides}
    return fn(**kwargs)


@pytest.mark.parametrize("overrides, exc, name", [c[1:] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_bad_input_askd_from_hidden(no_kernels, overrides, exc, name):
    with pytest.raises(exc, match=rf"\b{re.escape(name)}\b") as info:
        _call(ak.askd_loss_from_hidden, _loss_args(), overrides)
    assert not isinstance(info.value, KernelRan)


@pytest.mark.parametrize("overrides, exc, name", [c[1:] for c in LOGPROBS_CASES],
                         ids=[c[0] for c in LOGPROBS_CASES])
def test_bad_input_token_logprobs(no_kernels, overrides, exc, name):
    with pytest.raises(exc, match=rf"\b{re.escape(name)}\b") as info:
        _call(ak.token_logprobs, _logprobs_args(), overrides)
    assert not isinstance(info.value, KernelRan)


def test_sentinel_trips_on_valid_input(no_kernels):
    with pytest.raises(KernelRan):
        ak.askd_loss_from_hidden(**_loss_args())
    with pytest.raises(KernelRan):
        ak.token_logprobs(**_logprobs_args())


# ---- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_parity(monkeypatch):
    """The Triton launchers and the bf16 → fp32 weight-gradient GEMM on a real device."""
    monkeypatch.delenv("ASKD_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(fused_linear, "LOGITS_CHUNK_ELEMENTS", CHUNK * V)
    params, labels, kw, upstream = _case(8, torch.bfloat16)
    cuda = lambda x: x.cuda() if isinstance(x, torch.Tensor) else x  # noqa: E731
    ours = _ours(tuple(map(cuda, params)), labels.cuda(), {k: cuda(v) for k, v in kw.items()}, upstream.cuda())
    truth = _truth(params, labels, kw, upstream)
    naive = _naive(params, labels, kw, upstream)
    assert_no_worse("loss", ours[0], truth[0], naive[0])
    for what, o, t, n in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[2], truth[2], naive[2]):
        assert_no_worse(what, o, t, n, stored_dtype=torch.bfloat16)
