"""Bytes the fused-linear path moves outside its GEMMs and its Triton kernels, on the CUDA code path,
counted without a GPU.

``askd_loss_from_hidden`` forms the logits chunk by chunk (``askd/fused_linear.py``). Its memory
traffic has three parts: the GEMMs (cuBLAS), the Triton stage kernels (counted by the interpreter,
``bench/traffic.py``) and everything else — copies, casts, adds, zero-fills, the bias' sums, index
ops. This module counts the last part, per aten op, by running the implementation functions of the
forward and the backward (the chunk loops ``_chunked_row_stats`` + ``run_coefficients`` and
``_chunked_backward``, not the custom ops, whose fake implementations would skip them):

* under ``FakeTensorMode`` with every tensor a fake on device ``cuda``, so the code takes its CUDA
  branches (``grad_rows.is_cuda``, the CUDA chunk budget, the Triton stages) and no memory of the
  production shape is allocated. A CPU-only torch has no CUDA device guard, which the Python bindings
  of indexing, ``copy_`` and ``contiguous`` construct; while counting, those methods of the fake
  tensors go straight to the aten ops they call on CUDA (``slice``/``select``, ``copy_``/``fill_``,
  ``clone``);
* with the Triton launchers run for real but their ``kernel[grid](...)`` launch intercepted (their
  bytes are the interpreter count's; the launchers' own torch ops, e.g. a zero-filled placeholder,
  are counted here);
* under a ``TorchDispatchMode`` above the fake mode, which sees each aten op as it would be called
  on CUDA (before the fake mode's decompositions) and tallies bytes read (tensor inputs) and written
  (outputs; the mutated tensor of an in-place or ``out=`` op). Views and allocations move nothing; a
  write-only destination (``copy_``/``fill_``/``zero_``'s ``self``, an ``out=`` argument) is not
  read; a broadcast (stride-0) dimension is counted once. GEMMs (mm/addmm/bmm/... overloads) are
  tallied apart at a nominal size: each operand read once, the output written once, ``addmm``'s
  accumulator input read once — a GEMM's real traffic depends on its tiling and is not modelled.

So the count is the DESIGNED traffic of the CUDA path outside the GEMMs and the Triton kernels
(each op's inputs read once, outputs written once: what a kernel that streams them moves), not a
measurement; the per-token glue of the op wrappers (a few fp32 vectors) is not included.

``fused_linear.ADDMM_OUT_DTYPE`` selects the weight gradient's form: "after" = ``torch.addmm(acc,
gᵀ, x, out_dtype=float32, out=acc)`` (the default), "before" = the fallback, a GEMM into an fp32
temporary and ``acc.add_(tmp)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

BATCH, SEQ, VOCAB = 8, 2048, 151936          # the static report's production shape (bf16)
HIDDEN = (1536, 3584)                        # Qwen2-1.5B, Qwen2-7B hidden sizes
# (label, hidden size, lm_head bias): the report's scenarios, askd_loss_from_hidden with
# teacher_logprobs (student head only), estimator "exact".
SCENARIOS = [(f"H={h}", h, False) for h in HIDDEN] + [(f"H={HIDDEN[0]}, with lm_head_bias", HIDDEN[0], True)]
BRANCHES = (("before", False), ("after", True))   # (label, fused_linear.ADDMM_OUT_DTYPE)

GEMM_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm", "matmul", "_scaled_mm", "mv", "addmv", "dot",
            "linear", "_addmm_activation"}
WRITE_ONLY_SELF = {"copy_", "fill_", "zero_"}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
ALIASES = {"_unsafe_view", "alias", "detach", "lift_fresh"}
LIKE_FACTORIES = {"zeros_like", "ones_like", "full_like"}   # read only their argument's shape


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a stride-0, broadcast dimension counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return 0 if t.numel() == 0 else n * t.element_size()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


@dataclasses.dataclass
class Tally:
    calls: int = 0
    read: int = 0
    written: int = 0


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read and written per aten op (``op_counts[(phase, kind, op)]``, kind "gemm" or "other")."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.op_counts: dict[tuple[str, str, str], Tally] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        name = func.overloadpacket.__name__
        if func.is_view or name in ALLOCATIONS or name in ALIASES:
            return
        schema = func._schema
        written_args, read = set(), 0
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            is_write = arg.alias_info is not None and arg.alias_info.is_write
            if is_write:
                written_args.update(id(t) for t in _tensors(value))
            if (is_write and (arg.kwarg_only or name in WRITE_ONLY_SELF)) or name in LIKE_FACTORIES:
                continue                                  # an out= destination, copy_/fill_'s self, a shape
            read += sum(tensor_bytes(t) for t in _tensors(value))
        outputs = list(_tensors(out))
        if not outputs and not written_args:
            return                                        # metadata queries
        written = sum(tensor_bytes(t) for t in outputs)
        kind = "gemm" if name in GEMM_OPS else "other"
        tally = self.op_counts.setdefault((self.phase, kind, func.name().replace("aten::", "")), Tally())
        tally.calls += 1
        tally.read += read
        tally.written += written


# ---- the CUDA code path on fake tensors -----------------------------------------------------------

_aten = torch.ops.aten


def _getitem(self, index):
    """Basic indexing (ints, slices, None) through ``aten.select``/``slice``/``unsqueeze``; one
    tensor index through ``aten.index`` — the ops the Python binding dispatches on CUDA."""
    if isinstance(index, torch.Tensor):
        return _aten.index.Tensor(self, [index])
    out, dim = self, 0
    for i in index if isinstance(index, tuple) else (index,):
        if i is None:
            out = _aten.unsqueeze.default(out, dim)
            dim += 1
        elif isinstance(i, slice):
            out = _aten.slice.Tensor(out, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            out = _aten.select.int(out, dim, i)
        else:
            raise NotImplementedError(f"index {index!r} on a fake CUDA tensor")
    return out


def _setitem(self, index, value):
    target = _getitem(self, index)
    if isinstance(value, torch.Tensor):
        _aten.copy_.default(target, value)
    else:
        _aten.fill_.Scalar(target, value)


def _copy_(self, src, non_blocking=False):
    return _aten.copy_.default(self, src, non_blocking)


def _contiguous(self, memory_format=torch.contiguous_format):
    if self.is_contiguous(memory_format=memory_format):
        return self
    return _aten.clone.default(self, memory_format=memory_format)


@contextlib.contextmanager
def _patched(obj, **attrs):
    """Set attributes of ``obj`` for the block; restore (or remove) them afterwards."""
    missing = object()
    own = {name: vars(obj).get(name, missing) for name in attrs}   # not what a class or type provides
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in own.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def fake_cuda():
    """A ``FakeTensorMode`` in which tensors created on ``cuda`` work on a CPU-only torch (see the
    module docstring); yields the mode."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(FakeTensor, __getitem__=_getitem, __setitem__=_setitem, copy_=_copy_,
                                     contiguous=_contiguous))
        yield stack.enter_context(FakeTensorMode())


