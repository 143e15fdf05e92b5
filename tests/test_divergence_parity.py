"""``divergence_loss`` (docs/contract.md §6): parity of both backends with the fp64 oracle ``divergence_loss_ref``
— values and gradients under the tolerance rule of ``_compare.py`` — plus its exact boundaries,
masked vocabularies, rows that must not be read, memory profile, bad inputs and ``torch.compile``.

Hypothesis draws the shapes (odd sizes, V not a multiple of the block, T = 1, B = 1, V_s ≠ V_t both
ways) and every option: all six kinds × fp32/bf16/fp16 × α/β including 0 and 1 × clip × all-ignored
× temperature × reductions × num_items × upstream gradients ≠ 1 (zeros included).
"""
import pytest
import torch
from _backends import use_triton_on_cpu
from _inputs import DTYPES, logits_and_labels, problem
from _compare import assert_no_worse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import askd_kernels as ak
from reference import divergence_loss_ref

KINDS = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
NEG_INF = float("-inf")


def _masks_allowed(kind, beta):
    """Which −inf placements inside the shared vocabulary keep the *reference* finite and its autograd
    NaN-free: q = 0 needs a kind without log q (or with 0·log 0 only), p = 0 one without log p, and
    both = 0 one without logaddexp(−inf, −inf) (whose backward is NaN in the oracle; the kernels are
    checked on that case against the oracle with the column removed, below)."""
    student_only = kind in ("rkl", "tvd") or (kind == "jsd" and beta > 0)
    teacher_only = kind in ("fkl", "tvd") or (kind == "jsd" and beta < 1)
    both = kind in ("fkl", "rkl", "tvd") or (kind == "jsd" and beta in (0.0, 1.0))
    return student_only, teacher_only, both


@st.composite
def divergence_cases(draw, kind):
    """One random problem for ``kind``: tensors from a drawn seed plus every keyword option."""
    g, student, teacher, labels = logits_and_labels(draw, max_T=9)
    B, T, V_s = student.shape
    V_t = teacher.shape[2]
    V = min(V_s, V_t)
    # sampled_from lists start with the informative choice: hypothesis favours the first one. Rare
    # degenerate cases (all positions ignored) come from the seeded generator, to keep most of the
    # few interpreted examples informative.
    labels[torch.rand(B, T, generator=g) < draw(st.sampled_from([0.3, 0.0, 0.7]))] = -100
    if torch.rand((), generator=g) < 0.1:
        labels[:] = -100

    alpha_kind = draw(st.sampled_from(["tensor", "float", "boundary", "none"]))
    if alpha_kind == "tensor" or (alpha_kind == "none" and kind in ("skl", "srkl")):
        alpha = torch.rand(B, generator=g)
    elif alpha_kind == "float":
        alpha = draw(st.floats(0.05, 0.95))
    elif alpha_kind == "boundary":
        alpha = torch.randint(0, 2, (B,), generator=g).float()  # 0 or 1 per sequence
    else:
        alpha = None  # unused by the kind
    beta = draw(st.sampled_from([0.5, 0.1, 0.93, 0.0, 1.0]))

    # −inf logits (a masked vocabulary entry, for every position) where the oracle stays finite.
    student_only, teacher_only, both = _masks_allowed(kind, beta) if V > 1 else (False, False, False)
    col = draw(st.integers(0, V - 1))
    if student_only and draw(st.booleans()):
        student[..., col] = NEG_INF
    if teacher_only and draw(st.booleans()):
        teacher[..., col] = NEG_INF
    if both and draw(st.booleans()):
        student[..., col] = teacher[..., col] = NEG_INF
    if V_s > V_t and draw(st.booleans()):  # beyond the shared vocabulary: must not matter
        student[..., V_s - 1] = NEG_INF
    if draw(st.booleans()):  # non-contiguous logits: slices of wider buffers
        student = torch.cat([student, student[:, :1]], dim=1)[:, :T]
        teacher = torch.cat([teacher, teacher[..., :3]], dim=2)[..., :V_t]

    kw = dict(kind=kind, beta=beta,
              temperature=draw(st.sampled_from([1.0, 0.7, 2.0])),
              reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    if alpha is not None:
        kw["alpha"] = alpha
    if draw(st.booleans()):  # clip some sequences, never all (the all-ignored case covers that)
        kw["clip"] = torch.rand(B, generator=g) < 0.5
        kw["clip"][int(torch.randint(0, B, (1,), generator=g))] = False
    if kw["reduction"] == "mean":
        kw["num_items"] = draw(st.sampled_from([None, 7, "tensor"]))
        if kw["num_items"] == "tensor":
            kw["num_items"] = torch.tensor(5.0)
    if kw["reduction"] == "none":
        upstream = torch.rand(B, T, generator=g) * 2 + 0.5
        upstream[torch.rand(B, T, generator=g) < 0.3] = 0.0  # rows with a zero upstream gradient
    else:
        upstream = torch.tensor(2.5)
    return student, teacher, labels, kw, upstream


def _run(fn, student, teacher, labels, kw, upstream, *, leaf_dtype):
    leaf = student.detach().to(leaf_dtype).requires_grad_()
    loss = fn(leaf, teacher, labels, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad


def _check_case(case):
    student, teacher, labels, kw, upstream = case
    dtype = student.dtype
    ours = _run(ak.divergence_loss, *case, leaf_dtype=dtype)
    truth = _run(divergence_loss_ref, *case, leaf_dtype=torch.float64)
    naive = _run(lambda *a, **k: divergence_loss_ref(*a, **k, dtype=dtype), *case, leaf_dtype=dtype)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    assert_no_worse("loss", ours[0], truth[0], naive[0])
    assert_no_worse("grad", ours[1], truth[1], naive[1], stored_dtype=dtype)


# The kind is a test parameter, not drawn, so that each kind gets its share of the examples.
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, suppress_health_check=SUPPRESSED)
@given(data=st.data())
def test_parity_torch_path(monkeypatch, kind, data):
    from askd_kernels import _torch_math

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 97)  # several chunks even on tiny shapes
    _check_case(data.draw(divergence_cases(kind)))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=4, suppress_health_check=SUPPRESSED)  # 24 interpreted examples in all
