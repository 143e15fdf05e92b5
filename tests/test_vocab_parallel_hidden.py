"""Vocabulary parallelism of ``askd_loss_from_hidden`` and ``token_logprobs`` (``process_group=``).

Each spawned rank (``tests/_spawn.py``: gloo on CPU) holds a contiguous, uneven row-slice of the
lm_head weight (and of its bias, and of the teacher head's weight and bias); the hidden states and
the global labels are the same everywhere. Against the single-process call on the full weight, run
in the same process with the same backend:

* the loss (and the stats) equal on every rank and equal to the single-process one;
* ``grad_hidden`` equal on every rank (bit for bit: one all_reduce) and to the single-process one;
* each rank's ``grad_weight`` / ``grad_bias`` equal to its rows of the single-process ones;

for 2 and 3 ranks, V = 23 in shards of (9, 14) and (5, 11, 7) rows, several chunks of rows per
call on every rank (the chunk budget lowered as in ``test_fused_linear.py``; 11-token sequences, so
chunks straddle them), with and without bias, the teacher as ``teacher_logprobs`` and as a sharded
head, ignored positions, fp32 and bf16, every estimator (rao_blackwell with its second pass and
all_reduce), reduction "none" with per-sequence upstream gradients, a NaN hidden state (NaN in its
sequence only, as on one device) and a frozen lm_head (grad_hidden alone, the same). The inputs are
never written. ``token_logprobs`` the same way. Bad inputs are rejected on every rank: shapes before
any collective, labels beyond the whole vocabulary after the widths' exchange. The Triton kernels
(interpreted) run a rao_blackwell case and ``token_logprobs`` on 2 ranks.

Tolerances. Both sides are correct evaluations of the same function: the logits are the same GEMM
rows (rounded identically to the inputs' dtype), everything after them is fp32 in a different
order — the sharded log-sum-exp is a combination of per-shard pairs, grad_hidden a sum of fp32
partials. That is the situation ``_compare.py``'s slack covers: ``RTOL_FP32 · (1 + scale)`` for
two fp32 evaluations in different orders (rows of ≤ 23 entries, scans over ≤ 11 positions). Results
stored in bf16 are each within half an ulp of their fp32 value, so two of them within one ulp
(``eps · scale``); and the bf16 gradient of the logits, from which both sides form the parameter
gradients, may round the other way at an entry, moving the result by at most one ulp of that
entry times what it multiplies: ``eps · (|G| @ |W|)`` for grad_hidden, ``eps · (|G|ᵀ @ |h|)`` for
grad_weight, ``eps · Σ|G|`` for grad_bias, with G the bf16 gradient of the materialised logits.
"""
import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from _backends import INTERPRETED
from _compare import RTOL_FP32
from _spawn import spawn

import askd_kernels as ak
from askd_kernels.askd import fused_linear

V, H, H_T, B, T = 23, 8, 5, 2, 11
CHUNK_ROWS = 4                       # single process: chunks of 4 rows; a shard: min(H, 4·V // width)
WIDTHS = {2: (9, 14), 3: (5, 11, 7)}
SGO = torch.tensor([True, False])

CASES = {
    "fp32-bias-logprobs-exact": dict(dtype=torch.float32, bias=True, head=False),
    "bf16-nobias-head-paper-none": dict(dtype=torch.bfloat16, bias=False, head=True, estimator="paper",
                                        clip=torch.tensor([True, False]), temperature=0.7, reduction="none"),
    "fp32-nobias-head-sequence-sum": dict(dtype=torch.float32, bias=False, head=True, estimator="sequence",
                                          reduction="sum", old_logprobs=torch.full((B, T), -3.0), is_max=1.5),
    "bf16-bias-logprobs-exact-baseline": dict(dtype=torch.bfloat16, bias=True, head=False, gamma=0.9,
                                              baseline_groups=torch.tensor([0, 0]), num_items=7),
    "fp32-bias-head-exact-tau2": dict(dtype=torch.float32, bias=True, head=True, temperature=2.0,
                                      student_generated=torch.tensor([False, True])),
    "bf16-head-rao-blackwell-baseline": dict(dtype=torch.bfloat16, bias=True, head=True, estimator="rao_blackwell",
                                             gamma=0.9, baseline_groups=torch.tensor([0, 0]),
                                             old_logprobs=torch.full((B, T), -3.0), is_max=1.5),
    "fp32-head-rao-blackwell-gamma0-clip": dict(dtype=torch.float32, bias=False, head=True,
                                                estimator="rao_blackwell", gamma=0.0, temperature=0.7,
                                                clip=torch.tensor([True, False]), reduction="none",
                                                student_generated=torch.tensor([True, True])),
    # NaN in, NaN out: a NaN hidden state poisons its sequence's value and the gradient rows it
    # reaches, on one rank's shard as on the full weight; the other sequence is untouched.
    "fp32-nan-hidden-none": dict(dtype=torch.float32, bias=True, head=False, reduction="none", nan=True),
}
TRITON_CASES = ("fp32-head-rao-blackwell-gamma0-clip",)  # the interpreter is slow; + token_logprobs in fp32