TRITON_KERNELS = (("askd_kernels.askd.triton_row_stats", "_row_stats_kernel"),
                  ("askd_kernels.askd.triton_row_stats", "_full_vocab_row_stats_kernel"),
                  ("askd_kernels.askd.triton_gradient", "_gradient_kernel"),
                  ("askd_kernels.askd.triton_gradient", "_full_vocab_gradient_kernel"),
                  ("askd_kernels.askd.triton_coefficients", "_coefficients_kernel"))


@contextlib.contextmanager
def triton_launches_intercepted():
    """The ASKD family's Triton launchers run, their ``kernel[grid](...)`` launches do not; yields the
    list of ``(kernel, grid)`` launched."""
    import importlib

    launched = []
    with contextlib.ExitStack() as stack:
        for module, name in TRITON_KERNELS:
            kernel = getattr(importlib.import_module(module), name)

            def run(*args, grid, warmup=False, _name=name, **kwargs):
                launched.append((_name, tuple(grid)))

            stack.enter_context(_patched(kernel, run=run))
        yield launched


@dataclasses.dataclass
class Count:
    """One counted forward + backward: per (phase, kind, op) tallies, the logit elements and the
    Triton launches (whose traffic is the interpreter count's, not here)."""
    B: int
    T: int
    V: int
    H: int
    bias: bool
    addmm_out_dtype: bool
    chunk_rows: int
    chunks: int
    op_counts: dict
    launches: list

    @property
    def elements(self) -> int:
        return self.B * self.T * self.V

    def bytes(self, kind="other", phase=None, op=None) -> int:
        return sum(t.read + t.written for (ph, k, o), t in self.op_counts.items()
                   if k == kind and (phase is None or ph == phase) and (op is None or o == op))

    def per_element(self, kind="other", phase=None, op=None) -> float:
        return self.bytes(kind, phase, op) / self.elements


