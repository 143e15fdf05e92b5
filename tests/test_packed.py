"""Packed rows and flat inputs (``askd_kernels/_packed.py``): several sequences in one row, their
boundaries given by ``cu_seqlens`` or ``position_ids``, against the padded layout.

The claim is exact parity: a packed call returns, bit for bit, what the padded ``[S, L, V]`` call
(one sequence per row, L the longest, the rest ``ignore_index``) returns — the loss, every per-token
stat and the gradient of every token — on both backends. So the comparisons below are
``torch.equal``, with no tolerance: per-token work is the same arithmetic on the same row, and ASKD's
coefficient stage receives the very inputs the padded call gives it. Hypothesis draws the sequence
lengths (with empty ones), the arrangement (flat ``[N, V]``, one packed row, several packed rows
padded at the end), the boundary form, every estimator (``rao_blackwell`` included), ignored
positions, per-sequence α / flags / clip / baseline groups, old log-probs and reductions.
"""
import re

import pytest
import torch
from _backends import KernelRan, use_triton_on_cpu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import askd_kernels as ak

SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _torch_path(monkeypatch):
    from askd_kernels import _torch_math

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 64)  # several row chunks even on tiny shapes


# ---- problems ----------------------------------------------------------------------------------------

@st.composite
def packed_problems(draw, aligned=False):
    """Sequences and their packing (``aligned``: vocabularies that are multiples of 8, so that every
    row starts on a 16-byte boundary in the packed and in the padded layout alike). Returns a dict with the packed tensors (``student``, ``teacher``,
    ``labels`` in the arrangement's shape), the boundary keywords, the per-sequence ``lengths``, the
    generator, and ``tokens``: for each sequence the flat token indices (row-major) it occupies."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    arrangement = draw(st.sampled_from(["flat", "row", "rows"]))
    form = draw(st.sampled_from(["cu_seqlens", "position_ids"]))
    lengths = draw(st.lists(st.integers(1, 11), min_size=1, max_size=4))
    if form == "cu_seqlens" and arrangement != "rows" and draw(st.booleans()):
        lengths.insert(draw(st.integers(0, len(lengths))), 0)  # an empty sequence: only cu_seqlens has them
    if arrangement == "rows":  # each row whole sequences, then pad tokens that extend its last one
        n_rows = draw(st.integers(1, len(lengths)))
        cuts = sorted(draw(st.lists(st.integers(1, len(lengths) - 1), max_size=n_rows - 1, unique=True))) \
            if len(lengths) > 1 else []
        groups = [lengths[a:b] for a, b in zip([0] + cuts, cuts + [len(lengths)])]
        T = max(sum(gr) for gr in groups) + draw(st.integers(0, 2))
        lengths = [l for gr in groups for l in gr[:-1] + [gr[-1] + T - sum(gr)]]
        n_tokens, shape = len(groups) * T, (len(groups), T)
    else:
        n_tokens = sum(lengths)
        shape = (n_tokens,) if arrangement == "flat" else (1, n_tokens)
    starts = torch.tensor([0] + lengths).cumsum(0)
    tokens = [list(range(int(a), int(b))) for a, b in zip(starts[:-1], starts[1:])]
    if aligned:
        V_s = 8 * draw(st.integers(1, 5))
        V_t = draw(st.sampled_from([V_s, V_s + 8, max(8, V_s - 8)]))
    else:
        V_s = draw(st.integers(2, 40))
        V_t = draw(st.sampled_from([V_s, V_s + 3, max(2, V_s - 3)]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 3.0]))
    student = (torch.randn(n_tokens, V_s, generator=g) * scale).to(dtype)
    teacher = (torch.randn(n_tokens, V_t, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V_s, (n_tokens,), generator=g)
    labels[torch.rand(n_tokens, generator=g) < draw(st.sampled_from([0.0, 0.2, 0.5]))] = -100
    if arrangement == "rows":  # the row-end pad tokens are ignored
        for r in range(shape[0]):
            used = sum(groups[r])
            labels[r * shape[1] + used:(r + 1) * shape[1]] = -100
    if draw(st.booleans()):  # non-contiguous logits: every other row of a wider buffer
        student = torch.stack([student, student], 1).reshape(2 * n_tokens, V_s)[::2]
    if form == "cu_seqlens":
        bounds = {"cu_seqlens": starts.to(draw(st.sampled_from([torch.int32, torch.int64])))}
        if draw(st.booleans()):
            bounds["max_seqlen"] = max(lengths) + draw(st.integers(0, 2))
    else:
        position = torch.cat([torch.arange(l) for l in lengths])
        if arrangement == "flat" and draw(st.booleans()):
            position = position.view(1, -1)  # DataCollatorWithFlattening's [1, N]
        bounds = {"position_ids": position.reshape(shape) if position.dim() == 1 else position}
    return dict(student=student.reshape(*shape, V_s), teacher=teacher.reshape(*shape, V_t),
                labels=labels.reshape(shape), bounds=bounds, lengths=lengths, tokens=tokens, g=g)


def _padded(x, tokens, width, fill):
    """Per-token ``x`` (``[N, *rest]``) as ``[S, width, *rest]``, ``fill`` after
    each sequence's end."""
    out = torch.full((len(tokens), width, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    for s, idx in enumerate(tokens):
        out[s, :len(idx)] = x[idx]
    return out


def _flat(x, per_token_dims):
    """``x`` of the packed arrangement with ``per_token_dims`` trailing dims, as [N, ...]."""
    return x.reshape(-1, *x.shape[x.dim() - per_token_dims:]) if per_token_dims else x.reshape(-1)


def _width(p):
    return p["bounds"].get("max_seqlen", max(p["lengths"]))


def _check_gradients(p, packed_grad, padded_grad):
    grad = _flat(packed_grad, 1)
    width = padded_grad.shape[1]
    for s, idx in enumerate(p["tokens"]):
        assert torch.equal(grad[idx], padded_grad[s, :len(idx)]), f"gradient of sequence {s}"
        assert not padded_grad[s, len(idx):width].any()


# ---- askd_loss --------------------------------------------------------------------------------------

@st.composite
def askd_cases(draw, aligned=False):
    p = draw(packed_problems(aligned))
    g, S = p["g"], len(p["lengths"])
    estimator = draw(st.sampled_from(["exact", "paper", "sequence", "rao_blackwell"]))
    kw = dict(
        student_generated=torch.rand(S, generator=g) < 0.5 if draw(st.booleans()) else draw(st.booleans()),
        alpha=torch.rand(S, generator=g) if draw(st.booleans()) else draw(st.sampled_from([0.3, 0.0, 1.0])),
        estimator=estimator, temperature=draw(st.sampled_from([1.0, 0.7])),
        gamma=draw(st.sampled_from([1.0, 0.9] + ([0.0] if estimator == "rao_blackwell" else []))),
        length_normalize=estimator != "rao_blackwell" and draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    if draw(st.booleans()):
        kw["clip"] = torch.rand(S, generator=g) < 0.5
    if draw(st.booleans()):
        kw["old_logprobs"] = (torch.randn(p["labels"].shape, generator=g) - 2.0).to(p["student"].dtype)
        kw["is_max"] = draw(st.sampled_from([None, 1.5]))
    if estimator in ("exact", "rao_blackwell") and draw(st.booleans()):
        kw["baseline_groups"] = torch.randint(0, 2, (S,), generator=g)
    if kw["reduction"] == "mean" and draw(st.booleans()):
        kw["num_items"] = 7
    teacher_kw = {"teacher_logits": p["teacher"]}
    if estimator != "rao_blackwell" and draw(st.booleans()):
        teacher_kw = {"teacher_logprobs": torch.randn(p["labels"].shape, generator=g) - 2.0}
    upstream = torch.rand(S, generator=g) + 0.5 if kw["reduction"] == "none" else torch.tensor(2.5)
    return p, kw, teacher_kw, upstream


def _askd(student, labels, teacher_kw, kw, upstream):
    leaf = student.detach().clone().requires_grad_()
    loss, stats = ak.askd_loss(leaf, labels, **teacher_kw, **kw, return_stats=True)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, leaf.grad


def _check_askd(case):
    p, kw, teacher_kw, upstream = case
    tokens, width = p["tokens"], _width(p)
    packed = _askd(p["student"], p["labels"], teacher_kw, {**kw, **p["bounds"]}, upstream)

    def pad(x, fill, dims=0):
        return _padded(_flat(x, dims), tokens, width, fill)
    padded_kw = dict(kw)
    if "old_logprobs" in kw:
        padded_kw["old_logprobs"] = pad(kw["old_logprobs"], 0.0)
    padded_teacher = ({"teacher_logits": pad(teacher_kw["teacher_logits"], 0.0, 1)} if "teacher_logits" in teacher_kw
                      else {"teacher_logprobs": pad(teacher_kw["teacher_logprobs"], 0.0)})
    padded = _askd(pad(p["student"], 0.0, 1), pad(p["labels"], -100), padded_teacher, padded_kw, upstream)

    assert torch.equal(packed[0], padded[0]), (packed[0], padded[0])
    if kw["reduction"] == "none":
        assert packed[0].shape == (len(tokens),)
    for key in ("log_q", "log_ratio", "lam", "coef"):
        assert packed[1][key].shape == p["labels"].shape
        assert torch.equal(pad(packed[1][key], 0.0), padded[1][key]), key
    _check_gradients(p, packed[2], padded[2])


@settings(max_examples=60, suppress_health_check=SUPPRESSED)
@given(case=askd_cases())
def test_askd_packed_equals_padded_torch_path(monkeypatch, case):
    _torch_path(monkeypatch)
    _check_askd(case)


@settings(max_examples=10, suppress_health_check=SUPPRESSED)
@given(case=askd_cases(aligned=True))
def test_askd_packed_equals_padded_triton_kernels(monkeypatch, case):
    """Bitwise on the kernels too, for vocabularies that are multiples of 8: the kernels' 128-bit
    main loop starts at each row's first 16-byte boundary, so the order of a row's sums depends on
    where the row starts modulo 16 bytes (docs/contract.md §7.7); with V a multiple of 8 every row
    of both layouts starts on a boundary."""
    use_triton_on_cpu(monkeypatch)  # several scan chunks per sequence (BLOCK_T = 16), vocabulary blocks
    _check_askd(case)


def test_askd_scans_restart_at_every_boundary(backend):
    """Two sequences in one row against the same row read as one sequence: the suffix scans (here
    G_t, with γ < 1) must not carry the second sequence's returns into the first."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 9, 6, generator=g), torch.randn(1, 9, 6, generator=g)
    labels = torch.randint(0, 6, (1, 9), generator=g)
    kw = dict(student_generated=True, alpha=0.4, gamma=0.9, return_stats=True)
    _, packed = ak.askd_loss(student, labels, teacher, cu_seqlens=torch.tensor([0, 4, 9]), **kw)
    _, first = ak.askd_loss(student[:, :4], labels[:, :4], teacher[:, :4], **kw)
    _, second = ak.askd_loss(student[:, 4:], labels[:, 4:], teacher[:, 4:], **kw)
    _, joined = ak.askd_loss(student, labels, teacher, **kw)
    assert torch.equal(packed["lam"], torch.cat([first["lam"], second["lam"]], 1))
    assert not torch.equal(packed["lam"][:, :4], joined["lam"][:, :4])


def test_position_ids_and_cu_seqlens_agree(backend):
    """``position_ids`` resets (and each row start) give the sequences ``cu_seqlens`` names; a row
    start is a boundary even where the position id does not restart."""
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    position_ids = torch.tensor([[0, 1, 0, 1, 2], [3, 4, 0, 1, 2]])  # row 2 continues a sequence
    kw = dict(student_generated=torch.tensor([True, False, True, False]), alpha=torch.tensor([.2, .4, .6, .8]),
              reduction="none")
    by_ids = ak.askd_loss(student, labels, teacher, position_ids=position_ids, **kw)
    by_cu = ak.askd_loss(student, labels, teacher, cu_seqlens=torch.tensor([0, 2, 5, 7, 10]), **kw)
    assert torch.equal(by_ids, by_cu) and by_ids.shape == (4,)


def test_packed_under_torch_compile_fullgraph(monkeypatch):
    """With ``cu_seqlens`` and ``max_seqlen`` every size is known without reading a tensor, so the
    packed path traces with ``fullgraph=True`` and matches eager, value and gradient."""
    _torch_path(monkeypatch)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(1, 10, 8, generator=g), torch.randn(1, 10, 8, generator=g)
    labels = torch.randint(0, 8, (1, 10), generator=g)
    cu, alpha = torch.tensor([0, 3, 10]), torch.tensor([0.3, 0.7])

    def loss_fn(x):
        loss = ak.askd_loss(x, labels, teacher, student_generated=torch.tensor([True, False]), alpha=alpha,
                            gamma=0.9, cu_seqlens=cu, max_seqlen=7)
        return loss + ak.divergence_loss(x, teacher, labels, kind="skl", alpha=alpha, cu_seqlens=cu, max_seqlen=7)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        x = student.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    # aot_eager runs the same kernels on the same inputs: nothing to round differently.
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---- divergence_loss --------------------------------------------------------------------------------

@st.composite
def divergence_cases(draw):
    p = draw(packed_problems())
    g, S = p["g"], len(p["lengths"])
    kind = draw(st.sampled_from(["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]))
    kw = dict(kind=kind, beta=draw(st.sampled_from([0.5, 0.1, 0.0, 1.0])),
              temperature=draw(st.sampled_from([1.0, 2.0])),
              reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    if kind in ("skl", "srkl"):
        kw["alpha"] = torch.rand(S, generator=g) if draw(st.booleans()) else 0.3
    if draw(st.booleans()):
        kw["clip"] = torch.rand(S, generator=g) < 0.5
    upstream = (torch.rand(p["labels"].shape, generator=g) + 0.5 if kw["reduction"] == "none"
                else torch.tensor(2.5))
    return p, kw, upstream


def _divergence(student, teacher, labels, kw, upstream):
    leaf = student.detach().clone().requires_grad_()
    loss = ak.divergence_loss(leaf, teacher, labels, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad


def _check_divergence(case):
    p, kw, upstream = case
    tokens, width = p["tokens"], _width(p)

    def pad(x, fill, dims=0):
        return _padded(_flat(x, dims), tokens, width, fill)
    packed = _divergence(p["student"], p["teacher"], p["labels"], {**kw, **p["bounds"]}, upstream)
    padded_upstream = pad(upstream, 0.0) if kw["reduction"] == "none" else upstream
    padded = _divergence(pad(p["student"], 0.0, 1), pad(p["teacher"], 0.0, 1), pad(p["labels"], -100), kw,
                         padded_upstream)
    if kw["reduction"] == "none":
        assert packed[0].shape == p["labels"].shape
        assert torch.equal(pad(packed[0], 0.0), padded[0])
    else:
        assert torch.equal(packed[0], padded[0]), (packed[0], padded[0])
    _check_gradients(p, packed[1], padded[1])


@settings(max_examples=50, suppress_health_check=SUPPRESSED)
@given(case=divergence_cases())
def test_divergence_packed_equals_padded_torch_path(monkeypatch, case):
    _torch_path(monkeypatch)
    _check_divergence(case)


@settings(max_examples=10, suppress_health_check=SUPPRESSED)
@given(case=divergence_cases())
def test_divergence_packed_equals_padded_triton_kernels(monkeypatch, case):
    use_triton_on_cpu(monkeypatch)
    _check_divergence(case)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "skl"])
def test_divergence_flat_input_is_one_row(backend, kind):
    """``[N, V]`` with ``[N]`` labels (Liger's and TRL's shape) is the ``[1, N, V]`` call: the same
    loss and gradient, and ``"none"`` gives ``[N]``."""
    g = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g)
    labels = torch.randint(0, 9, (7,), generator=g)
    labels[2] = -100
    extra = {"alpha": 0.3} if kind == "skl" else {}
    for reduction in ("mean", "none"):
        flat, row = (student.clone().requires_grad_() for _ in range(2))
        a = ak.divergence_loss(flat, teacher, labels, kind=kind, reduction=reduction, **extra)
        b = ak.divergence_loss(row[None], teacher[None], labels[None], kind=kind, reduction=reduction, **extra)
        a.sum().backward()
        b.sum().backward()
        assert a.shape == labels.shape if reduction == "none" else a.dim() == 0
        assert torch.equal(a, b.view(a.shape)) and torch.equal(flat.grad, row.grad)


# ---- bad boundaries: rejected before any kernel ----------------------------------------------------

def _bad_packing_cases():
    N = 6
    cu = torch.tensor([0, 2, 6])
    return [
        ("cu-not-from-0", dict(cu_seqlens=torch.tensor([1, 2, 6])), ValueError, "cu_seqlens"),
        ("cu-decreasing", dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
        ("cu-short-of-N", dict(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
        ("cu-past-N", dict(cu_seqlens=torch.tensor([0, 2, N + 1])), ValueError, "cu_seqlens"),
        ("cu-float", dict(cu_seqlens=cu.float()), TypeError, "cu_seqlens"),
        ("cu-2d", dict(cu_seqlens=cu[None]), ValueError, "cu_seqlens"),
        ("cu-one-entry", dict(cu_seqlens=torch.tensor([0])), ValueError, "cu_seqlens"),
        ("cu-list", dict(cu_seqlens=[0, 2, 6]), TypeError, "cu_seqlens"),
        ("cu-on-meta", dict(cu_seqlens=torch.empty(3, dtype=torch.long, device="meta")), ValueError, "cu_seqlens"),
        ("both", dict(cu_seqlens=cu, position_ids=torch.zeros(1, N, dtype=torch.long)), ValueError,
         "position_ids"),
        ("max-seqlen-short", dict(cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen"),
        ("max-seqlen-zero", dict(cu_seqlens=cu, max_seqlen=0), ValueError, "max_seqlen"),
        ("max-seqlen-float", dict(cu_seqlens=cu, max_seqlen=4.0), TypeError, "max_seqlen"),
        ("max-seqlen-alone", dict(max_seqlen=4), ValueError, "max_seqlen"),
        ("pos-shape", dict(position_ids=torch.zeros(1, N - 1, dtype=torch.long)), ValueError, "position_ids"),
        ("pos-float", dict(position_ids=torch.zeros(1, N)), TypeError, "position_ids"),
        ("alpha-per-row", dict(cu_seqlens=cu, alpha=torch.tensor([0.5])), ValueError, "alpha"),
        ("clip-per-row", dict(cu_seqlens=cu, clip=torch.tensor([True])), ValueError, "clip"),
    ]


CASES = _bad_packing_cases()


@pytest.mark.parametrize("kw, exc, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_packing_is_rejected_before_any_kernel(no_kernels, monkeypatch, kw, exc, name):
    from askd_kernels.divergence import cpu, triton

    def sentinel(*args, **kwargs):
        raise KernelRan("a divergence kernel ran on invalid input")
    for module in (cpu, triton):
        monkeypatch.setattr(module, "forward", sentinel)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 6, 5, generator=g), torch.randn(1, 6, 5, generator=g)
    labels = torch.randint(0, 5, (1, 6), generator=g)
    calls = [lambda: ak.askd_loss(student, labels, teacher, **{"student_generated": True, "alpha": 0.5, **kw})]
    if "alpha" not in kw or "cu_seqlens" in kw:
        calls.append(lambda: ak.divergence_loss(student, teacher, labels, **{"kind": "skl", "alpha": 0.5, **kw}))
    for call in calls:
        with pytest.raises(exc, match=rf"\b{re.escape(name)}\b") as info:
            call()
        assert not isinstance(info.value, KernelRan)


def test_askd_flat_input_needs_boundaries(no_kernels):
    """ASKD's scans need sequences: a flat ``[N, V]`` without boundaries is refused (naming the fix),
    where ``divergence_loss`` reads it as one row."""
    student, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match=r"student_logits.*cu_seqlens or position_ids"):
        ak.askd_loss(student, labels, torch.randn(6, 5), student_generated=True, alpha=0.5)


# ---- the compiled kernels ---------------------------------------------------------------------------

def _on(device, value):
    """``value`` (a case: tensors in dicts, lists and tuples) with every tensor moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on(device, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not (value and isinstance(value[0], int)):
        return type(value)(_on(device, v) for v in value)
    return value


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=30, suppress_health_check=SUPPRESSED)
@given(askd=askd_cases(), divergence=divergence_cases())
def test_packed_equals_padded_compiled_kernels(askd, divergence):
    """The same parity with the compiled kernels on CUDA tensors (the boundaries read with one sync)."""
    _check_askd(_on(torch.device("cuda"), askd))
    _check_divergence(_on(torch.device("cuda"), divergence))