def _inputs(seed, dtype, bias, head, nan=False):
    """The full tensors, drawn identically on every rank."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100                                  # a prompt
    labels[torch.rand(B, T, generator=g) < 0.2] = -100    # and holes
    if nan:
        hidden[1, 6, 3], labels[1, 6] = float("nan"), 3
    teacher = dict(teacher_logprobs=torch.randn(B, T, generator=g) - 3.0)
    if head:
        teacher = dict(teacher_hidden=torch.randn(B, T, H_T, generator=g).to(dtype),
                       teacher_lm_head_weight=(torch.randn(V, H_T, generator=g) / 2).to(dtype),
                       teacher_lm_head_bias=torch.randn(V, generator=g).to(dtype) if bias else None)
    kw = dict(student_generated=SGO, alpha=torch.rand(B, generator=g))
    upstream = torch.rand(B, generator=g) * 2 + 0.5
    return (hidden, weight, b), labels, teacher, kw, upstream


def _rows(x, rows):
    return None if x is None else x[rows]


def _run(fn, params, upstream):
    """``fn`` on fresh leaves; the value, the stats if any and the leaves' gradients."""
    leaves = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    out = fn(*leaves)
    loss, stats = out if isinstance(out, tuple) else (out, {})
    (loss * upstream.view(-1, *[1] * (loss.dim() - 1)) if loss.dim() else loss * upstream.sum()).sum().backward()
    for leaf, p in zip(leaves, params):  # nothing written into the inputs
        if p is not None:
            torch.testing.assert_close(leaf.detach(), p, rtol=0, atol=0, equal_nan=True)
    return dict(value=loss.detach(), **{k: v.detach() for k, v in stats.items()},
                grads=[None if p is None else p.grad for p in leaves])


@contextlib.contextmanager
def _counting_collectives():
    """Counts the gathers and all_reduces of the calls inside (wrapping, not replacing, them)."""
    import torch.distributed as dist

    from askd_kernels import distributed

    count = {"gather_rows": 0, "all_reduce": 0}
    saved = distributed.gather_rows, dist.all_reduce

    def gather_rows(*args, **kwargs):
        count["gather_rows"] += 1
        return saved[0](*args, **kwargs)

    def all_reduce(*args, **kwargs):
        count["all_reduce"] += 1
        return saved[1](*args, **kwargs)

    distributed.gather_rows, dist.all_reduce = gather_rows, all_reduce
    try:
        yield count
    finally:
        distributed.gather_rows, dist.all_reduce = saved


def _logit_grad(params, fn, upstream):
    """G: the gradient of the materialised logits in the inputs' dtype (for the bf16 bounds)."""
    logits = F.linear(*params).detach().requires_grad_()
    out = fn(logits)
    out = out[0] if isinstance(out, tuple) else out
    (out * upstream.view(-1, *[1] * (out.dim() - 1)) if out.dim() else out * upstream.sum()).sum().backward()
    return logits.grad


