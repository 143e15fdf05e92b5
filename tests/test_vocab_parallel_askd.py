"""Vocabulary parallel ``askd_loss`` (``process_group=``; docs/contract.md §7, "Vocabulary parallel:
askd_loss") on 2 and 3 gloo processes, both backends.

Each rank passes its contiguous slice of the vocabulary columns — uneven widths, V = 23 divisible by
neither 2 nor 3 — and every rank also runs the single-process call on the whole logits with the same
backend. Per case:

* the loss and the stats are bitwise the same on every rank;
* they equal the single-process loss and stats, and each rank's gradient equals its columns of the
  single-process gradient, within the tolerance below;
* NaN in one shard gives NaN exactly where the single-process call has it;
* the backward runs no collective (they raise while it runs);
* bad input: a ``process_group`` that is no process group, a teacher shard of another width, a
  label beyond the whole vocabulary (while a label in another rank's shard is fine).

Estimators exact, paper, sequence and rao_blackwell; teacher logits and log-probs; ignored
positions, a clipped SGO, baseline groups, importance weights, τ ≠ 1, γ < 1 (γ = 0 for
rao_blackwell), every reduction, packed rows (cu_seqlens, position_ids); fp32 and bf16.

Tolerance. The sharded call computes the same quantities as the single-process one, but combines
each row's log-sum-exp from the shards' (max, log-sum) pairs and adds the shards' partial sums, so
its fp32 sums run in another order: bitwise equality is not expected. ``tests/_compare.py``'s
``RTOL_FP32 = 1e-5`` of the tensor's scale bounds the difference between two correct fp32
evaluations in different orders at these sizes (rows of 23 entries, scans over ≤ 6 positions), which
is the bound used here: ``|sharded − single| ≤ 1e-5·(1 + max|single|)``. A gradient stored in bf16
adds one ulp of bf16 at the tensor's scale, ``eps(bf16)·max|single|``: two fp32 values that differ in
their last bits can round to neighbouring bf16 values (``_compare.py`` adds half an ulp against an
exact truth; between two rounded results it is a whole one).
"""
import math

import pytest
import torch
import torch.distributed as dist
from _backends import INTERPRETED
from _spawn import spawn

import askd_kernels as ak

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

V = 23
WIDTHS = {2: (10, 13), 3: (5, 11, 7)}   # uneven; V is divisible by neither world size
B, T = 4, 6
SGO = (True, False, True, True)
ALPHA = (0.3, 0.6, 0.8, 0.45)
CLIP = (False, True, True, False)       # sequence 2 is a clipped SGO (the clip of TGO 1 is ignored)
GROUPS = (0, 1, 0, 0)                   # baseline_groups: sequences 0, 2, 3 share a prompt
CU_SEQLENS = (0, 5, 9, 17, 24)          # packed: four sequences over the B·T = 24 tokens

# Each case: the estimator, options and input variants; "teacher" is "logits" or "logprobs"; the
# shards are slices of the whole logits (rows at any offset: the kernels' plain loop), or with
# "contiguous" copies (congruent rows: the kernels' aligned 16-byte loop, VEC > 1).
_BASE = dict(estimator="exact", dtype="float32", teacher="logits", temperature=1.0, gamma=1.0)
CASES = {
    "exact": dict(),
    "exact-bf16-tau-gamma": dict(dtype="bfloat16", temperature=0.7, gamma=0.9, contiguous=True),
    "exact-logprobs-clip-groups": dict(teacher="logprobs", clip=True, baseline_groups=True),
    "exact-old-logprobs-none": dict(old_logprobs=True, is_max=1.5, reduction="none", clip=True),
    "exact-length-normalize-sum": dict(length_normalize=True, gamma=0.8, reduction="sum", temperature=2.0),
    "paper": dict(estimator="paper", clip=True, temperature=1.3),
    "paper-bf16-logprobs": dict(estimator="paper", dtype="bfloat16", teacher="logprobs", gamma=0.7),
    "sequence": dict(estimator="sequence", clip=True, num_items=7.0),
    "sequence-bf16": dict(estimator="sequence", dtype="bfloat16", teacher="logprobs", temperature=0.8),
    "packed-exact": dict(packed=True, clip=True, baseline_groups=True, temperature=0.9),
    "packed-position-ids-paper": dict(estimator="paper", packed="position_ids", dtype="bfloat16"),
    "rao_blackwell": dict(estimator="rao_blackwell", clip=True, baseline_groups=True, gamma=0.9),
    "rao_blackwell-bf16-tau": dict(estimator="rao_blackwell", dtype="bfloat16", temperature=0.7, reduction="none",
                                   contiguous=True),
    "rao_blackwell-gamma0": dict(estimator="rao_blackwell", gamma=0.0, clip=True),
    "packed-rao_blackwell": dict(estimator="rao_blackwell", packed=True, clip=True),
    "nan": dict(nan=True, reduction="none", clip=True),
    "nan-rao_blackwell": dict(estimator="rao_blackwell", nan=True, reduction="none"),
}
# The interpreter is slow in child processes: a few cases that cover each kernel path.
TRITON_CASES = ("exact-bf16-tau-gamma", "exact-logprobs-clip-groups", "packed-exact", "rao_blackwell-bf16-tau",
                "nan")