def count(B=BATCH, T=SEQ, V=VOCAB, H=HIDDEN[0], *, bias=False, addmm_out_dtype=True,
          dtype=torch.bfloat16) -> Count:
    """Count the fused-linear forward + backward of ``askd_loss_from_hidden`` (teacher_logprobs,
    estimator "exact", every gradient needed) on fake CUDA tensors ``hidden [B, T, H]``,
    ``weight [V, H]`` (and ``bias [V]``) of ``dtype``."""
    from askd_kernels.askd import fused_linear as fl
    from askd_kernels.askd import ops, triton_coefficients, triton_gradient, triton_row_stats

    triton_stages = ops.Stages(triton_row_stats.row_stats, triton_coefficients.coefficients,
                               triton_gradient.student_gradient, triton_row_stats.full_vocab_row_stats,
                               triton_gradient.full_vocab_gradient)
    counter = OpCounter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(fl, ADDMM_OUT_DTYPE=addmm_out_dtype, stages=lambda device: triton_stages))
        launches = stack.enter_context(triton_launches_intercepted())
        stack.enter_context(fake_cuda())
        dev = torch.device("cuda")
        hidden = torch.empty((B, T, H), dtype=dtype, device=dev)
        weight = torch.empty((V, H), dtype=dtype, device=dev)
        lm_bias = torch.empty((V,), dtype=dtype, device=dev) if bias else None
        labels = torch.empty((B, T), dtype=torch.int64, device=dev)
        tlp = torch.empty((B, T), dtype=torch.float32, device=dev)
        sgo = torch.empty((B,), dtype=torch.bool, device=dev)
        alpha, kappa = (torch.empty((B,), dtype=torch.float32, device=dev) for _ in range(2))
        assert hidden.is_cuda and hidden.device.type == "cuda"
        head = fl.Head(hidden, weight, lm_bias)
        with counter:
            counter.phase = "forward"
            log_q, log_ratio, lse = fl._chunked_row_stats(head, labels, tlp, None, 1.0, -100)
            _lam, coef, _value = fl.run_coefficients(triton_stages, log_q, log_ratio, labels, sgo, alpha, kappa,
                                                     None, None, math.inf, "exact", 1.0, False, -100)
            counter.phase = "backward"
            fl._chunked_backward(head, labels, coef, lse, 1.0, -100, True, True, bias)
        launched = list(launches)
    step = fl.chunk_rows(V, H)
    return Count(B, T, V, H, bias, addmm_out_dtype, step, -(-(B * T) // step), counter.op_counts, launched)


# ---- the report's section -------------------------------------------------------------------------

OP_FIELDS = ["scenario", "branch", "phase", "kind", "op", "calls", "bytes_read", "bytes_written",
             "bytes_per_elem"]
SUMMARY_FIELDS = ["scenario", "B", "T", "V", "H", "chunk_rows", "chunks", "outside_before", "outside_after",
                  "after_over_before", "gemm_nominal_before", "gemm_nominal_after", "total_before", "total_after",
                  "weight_gemm_before", "weight_gemm_after", "triton_launches"]


def _weight_gemms(c: Count) -> set[str]:
    """The backward GEMMs other than ``grad_hidden``'s ``mm.out`` and the logits' recompute."""
    return {op for (phase, kind, op) in c.op_counts if phase == "backward" and kind == "gemm"
            and op not in ("mm.out", "mm", "addmm")}


def build(scenarios=SCENARIOS, B=BATCH, T=SEQ, V=VOCAB) -> tuple[list[dict], list[dict]]:
    """``(summary rows, per-op rows)``: bytes per logit element outside the GEMMs, before → after."""
    summary, per_op = [], []
    for label, H, bias in scenarios:
        counts = {branch: count(B, T, V, H, bias=bias, addmm_out_dtype=flag) for branch, flag in BRANCHES}
        before, after = counts["before"], counts["after"]
        summary.append({
            "scenario": label, "B": B, "T": T, "V": V, "H": H, "chunk_rows": after.chunk_rows,
            "chunks": after.chunks, "outside_before": before.per_element(), "outside_after": after.per_element(),
            "after_over_before": after.bytes() / before.bytes(),
            "gemm_nominal_before": before.per_element("gemm"), "gemm_nominal_after": after.per_element("gemm"),
            "total_before": before.per_element() + before.per_element("gemm"),
            "total_after": after.per_element() + after.per_element("gemm"),
            # the weight gradient's GEMM op of each form: a fallback taken silently would show here
            **{f"weight_gemm_{b}": " ".join(sorted(_weight_gemms(c))) or "-" for b, c in counts.items()},
            "triton_launches": len(after.launches)})
        for branch, c in counts.items():
            for (phase, kind, op), t in sorted(c.op_counts.items()):
                per_op.append({"scenario": label, "branch": branch, "phase": phase, "kind": kind, "op": op,
                               "calls": t.calls, "bytes_read": t.read, "bytes_written": t.written,
                               "bytes_per_elem": (t.read + t.written) / c.elements})
    return summary, per_op


def _f(v, digits=4):
    return f"{v:.1e}" if 0 < abs(v) < 10 ** -digits * 5 else f"{v:.{digits}f}"


def markdown(summary: list[dict], per_op: list[dict]) -> str:
    """The report's section: the summary table, then the outside-GEMM ops before → after."""
    lines = ["### Fused linear (askd_loss_from_hidden): traffic outside the GEMMs (counted, CUDA path)", "",
             "COUNTED, not measured: the designed bytes of the aten ops the CUDA code path of the chunk loops "
             "calls outside the GEMMs and the Triton kernels (each op's inputs read once, outputs written once), "
             "from a run on fake CUDA tensors (bench/fused_traffic.py); per logit element (B·T·V), forward + "
             "backward, bf16, teacher_logprobs, every gradient. Before = the weight gradient as a GEMM into an "
             "fp32 temporary + `add_`; after = `addmm(acc, gᵀ, x, out_dtype=float32, out=acc)`. The GEMM column "
             "is nominal (each operand once), for reference; the Triton kernels' bytes are in the tables above.",
             "",
             "| scenario | B·T | V | rows/chunk × chunks | outside GEMMs B/elem, before → after | after / before "
             "| GEMMs (nominal) B/elem, before → after | both, before → after "
             "| weight-gradient GEMM, before → after | Triton launches (not counted here) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append("| " + " | ".join([
            s["scenario"], str(s["B"] * s["T"]), str(s["V"]), f"{s['chunk_rows']} × {s['chunks']}",
            f"{_f(s['outside_before'])} → {_f(s['outside_after'])}", _f(s["after_over_before"], 3),
            f"{_f(s['gemm_nominal_before'], 2)} → {_f(s['gemm_nominal_after'], 2)}",
            f"{_f(s['total_before'], 2)} → {_f(s['total_after'], 2)}",
            f"`{s['weight_gemm_before']}` → `{s['weight_gemm_after']}`", str(s["triton_launches"])])
            + " |")
    lines += ["", "Outside the GEMMs, by op (B/elem; calls):", "",
              "| scenario | phase | op | before | after |", "|---|---|---|---|---|"]
    for s in summary:
        rows = [r for r in per_op if r["scenario"] == s["scenario"] and r["kind"] == "other"]
        keys = sorted({(r["phase"], r["op"]) for r in rows}, key=lambda k: (k[0] != "forward", k[1]))
        for phase, op in keys:
            cell = {}
            for branch, _ in BRANCHES:
                r = next((r for r in rows if r["branch"] == branch and r["phase"] == phase and r["op"] == op), None)
                cell[branch] = "-" if r is None else f"{_f(r['bytes_per_elem'])} ({r['calls']})"
            lines.append(f"| {s['scenario']} | {phase} | `{op}` | {cell['before']} | {cell['after']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    summary, per_op = build()
    print(markdown(summary, per_op))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
