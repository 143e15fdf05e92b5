"""``divergence_loss(process_group=...)``: the vocabulary sharded over 2 and 3 gloo processes.

Each spawned rank passes its contiguous slice of the columns of both logits (uneven widths, V not a
multiple of the world size, a one-column shard) and the same labels / alpha / clip / options; the
loss must be the single-process loss on the whole logits and each rank's gradient its columns of
the single-process gradient. The single-process results are computed here, in the parent, with the
same backend and block sizes as the children (``_spawn`` and the ``backend`` fixture shrink them
alike); many cases run in one spawn, since starting processes dominates the cost.

Tolerance: the sharded path computes the same fp32 quantities as the single-process one, but the
row's log-sum-exp is combined from per-shard partial sums and the value and S are sums of per-shard
partial sums — fp32 reassociation of ≤ 83 terms per row. ``tests/_compare.py``'s RTOL_FP32 = 1e-5
of the result's scale bounds two correct fp32 evaluations in different orders (≲ 83 · 6e-8 ≈ 5e-6);
a gradient stored in bf16 adds one bf16 ulp of the element (each side rounds its fp32 value once,
and two values a few fp32 ulps apart can straddle a rounding boundary). The mutants a test must
catch (no all_reduce: each rank's value is its shard's share; local pairs in the backward: q_v
normalised over the shard) are off by O(1) relative.
"""
import os

import pytest
import torch

import askd_kernels as ak
from _compare import RTOL_FP32
from _spawn import spawn

B, T = 3, 4
WIDTHS = {2: (9, 14), 3: (7, 1, 15)}  # V = 23: uneven, not divisible by 2 or 3, a one-column shard
WIDE = {2: (40, 43), 3: (20, 33, 30)}  # V = 83: several vocabulary blocks per shard (MAX_BLOCK = 32)
ONE = {2: (1, 22), 3: (7, 1, 15)}      # V = 23 with a one-column shard first
KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")
ALPHA = {"skl": (0.25, 0.9, 1.0), "srkl": (0.0, 0.6, 0.35)}  # per sequence, boundaries included


def _case(name):
    """A case named ``"kind-dtype[-variant]"``: the whole inputs, the same in every process (fixed
    seed), and how to call the loss. Variants: ``tau1`` / ``tau2`` (τ = 1 / 2 instead of 0.7),
    ``wide`` (V = 83), ``one`` (a one-column first shard), ``mean`` (the default reduction),
    ``flat`` ([N, V] rows), ``packed`` (``cu_seqlens``), ``nan`` (a NaN in one shard of the student
    and of the teacher, and NaN rows at an ignored position and in the clipped sequence, which no
    rank reads), ``masked`` (a shard of a row that is −inf)."""
    kind, dtype, *variant = name.split("-")
    variant = variant[0] if variant else ""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    V = 83 if variant == "wide" else 23
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    student = torch.randn(B, T, V, generator=g) * 2.5
    teacher = torch.randn(B, T, V, generator=g) * 2.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[2, 3] = -100
    upstream = torch.rand(B, T, generator=g) + 0.5
    kw = dict(kind=kind, beta=0.3, clip=torch.tensor([False, True, False]),
              temperature={"tau1": 1.0, "tau2": 2.0}.get(variant, 0.7), reduction="none")
    if kind in ALPHA:
        kw["alpha"] = torch.tensor(ALPHA[kind])
    if variant == "nan":
        student[2, 1, 20] = float("nan")  # the last shard
        teacher[0, 2, 3] = float("nan")   # the first shard
        # rows that no rank reads: an ignored position, a clipped sequence (no NaN comes out of them)
        student[0, 1] = float("nan")
        teacher[1, 2, 5:] = float("nan")
    if variant == "masked":
        student[0, 0, :7] = teacher[0, 0, :7] = float("-inf")  # all of rank 0's columns at P = 3
        teacher[2, 0, 9:] = float("-inf")                      # the teacher's columns past the first shard
    if variant == "mean":
        kw["reduction"] = "mean"
    if variant in ("flat", "packed"):  # [12, V] rows; packed: sequences of 3, 4, 5 tokens
        student, teacher, labels, upstream = (x.reshape(B * T, *x.shape[2:]) for x in (student, teacher, labels,
                                                                                        upstream))
        if variant == "packed":
            kw["cu_seqlens"] = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
        else:
            kw["clip"] = None
    return student.to(dtype), teacher.to(dtype), labels, kw, upstream