def _inputs(name):
    """The case's whole tensors and keyword arguments (the same on every rank) and the upstream
    weights of the loss."""
    case = {**_BASE, **CASES[name]}
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(1234 + sorted(CASES).index(name))
    student = (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)
    teacher = (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0], labels[3, 5] = 0, V - 1                  # the first column, and the last
    labels[0, 1], labels[0, 2], labels[0, 3] = 10, 5, 16   # the first column of a shard, 2 and 3 ranks
    labels[0, 4], labels[0, 5] = 9, 15                     # the last column of a shard
    labels[1, 2] = labels[2, 0] = labels[2, 3] = labels[3, 1] = -100
    kw = dict(student_generated=torch.tensor(SGO), alpha=torch.tensor(ALPHA), estimator=case["estimator"],
              temperature=case["temperature"], gamma=case["gamma"], reduction=case.get("reduction", "mean"),
              return_stats=True)
    if case.get("clip"):
        kw["clip"] = torch.tensor(CLIP)
    if case.get("baseline_groups"):
        kw["baseline_groups"] = torch.tensor(GROUPS)
    if case.get("old_logprobs"):
        kw["old_logprobs"] = torch.randn(B, T, generator=g) - 3.0
        kw["is_max"] = case["is_max"]
    if case.get("length_normalize"):
        kw["length_normalize"] = True
    if "num_items" in case:
        kw["num_items"] = case["num_items"]
    if case["teacher"] == "logprobs":
        lp = torch.log_softmax(teacher.double(), -1).gather(-1, labels.clamp(0, V - 1).unsqueeze(-1))
        kw["teacher_logprobs"], teacher = lp.squeeze(-1).float(), None
    if case.get("nan"):
        student[1, 4, V - 2] = float("nan")   # in the last rank's shard: sequence 1 (a TGO) only
    if case.get("packed"):
        n = B * T
        student, labels = student.reshape(n, V), labels.reshape(n)
        teacher = None if teacher is None else teacher.reshape(n, V)
        for key in ("teacher_logprobs", "old_logprobs"):
            if key in kw:
                kw[key] = kw[key].reshape(n)
        if case["packed"] == "position_ids":   # the same four sequences, from their positions
            kw["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(CU_SEQLENS, CU_SEQLENS[1:])])[None]
        else:
            kw["cu_seqlens"] = torch.tensor(CU_SEQLENS)
    upstream = (torch.arange(1, B + 1, dtype=torch.float32) / 2 if kw["reduction"] == "none"
                else torch.tensor(1.5))
    return student, labels, teacher, kw, upstream


def _no_collective(*_args, **_kwargs):
    raise AssertionError("a collective ran in the backward")


def _run(student, labels, teacher, kw, upstream, group=None):
    leaf = student.detach().clone().requires_grad_()
    loss, stats = ak.askd_loss(leaf, labels, teacher, **kw, process_group=group)
    saved = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "broadcast", "all_to_all")}
    try:  # the backward is local: every collective raises while it runs
        for name in saved:
            setattr(dist, name, _no_collective)
        (loss * upstream).sum().backward()
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    return loss.detach(), stats, leaf.grad