def _child(rank, world, out_dir, names=None):
    import torch.distributed as dist

    group = dist.group.WORLD
    widths = WIDTHS[world]
    start = sum(widths[:rank])
    rows = slice(start, start + widths[rank])
    results = {}
    for seed, (name, spec) in enumerate(CASES.items()):
        if names is not None and name not in names:
            continue
        spec = dict(spec)
        dtype, bias, head = spec.pop("dtype"), spec.pop("bias"), spec.pop("head")
        params, labels, teacher, kw, upstream = _inputs(seed, dtype, bias, head, spec.pop("nan", False))
        kw.update(spec)
        shard_teacher = dict(teacher)
        if head:
            shard_teacher["teacher_lm_head_weight"] = teacher["teacher_lm_head_weight"][rows]
            shard_teacher["teacher_lm_head_bias"] = _rows(teacher["teacher_lm_head_bias"], rows)

        def loss(h, w, b, group=None, teacher=teacher):
            return ak.askd_loss_from_hidden(h, w, labels, lm_head_bias=b, **teacher, **kw, return_stats=True,
                                            process_group=group)

        fused_linear.LOGITS_CHUNK_ELEMENTS = CHUNK_ROWS * V
        single = _run(loss, params, upstream)
        with _counting_collectives() as count:
            sharded = _run(lambda h, w, b: loss(h, w, b, group, shard_teacher),
                           (params[0], params[1][rows], _rows(params[2], rows)), upstream)
        sharded["collectives"] = dict(count)

        def materialised(logits):
            t = dict(teacher)
            if head:
                t = dict(teacher_logits=F.linear(t.pop("teacher_hidden"), t.pop("teacher_lm_head_weight"),
                                                 t.pop("teacher_lm_head_bias")))
            return ak.askd_loss(logits, labels, **t, **kw)

        results[name] = dict(single=single, sharded=sharded, params=params, rows=rows,
                             G=None if dtype == torch.float32 else _logit_grad(params, materialised, upstream))
        if seed == 0:  # a frozen lm_head: only hidden gets a gradient, through the same all_reduce
            hidden = params[0].detach().clone().requires_grad_()
            value = loss(hidden, params[1][rows], _rows(params[2], rows), group, shard_teacher)[0]
            (value * upstream.sum()).backward()
            results[name]["frozen_grad_hidden"] = hidden.grad

    for bias, dtype in ((True, torch.float32), (False, torch.bfloat16))[:1 if names else 2]:
        params, labels, _teacher, _kw, _up = _inputs(50 + bias, dtype, bias, False)
        upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(7))

        def logprobs(h, w, b, group=None):
            return ak.token_logprobs(h, w, labels, lm_head_bias=b, temperature=0.7, process_group=group)

        def run(fn, params):
            leaves = [None if p is None else p.detach().clone().requires_grad_() for p in params]
            out = fn(*leaves)
            (out * upstream).sum().backward()
            return dict(value=out.detach(), grads=[None if p is None else p.grad for p in leaves])

        def materialised(logits):
            logp = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
            return (torch.where(labels != -100, logp.squeeze(-1), 0.0) * upstream).sum()

        logits = F.linear(*params).detach().requires_grad_()
        materialised(logits).backward()
        results[f"token_logprobs-{dtype}-bias{bias}"] = dict(
            single=run(logprobs, params), params=params, rows=rows, G=None if dtype == torch.float32 else logits.grad,
            sharded=run(lambda h, w, b: logprobs(h, w, b, group), (params[0], params[1][rows], _rows(params[2], rows))))

    results["errors"] = _error_cases(rows, group)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _error_cases(rows, group):
    """Bad inputs with a real group, rejected the same way on every rank: the shapes before any
    collective; the labels, whose bound is the whole vocabulary, after the widths' exchange."""
    from askd_kernels import distributed

    def collective(*args, **kwargs):
        raise AssertionError("a collective ran on invalid input")

    params, labels, teacher, kw, _ = _inputs(0, torch.float32, True, True)
    outside = labels.clone()
    outside[0, 5] = V  # beyond the last shard
    base = dict(student_hidden=params[0], lm_head_weight=params[1][rows], labels=labels,
                lm_head_bias=params[2][rows], process_group=group, teacher_logprobs=torch.zeros(B, T), **kw)
    head = dict(teacher_logprobs=None, teacher_hidden=teacher["teacher_hidden"])
    early = {
        "teacher-width": (dict(head, teacher_lm_head_weight=teacher["teacher_lm_head_weight"]),
                          "teacher_lm_head_weight"),
        "bias-width": (dict(lm_head_bias=params[2]), "lm_head_bias"),
    }
    late = {"labels-outside": (dict(labels=outside), "labels")}

    def outcome(fn, kwargs, word):
        try:
            fn(**kwargs)
            return "no error"
        except (TypeError, ValueError) as e:
            return type(e).__name__, bool(re.search(rf"\b{word}\b", str(e)))

    out = {}
    saved = distributed.vocab_shard, distributed.gather_rows, distributed.all_reduce_sum
    distributed.vocab_shard = distributed.gather_rows = distributed.all_reduce_sum = collective
    try:
        for name, (overrides, word) in early.items():
            out[name] = outcome(ak.askd_loss_from_hidden, {**base, **overrides}, word)
    finally:
        distributed.vocab_shard, distributed.gather_rows, distributed.all_reduce_sum = saved
    for name, (overrides, word) in late.items():
        out[name] = outcome(ak.askd_loss_from_hidden, {**base, **overrides}, word)
    out["token_logprobs-labels-outside"] = outcome(
        ak.token_logprobs, dict(hidden=params[0], weight=params[1][rows], labels=outside, process_group=group),
        "labels")
    return out