@given(data=st.data())
def test_parity_triton_kernels(monkeypatch, kind, data):
    use_triton_on_cpu(monkeypatch)  # MAX_BLOCK = 32: several vocabulary blocks per row
    _check_case(data.draw(divergence_cases(kind)))


# ---- deterministic cases, once per backend ------------------------------------------------------
def _inputs(B=2, T=3, V_s=37, V_t=37, seed=0, dtype=torch.float32):
    return problem(seed, B, T, V_s, V_t, dtype=dtype, scale=2.0, ignore=[(0, -1)])


def _value_and_grad(student, teacher, labels, upstream=1.0, **kw):
    leaf = student.detach().clone().requires_grad_()
    loss = ak.divergence_loss(leaf, teacher, labels, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_every_option_at_once(backend, kind, dtype):
    """One fixed, fully featured case per kind and dtype (the hypothesis runs above draw few examples
    per kind): several vocabulary blocks, V_s > V_t, interior α and β, a clipped sequence, ignored
    positions, τ ≠ 1, non-contiguous teacher logits, per-token upstream gradients."""
    g = torch.Generator().manual_seed(3)
    student = (torch.randn(3, 4, 75, generator=g) * 2).to(dtype)
    teacher = (torch.randn(3, 4, 80, generator=g) * 2).to(dtype)[..., 5:72]
    labels = torch.randint(0, 75, (3, 4), generator=g)
    labels[1, ::2] = -100
    kw = dict(kind=kind, alpha=torch.tensor([0.2, 0.7, 0.5]), beta=0.3, clip=torch.tensor([False, False, True]),
              temperature=0.9, reduction="none")
    _check_case((student, teacher, labels, kw, torch.rand(3, 4, generator=g) + 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_boundaries_are_the_limits_exactly(backend, dtype):
    """skl(α=1) = fkl, srkl(α=0) = rkl, jsd(β=0) = fkl, jsd(β=1) = rkl; skl(α=0) and srkl(α=1)
    are exactly 0 with an exactly zero gradient. No clamping of α or β."""
    s, t, y = _inputs(V_s=37, V_t=29, dtype=dtype)
    kw = dict(reduction="none", temperature=0.8)
    fkl, rkl = _value_and_grad(s, t, y, kind="fkl", **kw), _value_and_grad(s, t, y, kind="rkl", **kw)
    for got, want in [(_value_and_grad(s, t, y, kind="skl", alpha=1.0, **kw), fkl),
                      (_value_and_grad(s, t, y, kind="jsd", beta=0.0, **kw), fkl),
                      (_value_and_grad(s, t, y, kind="jsd", beta=1.0, **kw), rkl)]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    srkl0 = _value_and_grad(s, t, y, kind="srkl", alpha=torch.zeros(2), **kw)
    torch.testing.assert_close(srkl0[0], rkl[0], rtol=0, atol=0)
    # srkl's a_v keeps (1−α)p/m = 1 at α = 0 where rkl's drops the constant: the same gradient up to
    # the fp32 rounding of Σq (then one rounding to the logits' dtype).
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(srkl0[1], rkl[1], rtol=tol, atol=tol)
    for kind, alpha in (("skl", 0.0), ("srkl", 1.0)):
        value, grad = _value_and_grad(s, t, y, kind=kind, alpha=alpha, **kw)
        assert not value.any() and not grad.any(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_masked_vocabulary_is_the_vocabulary_without_it(backend, kind):
    """−inf in both rows (e.g. padded vocabulary) behaves as if the column did not exist: 0·log 0 = 0,
    never NaN, and a zero gradient there. The oracle is run on the problem with the column removed."""
    s, t, y = _inputs(V_s=41, V_t=41)
    masked = [0, 17, 40]
    s[..., masked] = NEG_INF
    t[..., masked] = NEG_INF
    keep = [v for v in range(41) if v not in masked]
    kw = dict(kind=kind, alpha=torch.tensor([0.0, 0.6]), beta=0.3, reduction="none", temperature=1.3)
    upstream = torch.rand(2, 3) + 0.5
    value, grad = _value_and_grad(s, t, y, upstream, **kw)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert not grad[..., masked].any()
    case = (s[..., keep], t[..., keep], y, kw, upstream)
    truth = _run(divergence_loss_ref, *case, leaf_dtype=torch.float64)
    naive = _run(divergence_loss_ref, *case, leaf_dtype=torch.float32)
    assert_no_worse("loss", value, truth[0], naive[0])
    assert_no_worse("grad", grad[..., keep], truth[1], naive[1])


@pytest.mark.parametrize("kind", KINDS)
def test_rows_without_a_gradient_are_not_read(backend, kind):
    """Ignored positions and clipped sequences take no part (NaN logits there leave the loss and the
    gradient finite, the gradient 0), and the backward does not read rows with a zero upstream
    gradient (NaN logits there would turn 0·NaN into NaN)."""
    s, t, y = _inputs(B=3, T=4, V_s=29, V_t=35)
    y[1, 2] = -100
    s[1, 2] = float("nan")       # ignored
    s[2] = float("nan")          # clipped
    loss, grad = _value_and_grad(s, t, y, kind=kind, alpha=0.4, clip=torch.tensor([False, False, True]))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert not grad[1, 2].any() and not grad[2].any() and grad[0, 0].any()
    s, t, y = _inputs(B=2, T=3, V_s=29, V_t=35)
    s[0, 1] = float("nan")
    upstream = torch.ones(2, 3)
    upstream[0, 1] = 0.0
    _, grad = _value_and_grad(s, t, y, upstream, kind=kind, alpha=0.4, reduction="none")
    assert not grad[0, 1].any() and torch.isfinite(grad).all()


def test_student_columns_beyond_the_teacher_vocabulary_get_zero_gradient(backend):
    s, t, y = _inputs(V_s=45, V_t=30)
    for kind in KINDS:
        _, grad = _value_and_grad(s, t, y, kind=kind, alpha=0.5)
        assert not grad[..., 30:].any() and grad[0, 0, :30].any(), kind


def test_all_ignored_and_reductions(backend):
    s, t, y = _inputs()
    y[:] = -100
    for reduction in ("mean", "sum", "none"):
        loss, grad = _value_and_grad(s, t, y, kind="jsd", reduction=reduction)
        assert not loss.any() and not grad.any()
    assert ak.divergence_loss(s, t, y, kind="fkl", reduction="none").shape == (2, 3)


def test_forward_keeps_only_per_token_state(backend):
    """Nothing of size tokens × vocab is saved for backward (or allocated by the kernels' outputs)."""
    s, t, y = _inputs(B=2, T=5, V_s=64, V_t=50)
    leaf = s.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        ak.divergence_loss(leaf, t, y, kind="srkl", alpha=0.5, reduction="none")
    big = [tuple(x.shape) for x in saved
           if x.numel() > 2 * 5 * 2 and x.data_ptr() not in (leaf.data_ptr(), t.data_ptr())]
    assert not big, big


# ---- bad inputs ---------------------------------------------------------------------------------
_S, _T, _Y = _inputs(B=2, T=3, V_s=11, V_t=11)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(kind="kl"), ValueError, "kind"),
    (dict(kind="skl"), ValueError, "alpha"),
    (dict(kind="srkl"), ValueError, "alpha"),
    (dict(kind="skl", alpha=1.5), ValueError, "alpha"),
    (dict(kind="srkl", alpha=torch.rand(3)), ValueError, "alpha"),
    (dict(kind="srkl", alpha=torch.tensor([0.5, -0.1])), ValueError, "alpha"),
    (dict(kind="jsd", beta=1.5), ValueError, "beta"),
    (dict(kind="jsd", beta=-0.1), ValueError, "beta"),
    (dict(kind="jsd", beta=float("nan")), ValueError, "beta"),
    (dict(kind="jsd", beta="0.5"), TypeError, "beta"),
    (dict(kind="fkl", clip=torch.tensor([1, 0])), TypeError, "clip"),
    (dict(kind="fkl", clip=torch.tensor([True])), ValueError, "clip"),
    (dict(kind="fkl", temperature=0.0), ValueError, "temperature"),
    (dict(kind="fkl", temperature=float("inf")), ValueError, "temperature"),
    (dict(kind="fkl", ignore_index=1.5), TypeError, "ignore_index"),
    (dict(kind="fkl", reduction="avg"), ValueError, "reduction"),
    (dict(kind="fkl", num_items=0), ValueError, "num_items"),
])
def test_bad_options(kwargs, error, name):
    with pytest.raises(error, match=name):
        ak.divergence_loss(_S, _T, _Y, **kwargs)


@pytest.mark.parametrize("args, error, name", [
    ((_S[0], _T, _Y), ValueError, "student_logits"),
    ((_S.long(), _T, _Y), TypeError, "student_logits"),
    ((_S[:, :0], _T[:, :0], _Y[:, :0]), ValueError, "student_logits"),
    ((_S, None, _Y), TypeError, "teacher_logits"),
    ((_S, _T.double(), _Y), TypeError, "teacher_logits"),
    ((_S, _T[:, :2], _Y), ValueError, "teacher_logits"),
    ((_S, _T[..., :0], _Y), ValueError, "teacher_logits"),
    ((_S, _T, _Y.float()), TypeError, "labels"),
    ((_S, _T, _Y[:, :2]), ValueError, "labels"),
])
def test_bad_tensors(args, error, name):
    with pytest.raises(error, match=name):
        ak.divergence_loss(*args, kind="fkl")


# ---- torch.compile ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.7, torch.tensor([0.9, 0.3])], ids=["float", "tensor"])
def test_torch_compile_training_step(backend, alpha):
    """Training steps (linear head → logits → DistiLLM-2-style skl on TGOs + srkl on SGOs → backward
    → SGD) with the model and loss compiled with fullgraph=True through the custom ops match eager."""
    torch.manual_seed(0)
    hidden, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 27)
    labels = torch.randint(0, 31, (2, 5))
    labels[1, 3:] = -100
    sgo = torch.tensor([False, True])

    def loss_fn(head, hidden, teacher, labels):
        logits = head(hidden) / 1.5
        tgo = ak.divergence_loss(logits, teacher, labels, kind="skl", alpha=alpha, clip=sgo, temperature=0.8)
        sgo_part = ak.divergence_loss(logits, teacher, labels, kind="srkl", alpha=alpha, clip=~sgo,
                                      reduction="none")
        return tgo + sgo_part.sum() / 4

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(1)
        head = torch.nn.Linear(8, 31)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = fn(head, hidden, teacher, labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append((torch.stack(losses), head.weight.detach().clone()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