def _outcome(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None


def _sharded_cases(rank, world, out_dir, names, errors):
    group = dist.group.WORLD
    widths = WIDTHS[world]
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    results = {}
    for name in names:
        student, labels, teacher, kw, upstream = _inputs(name)
        single = _run(student, labels, teacher, kw, upstream)
        shards = [None if x is None else x[..., cols] for x in (student, teacher)]
        if CASES[name].get("contiguous"):
            shards = [None if x is None else x.contiguous() for x in shards]
        sharded = _run(shards[0], labels, shards[1], kw, upstream, group)
        results[name] = dict(single=single, sharded=sharded, cols=(cols.start, cols.stop))
    if errors:
        student, labels, teacher, kw, _ = _inputs("exact")
        mine = student[..., cols]
        bad = labels.clone()
        bad[0, 1] = V                    # beyond the whole vocabulary: no shard holds it
        results["errors"] = dict(
            width=_outcome(lambda: ak.askd_loss(mine, labels, teacher[..., :1], **kw, process_group=group)),
            label=_outcome(lambda: ak.askd_loss(mine, bad, teacher[..., cols], **kw, process_group=group)),
            # a label inside another rank's shard, beyond this shard's width: valid
            other_shard=_outcome(lambda: ak.askd_loss(mine, labels.clamp(min=widths[0]), teacher[..., cols], **kw,
                                                      process_group=group)))
        # the module: the same call
        direct = ak.askd_loss(mine, labels, teacher[..., cols], **kw, process_group=group)
        module = ak.ASKDLoss(estimator="exact", process_group=group)(mine, labels, teacher[..., cols],
                                                                     **{**kw, "estimator": "exact"})
        results["module"] = (direct[0], module[0])
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _close(what, ours, single, dtype):
    """``ours`` within the module docstring's tolerance of ``single``; NaN exactly where it has NaN."""
    assert ours.shape == single.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(single.shape)}"
    ours, single = ours.double(), single.double()
    nan = torch.isnan(single)
    assert torch.equal(torch.isnan(ours), nan), f"{what}: NaN at other places than the single-process call"
    equal = (ours == single) | nan     # equal infinities included
    assert not (~equal & (torch.isinf(ours) | torch.isinf(single))).any(), f"{what}: infinities differ"
    ours, single = ours[~equal], single[~equal]
    scale = single.abs().max().item() if single.numel() else 0.0
    tol = 1e-5 * (1.0 + scale)
    if dtype != torch.float32:
        tol += torch.finfo(dtype).eps * scale
    err = (ours - single).abs().max().item() if single.numel() else 0.0
    assert err <= tol, f"{what}: max |sharded − single| = {err:.3e} > {tol:.3e}"


def _check(tmp_path, world, names, backend):
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name in names:
        student, *_ = _inputs(name)
        first = ranks[0][name]["sharded"]
        grads = []
        for r, result in enumerate(rank[name] for rank in ranks):
            (loss_1, stats_1, grad_1), (loss, stats, grad) = result["single"], result["sharded"]
            # every rank: the same bits for the loss and the stats
            assert torch.equal(loss.nan_to_num(7.0), first[0].nan_to_num(7.0)), f"{name}: loss differs on rank {r}"
            for key in stats_1:
                assert torch.equal(stats[key].nan_to_num(7.0), first[1][key].nan_to_num(7.0)), \
                    f"{name}: stats[{key!r}] differ on rank {r}"
            a, b = result["cols"]
            assert grad.dtype == student.dtype and tuple(grad.shape) == (*student.shape[:-1], b - a)
            _close(f"{name} [{backend}, {world} ranks] gradient of rank {r}", grad, grad_1[..., a:b], student.dtype)
            grads.append(grad)
        _close(f"{name} [{backend}, {world} ranks] loss", first[0], loss_1, torch.float32)
        for key in stats_1:
            _close(f"{name} [{backend}, {world} ranks] stats[{key!r}]", first[1][key], stats_1[key], torch.float32)
        assert torch.cat(grads, -1).shape == student.shape
        if CASES[name].get("nan"):   # the NaN reaches its sequence, and only it
            value = first[0]
            assert math.isnan(value[1].item()) and torch.isfinite(value[[0, 2, 3]]).all()
            assert torch.isnan(torch.cat(grads, -1)[1, 4]).all() and torch.isfinite(torch.cat(grads, -1)[0]).all()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_askd_loss_equals_the_single_process_call(tmp_path, world):
    names = tuple(CASES)
    spawn(_sharded_cases, tmp_path, world, names, True, backend="torch")
    _check(tmp_path, world, names, "torch")
    errors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["errors"] for r in range(world)]
    for e in errors:
        assert e["width"][0] == "ValueError" and "teacher_logits" in e["width"][1], e["width"]
        assert e["label"][0] == "ValueError" and "labels" in e["label"][1] and f"[0, {V})" in e["label"][1], e["label"]
        assert e["other_shard"] is None, e["other_shard"]
    for r in range(world):
        direct, module = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["module"]
        assert torch.equal(direct, module)


def test_sharded_askd_loss_triton(tmp_path):
    if not INTERPRETED:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/test_gpu.py runs the kernels)")
    names = TRITON_CASES
    spawn(_sharded_cases, tmp_path, 2, names, False, backend="triton", deadline=120.0)
    _check(tmp_path, 2, names, "triton")


def test_process_group_must_be_a_process_group():
    student = torch.randn(1, 2, 5, requires_grad=True)
    labels = torch.tensor([[1, 4]])
    for bad in ("world", 0, object()):
        with pytest.raises(TypeError, match="process_group"):
            ak.askd_loss(student, labels, torch.randn(1, 2, 5), student_generated=True, alpha=0.5,
                         process_group=bad)
        with pytest.raises(TypeError, match="process_group"):
            ak.ASKDLoss(student_generated=True, alpha=0.5, process_group=bad)(student, labels, torch.randn(1, 2, 5))