def _tolerances(dtype, single, G, params):
    """Per-entry bounds of |sharded − single| for (value, grad_hidden, grad_weight, grad_bias): see the
    module docstring."""
    def slack(t, stored=False, bound=None):
        t = torch.nan_to_num(t.double(), nan=0.0)  # NaN entries must be NaN on both sides (checked apart)
        scale = t.abs().max().item() if t.numel() else 0.0
        tol = torch.full(t.shape, RTOL_FP32 * (1 + scale), dtype=torch.float64)
        if stored and dtype != torch.float32:
            tol += torch.finfo(dtype).eps * (scale + torch.nan_to_num(bound, nan=0.0))
        return tol

    if dtype == torch.float32:
        return tuple(None if t is None else slack(t) for t in (single["value"], *single["grads"]))
    hidden, weight, _ = (None if p is None else p.double() for p in params)
    g = G.double().abs().reshape(-1, G.shape[-1])
    return (slack(single["value"]),
            slack(single["grads"][0], True, (g @ weight.abs()).view(hidden.shape)),
            slack(single["grads"][1], True, g.T @ hidden.abs().reshape(-1, H)),
            None if single["grads"][2] is None else slack(single["grads"][2], True, g.sum(0)))


def _assert_close(name, got, want, tol):
    err = (got.double() - want.double()).abs()
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    assert bool((torch.isnan(got) == torch.isnan(want)).all()), name
    ok = torch.nan_to_num(err, nan=0.0) <= tol
    assert bool(ok.all()), f"{name}: max error {err.max().item():.3e}, worst excess {(err - tol).max().item():.3e}"


def _check(tmp_path, world):
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name in results[0]:
        if name == "errors":
            for r in range(world):
                assert results[r]["errors"] == dict.fromkeys(
                    ("teacher-width", "bias-width", "labels-outside", "token_logprobs-labels-outside"),
                    ("ValueError", True)), results[r]["errors"]
            continue
        first = results[0][name]
        dtype = first["params"][0].dtype
        single = first["single"]
        tol_value, tol_h, tol_w, tol_b = _tolerances(dtype, single, first["G"], first["params"])
        for r, res in enumerate(results):
            sharded, rows = res[name]["sharded"], res[name]["rows"]
            where = f"{name} rank {r}/{world}"
            # the same on every rank, bit for bit: replicated stage (b), one all_reduce of grad_hidden
            torch.testing.assert_close(sharded["value"], first["sharded"]["value"], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(sharded["grads"][0], first["sharded"]["grads"][0], rtol=0, atol=0,
                                       equal_nan=True)
            _assert_close(f"{where} value", sharded["value"], single["value"], tol_value)
            for key in ("log_q", "log_ratio", "lam", "coef"):
                if key in single:
                    _assert_close(f"{where} {key}", sharded[key], single[key],
                                  RTOL_FP32 * (1 + single[key].nan_to_num(nan=0.0).abs().max()))
            _assert_close(f"{where} grad_hidden", sharded["grads"][0], single["grads"][0], tol_h)
            _assert_close(f"{where} grad_weight", sharded["grads"][1], single["grads"][1][rows], tol_w[rows])
            if single["grads"][2] is None:
                assert sharded["grads"][2] is None
            else:
                _assert_close(f"{where} grad_bias", sharded["grads"][2], single["grads"][2][rows], tol_b[rows])
            if name in CASES and "nan" not in name:  # every rank's shard got a gradient at all (a live test)
                assert sharded["grads"][1].abs().sum() > 0, where
            if name in CASES:  # one gather for the whole batch (+ rao_blackwell's all_reduce), one all_reduce back
                rao = CASES[name].get("estimator") == "rao_blackwell"
                assert sharded["collectives"] == {"gather_rows": 1, "all_reduce": 1 + rao}, (where,
                                                                                              sharded["collectives"])
            if "frozen_grad_hidden" in res[name]:
                torch.testing.assert_close(res[name]["frozen_grad_hidden"], sharded["grads"][0], rtol=0, atol=0)
            if "nan" in name:  # sequence 1 is NaN (value and gradient rows), sequence 0 untouched
                assert torch.isnan(sharded["value"]).tolist() == [False, True], where
                assert not bool(torch.isnan(sharded["grads"][0][0]).any()), where


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process_torch(tmp_path, world):
    spawn(_child, tmp_path, world, backend="torch")
    _check(tmp_path, world)


@pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_sharded_equals_single_process_triton(tmp_path):
    spawn(_child, tmp_path, 2, TRITON_CASES, backend="triton", deadline=150.0)
    _check(tmp_path, 2)


def test_bad_process_group_type(no_kernels):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    with pytest.raises(TypeError, match=r"\bprocess_group\b"):
        ak.askd_loss_from_hidden(hidden, weight, labels, teacher_logprobs=torch.zeros(B, T), student_generated=SGO,
                                 alpha=0.5, process_group="gloo")
    with pytest.raises(TypeError, match=r"\bprocess_group\b"):
        ak.token_logprobs(hidden, weight, labels, process_group=0)


def test_signature_lists_process_group():
    import inspect

    params = inspect.signature(ak.askd_loss_from_hidden).parameters
    assert params["process_group"].default is None
    assert inspect.signature(ak.token_logprobs).parameters["process_group"].default is None