def _widths(name, world):
    return (WIDE if "wide" in name else ONE if "one" in name else WIDTHS)[world]


def _run(name, group=None, rank=0, world=1):
    """``(value, grad)`` of case ``name``: the whole logits (``group`` None) or rank ``rank``'s shard."""
    student, teacher, labels, kw, upstream = _case(name)
    if group is not None:
        widths = _widths(name, world)
        start = sum(widths[:rank])
        student, teacher = (x[..., start:start + widths[rank]] for x in (student, teacher))  # strided views
    leaf = student.detach().clone().requires_grad_() if group is None else student.detach().requires_grad_()
    loss = ak.divergence_loss(leaf, teacher, labels, process_group=group, **kw)
    (loss * upstream if loss.dim() else loss).sum().backward()
    return loss.detach(), leaf.grad


def _child(rank, world, out_dir, names):
    import torch.distributed as dist

    group = dist.group.WORLD
    out = {name: _run(name, group, rank, world) for name in names}
    # A student and teacher shard of different widths: rejected on the rank, before any collective
    # (both ranks reject here, so no rank waits in a collective).
    student, teacher, labels, kw, _ = _case("fkl-fp32")
    try:
        ak.divergence_loss(student[..., :5], teacher[..., :6], labels, process_group=group, **kw)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _assert_matches(name, got, want, dtype):
    """|got − want| ≤ RTOL_FP32·(1 + max|want|) [+ one ulp of ``dtype`` of the element], NaN exactly
    where ``want`` is NaN, equal infinities (see the module docstring)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs"
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num()), f"{name}: infinities differ"
    scale = want[finite].abs().max().item() if finite.any() else 0.0
    tol = RTOL_FP32 * (1.0 + scale)
    if dtype != torch.float32:
        tol = tol + torch.finfo(dtype).eps * want[finite].abs()
    err = (got[finite] - want[finite]).abs()
    assert bool((err <= tol).all()), f"{name}: max error {err.max().item():.3e} above tolerance"


def _names(backend, world):
    if backend == "triton":  # the interpreter in child processes is slow: a few cases cover the modes
        return ["srkl-bf16-wide", "jsd-fp32-nan", "tvd-bf16-masked", "skl-fp32-packed", "rkl-bf16-one"]
    if world == 2:
        return ([f"{k}-{d}" for k in KINDS for d in ("fp32", "bf16")]
                + ["rkl-fp32-tau1", "jsd-bf16-tau2", "srkl-fp32-wide", "fkl-fp32-mean", "tvd-fp32-flat",
                   "skl-bf16-packed", "fkl-fp32-nan", "srkl-bf16-nan", "fkl-fp32-masked", "jsd-bf16-masked",
                   "tvd-bf16-one"])
    return ([f"{k}-{'bf16' if i % 2 else 'fp32'}" for i, k in enumerate(KINDS)]
            + ["skl-fp32-wide", "rkl-bf16-flat", "srkl-fp32-packed", "tvd-fp32-nan", "jsd-fp32-masked"])


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loss_and_gradient_are_the_single_process_ones(backend, world, tmp_path):
    if backend == "triton" and world == 3:
        pytest.skip("the interpreted kernels run at 2 processes only (each interpreting child costs "
                    "seconds); what changes with 3 is the torch combination, the same for both backends")
    names = _names(backend, world)
    spawn(_child, tmp_path, world, names, backend=backend)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in names:
        value, grad = _run(name)
        dtype = grad.dtype
        widths = _widths(name, world)
        assert sum(widths) == grad.shape[-1]
        for r in range(world):
            g_value, g_grad = got[r][name]
            # the same loss on every rank, bit for bit (replicated after the all_reduce)
            assert torch.equal(g_value.nan_to_num(), got[0][name][0].nan_to_num()), (name, r)
            _assert_matches(f"{name} value (rank {r})", g_value, value, torch.float32)
            start = sum(widths[:r])
            _assert_matches(f"{name} gradient (rank {r})", g_grad, grad[..., start:start + widths[r]], dtype)
        if "nan" in name:  # NaN in → NaN out, on every rank: both rows are NaN, the other tokens are not
            nan_rows = value.isnan()
            assert nan_rows.sum() == 2 and not value[~nan_rows].isnan().any()
            assert all(g[name][1][nan_rows].isnan().all() and not g[name][1][~nan_rows].isnan().any() for g in got)
        if "masked" in name:
            assert value.isfinite().all() and grad.isfinite().all()
            if world == 3:  # rank 0's shard of row (0, 0) is −inf throughout: its gradient there is 0
                assert not got[0][name][1][0, 0].any()
    for r in range(world):
        assert "teacher_logits" in got[r]["error"] and "width 6 != 5" in got[r]["error"]


@pytest.mark.parametrize("group", ["gloo", 0, object()])
def test_a_bad_process_group_is_a_type_error_before_anything_runs(monkeypatch, group):
    from askd_kernels.divergence import cpu, triton

    def sentinel(*args, **kwargs):
        raise AssertionError("a kernel ran")

    for module in (cpu, triton):
        for fn in ("forward", "pairs", "forward_given_pairs"):
            monkeypatch.setattr(module, fn, sentinel)
    student, teacher, labels, kw, _ = _case("jsd-fp32")
    with pytest.raises(TypeError, match="process_group"):
        ak.divergence_loss(student, teacher, labels, process_group=group, **kw)


def test_without_a_process_group_the_two_passes_split_are_the_forward(backend):
    """``pairs`` then ``forward_given_pairs`` on the whole logits (the split the sharded path runs)
    give the one-kernel forward's pairs bit for bit and its value and S up to fp32 rounding (the
    torch path computes the probabilities once as e^{x}·e^{−s} in the fused forward, as e^{x − s}
    in the split), at inactive rows zeros."""
    from askd_kernels.divergence import ops
    from askd_kernels.divergence.api import _log_weights

    for kind in KINDS:
        student, teacher, labels, kw, _ = _case(f"{kind}-bf16-wide")
        kappa = torch.tensor([1.0, 0.0, 1.0])
        log_w = _log_weights(kind, kw.get("alpha"), 0.3, B, student.device)
        impl = ops._impl(student.device)
        opts = dict(temperature=0.7, ignore_index=-100)
        value, row_sum, lse_s, lse_t = impl.forward(student, teacher, labels, kappa, log_w, kind=kind, **opts)
        p_s, p_t = impl.pairs(student, teacher, labels, kappa, **opts)
        assert torch.equal(p_s, lse_s) and torch.equal(p_t, lse_t), kind
        v, s = impl.forward_given_pairs(student, teacher, labels, kappa, log_w, p_s, p_t, kind=kind, **opts)
        if kind == "tvd":
            v = v.clamp(max=1.0)
        inactive = torch.tensor([False, True, False, False, True, True, True, True, False, False, False, True])
        assert not v[inactive].any() and not s[inactive].any() and not p_s[inactive].any()
        for got, want in ((v, value), (s, row_sum)):
            torch.testing.assert_close(got, want, rtol=RTOL_FP32, atol=RTOL_FP32)
    # A row whose columns are all −inf (a masked shard): the pair (−inf, −inf) — no term — as the
    # kernel's online log-sum-exp gives it, not the NaN of (−inf) − (−inf).
    student[0, 0] = float("-inf")
    p_s, p_t = impl.pairs(student, teacher, labels, kappa, **opts)
    assert p_s[0].tolist() == [float("-inf")] * 2 and p_t[0].isfinite().all()
