"""Static performance report: what the compiled kernels cost, read from their SASS, without a GPU.

``python -m bench static`` (or :func:`report`) compiles every kernel specialisation the benchmark
shapes launch (bf16, B = 8, T = 2048, V = 151936 and V = 151943) for sm_90 (H100) and sm_80 (A100),
and reports per kernel: registers, spills/stack, shared memory, occupancy, and per loop of the SASS
the instructions and MUFU ops per element and the width of every global load/store; plus the bytes
per element the kernels move (``bench/traffic.py``, counted under the interpreter) and a PREDICTED
time and % of the DRAM roofline from the small model below. A last section COUNTS the bytes the
fused-linear path (``askd_loss_from_hidden``) moves outside its GEMMs and Triton kernels on the CUDA
code path, before → after the weight gradient's ``addmm(out_dtype=)`` (``bench/fused_traffic.py``,
fake CUDA tensors). Nothing here is measured on a GPU.

Specialisation. The launchers themselves are called (``row_stats``, ``student_gradient``, ...) with
tensors on the ``meta`` device shaped and strided like the benchmark's; the ``kernel[grid](...)``
call is intercepted and its arguments go through Triton's own launch binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, the code ``JITFunction.run`` uses),
so the signature, the constexprs (ints equal to 1 included) and the divisibility-by-16 attributes of
pointers, sizes and strides are exactly those of a real launch. Meta tensors have ``data_ptr() == 0``
(aligned), as every CUDA caching-allocator block is (256-byte aligned).

Loops. A loop is a backward ``BRA`` in ``cuobjdump -sass``; its body is the instructions from the
target to the branch. Per loop: ``instr/elem`` = body instructions / elements per thread per
iteration (``BLOCK / (32 · num_warps)``): thread-level SASS instructions per element, assuming every
instruction of the body is issued (predicated-off or skipped instructions included: an upper bound);
``mufu/elem`` likewise for ``MUFU.*``; ``bytes/elem`` from the widths of the body's ``LDG``/``STG``.

Model (per loop, elements = rows × V; per kernel the sum over the loops a row runs, the mean over
mutually exclusive branches such as the SGO/TGO ones of the rao_blackwell kernels):

    t_dram  = elements × bytes/elem / (DRAM_EFFICIENCY × peak bandwidth)
    t_issue = elements × instr/elem / 32 / (SMs × 4 schedulers × clock × IPC)
    t_mufu  = elements × mufu/elem / (SMs × 16 MUFU results per clock × clock)
    t_loop  = max(t_dram, t_issue, t_mufu)

and "% of DRAM roofline" = (kernel bytes from the interpreter count / peak bandwidth) / predicted
time, at IPC = 0.7 and at the ends of the model's range, IPC = 0.5 (pessimistic) and 1.0 (optimistic).
:data:`PAIRS` adds up forward + backward (askd's stage (a) + stage (c), rao_blackwell's, each
divergence kind's) per shape and target. Constants in :data:`GPUS`, :data:`IPC`,
:data:`IPC_PESSIMISTIC`, :data:`IPC_OPTIMISTIC`, :data:`DRAM_EFFICIENCY`. Ignored: launch and tail
effects, the prologue/epilogue outside the loops, latency hiding limits at low occupancy, L2 hits
on a second pass over a row (a 300 KB bf16 row pair × hundreds of rows in flight exceeds L2).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "static"
BATCH, SEQ = 8, 2048
VOCABS = (151936, 151943)        # V % 16 == 0 (Qwen2) and V % 16 != 0
TARGETS = (90, 80)
DIVERGENCE_KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")

# Issue-rate assumption: warp instructions per scheduler per clock actually achieved (peak 1).
IPC = 0.7
# The model's range: the same prediction at a pessimistic and at an optimistic issue rate (the peak).
IPC_PESSIMISTIC, IPC_OPTIMISTIC = 0.5, 1.0
# Fraction of peak DRAM bandwidth a streaming kernel reaches (a device-to-device copy: ~90%).
DRAM_EFFICIENCY = 0.9
MUFU_PER_SM_CLOCK = 16           # CUDA C Programming Guide, arithmetic throughput table, cc 8.0 / 9.0


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    sm: int                      # compile target (compute capability × 10)
    sms: int
    clock_ghz: float             # boost clock
    dram_tbps: float             # peak DRAM bandwidth, TB/s
    smem_per_sm: int             # shared memory per SM available to CTAs, bytes
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_reserved_per_cta: int = 1024


GPUS = {
    90: Gpu("H100 SXM", 90, 132, 1.98, 3.35, 228 * 1024),
    80: Gpu("A100 SXM", 80, 108, 1.41, 2.0, 164 * 1024),
}


# ---------------------------------------------------------------------------------------------
# The launches: each builds the benchmark's tensors on ``device`` and calls the real launcher.

@dataclasses.dataclass(frozen=True)
class Launch:
    name: str                    # kernel id in the report, e.g. "divergence_forward[jsd]"
    kernel: str                  # "module:attribute" of the JITFunction
    rows_per_program: int        # vocabulary rows one program streams (1), or 0 for per-sequence kernels
    alternatives: int = 0        # trailing loops that are mutually exclusive branches (one runs per row)
    call: object = None          # call(device, B, T, V) -> runs the launcher


def _vectors(device, B, T, V, dtype):
    import torch
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dt=torch.float32):
        if device == "meta":
            return torch.empty(shape, dtype=dt, device="meta")
        return torch.randn(shape, generator=gen).to(dt)

    def full(shape, value, dt=torch.float32):
        return torch.full(shape, value, dtype=dt, device=device)

    student, teacher = rand(B, T, V, dt=dtype), rand(B, T, V, dt=dtype)
    if device == "meta":
        labels = torch.empty((B, T), dtype=torch.int64, device="meta")
    else:
        labels = torch.randint(0, V, (B, T), generator=gen)
    sgo = (torch.arange(B, device=device) % 2).to(torch.int32)
    return dict(student=student, teacher=teacher, labels=labels, sgo=sgo, alpha=full((B,), 0.4),
                kappa=full((B,), 1.0), log_w=full((B, 2), -0.7), vec=full((B * T,), -1.0),
                pairs=full((B * T, 2), 0.5), g_seq=full((B,), 1.0), g_tok=full((B * T,), 1.0))


def _launches() -> list[Launch]:
    from askd_kernels.askd import triton_coefficients as co
    from askd_kernels.askd import triton_gradient as gr
    from askd_kernels.askd import triton_row_stats as rs
    from askd_kernels.divergence import triton as dv

    def args(device, B, T, V):
        import torch
        return _vectors(device, B, T, V, torch.bfloat16)

    def row_stats(device, B, T, V):
        a = args(device, B, T, V)
        rs.row_stats(a["student"], a["labels"], a["teacher"], None, temperature=1.0, ignore_index=-100)
        return a

    def coefficients(device, B, T, V):
        a = args(device, B, T, V)
        co.coefficients(a["vec"], a["vec"], a["vec"], a["labels"], a["alpha"], a["sgo"], a["kappa"],
                        estimator="exact", gamma=1.0, w_max=2.0, length_normalize=False, ignore_index=-100)
        return a

    def gradient(device, B, T, V):
        a = args(device, B, T, V)
        gr.student_gradient(a["student"], a["labels"], a["vec"], a["pairs"], a["g_seq"], temperature=1.0)
        return a

    def fv_row_stats(device, B, T, V):
        a = args(device, B, T, V)
        rs.full_vocab_row_stats(a["student"], a["labels"], a["teacher"], a["alpha"], a["sgo"], a["kappa"],
                                temperature=1.0, ignore_index=-100)
        return a

    def fv_gradient(device, B, T, V):
        a = args(device, B, T, V)
        gr.full_vocab_gradient(a["student"], a["labels"], a["teacher"], a["vec"], a["pairs"], a["pairs"],
                               a["vec"], a["alpha"], a["sgo"], a["kappa"], a["g_seq"], temperature=1.0,
                               ignore_index=-100)
        return a

    def div_forward(kind):
        def call(device, B, T, V):
            a = args(device, B, T, V)
            dv.forward(a["student"], a["teacher"], a["labels"], a["kappa"], a["log_w"], kind=kind,
                       temperature=1.0, ignore_index=-100)
            return a
        return call

    def div_backward(kind):
        def call(device, B, T, V):
            a = args(device, B, T, V)
            dv.backward(a["student"], a["teacher"], a["labels"], a["kappa"], a["log_w"], a["pairs"], a["pairs"],
                        a["vec"], a["g_tok"], kind=kind, temperature=1.0, ignore_index=-100)
            return a
        return call

    mod_rs, mod_gr = "askd_kernels.askd.triton_row_stats", "askd_kernels.askd.triton_gradient"
    mod_dv = "askd_kernels.divergence.triton"
    out = [
        Launch("row_stats", f"{mod_rs}:_row_stats_kernel", 1, call=row_stats),
        Launch("coefficients", "askd_kernels.askd.triton_coefficients:_coefficients_kernel", 0, call=coefficients),
        Launch("gradient", f"{mod_gr}:_gradient_kernel", 1, call=gradient),
        Launch("full_vocab_row_stats", f"{mod_rs}:_full_vocab_row_stats_kernel", 1, alternatives=2,
               call=fv_row_stats),
        Launch("full_vocab_gradient", f"{mod_gr}:_full_vocab_gradient_kernel", 1, alternatives=2,
               call=fv_gradient),
    ]
    for kind in DIVERGENCE_KINDS:
        out.append(Launch(f"divergence_forward[{kind}]", f"{mod_dv}:_divergence_forward_kernel", 1,
                          call=div_forward(kind)))
        out.append(Launch(f"divergence_backward[{kind}]", f"{mod_dv}:_divergence_backward_kernel", 1,
                          call=div_backward(kind)))
    return out


def launches(names=None) -> list[Launch]:
    """The launches of the report, those whose name contains one of ``names`` if given."""
    return [la for la in _launches() if not names or any(n in la.name for n in names)]


def _resolve(spec: str):
    import importlib
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------
# Compilation with the launch's own binding (needs a process where TRITON_INTERPRET is unset).

def _capture(launch: Launch, B, T, V):
    """``(args, kwargs, grid)`` of the ``kernel[grid](...)`` call the launcher makes, on meta tensors."""
    kernel = _resolve(launch.kernel)
    seen = []

    def run(*args, grid, warmup, **kwargs):
        seen.append((args, kwargs, grid))

    kernel.run = run
    try:
        launch.call("meta", B, T, V)
    finally:
        del kernel.run
    assert len(seen) == 1, f"{launch.name}: expected one launch, saw {len(seen)}"
    return kernel, seen[0]


def _bind(kernel, args, kwargs, cc):
    """What ``JITFunction.run`` would compile for this call on a ``cc`` GPU: (signature, constexprs,
    attrs, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict:
    """REG / LOCAL (spills) / SHARED / STACK of a cubin, from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode with modifiers, operands)`` of every instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _INSTR.finditer(text)]


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def access_bytes(opcode: str) -> int:
    """Bytes per thread of an ``LDG``/``STG``: ``LDG.E.128`` 16, ``LDG.E.64`` 8, ``LDG.E`` 4,
    ``LDG.E.U16`` 2 ..."""
    for part in opcode.split(".")[1:]:
        if part in _WIDTH:
            return _WIDTH[part]
    return 4


def loops(instrs: list[tuple[int, str, str]]) -> list[dict]:
    """Every loop (a backward ``BRA``), in address order, with its body's instruction counts."""
    addr_index = {a: i for i, (a, _, _) in enumerate(instrs)}
    found = []
    for i, (addr, op, operands) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in addr_index:
            continue
        body = instrs[addr_index[target]:i + 1]
        ops = [o for _, o, _ in body]
        found.append({
            "start": target, "end": addr, "instructions": len(body),
            "mufu": sum(o.startswith("MUFU") for o in ops),
            "mufu_ops": sorted({o for o in ops if o.startswith("MUFU")}),
            "loads": [o for o in ops if o.startswith("LDG")],
            "stores": [o for o in ops if o.startswith("STG")],
            "local": sum(o.startswith(("LDL", "STL")) for o in ops),   # spill traffic inside the loop
            "load_bytes": sum(access_bytes(o) for o in ops if o.startswith("LDG")),
            "store_bytes": sum(access_bytes(o) for o in ops if o.startswith("STG")),
        })
    for lp in found:  # an outer loop contains another
        lp["nested_loops"] = sum(1 for o in found if o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"])
    return found


def _vector_summary(ops: list[str]) -> str:
    counts: dict[str, int] = {}
    for o in ops:
        counts[o] = counts.get(o, 0) + 1
    return " ".join(f"{n}x{o}" for o, n in sorted(counts.items())) or "-"


def compile_one(launch: Launch, V: int, cc: int, B: int = BATCH, T: int = SEQ) -> dict:
    """Compile ``launch`` at (B, T, V) for sm_``cc`` as a launch would, and read its cubin."""
    import triton
    from triton.compiler import ASTSource

    kernel, (args, kwargs, grid) = _capture(launch, B, T, V)
    target, signature, constexprs, attrs, options = _bind(kernel, args, kwargs, cc)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    cubin = compiled.asm["cubin"]
    num_warps = compiled.metadata.num_warps
    constants = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
    block = constants.get("BLOCK", constants.get("BLOCK_T"))
    elems_per_thread = block / (32 * num_warps)
    body = []
    for lp in loops(parse_sass(sass(cubin))):
        body.append({**lp, "elems_per_thread": elems_per_thread,
                     "instr_per_elem": lp["instructions"] / elems_per_thread,
                     "mufu_per_elem": lp["mufu"] / elems_per_thread,
                     "bytes_per_elem": (lp["load_bytes"] + lp["store_bytes"]) / elems_per_thread})
    divisible = sorted(kernel.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v)
    return {"kernel": launch.name, "V": V, "sm": cc, "B": B, "T": T, "grid": list(grid),
            "num_warps": num_warps, "block": block, "shared": compiled.metadata.shared,
            "constexprs": {k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in constants.items()},
            "divisible_by_16": divisible, **resource_usage(cubin), "loops": body}


def _compile_in_process(names, vocabs, targets, triples=None) -> list[dict]:
    by_name = {la.name: la for la in _launches()}
    if triples is None:
        triples = [(la.name, V, cc) for la in launches(names) for V in vocabs for cc in targets]
    return [compile_one(by_name[name], V, cc) for name, V, cc in triples]


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction
    if os.environ.get("TRITON_INTERPRET"):
        return True
    mods = [m for m in ("askd_kernels.askd.triton_gradient",) if m in sys.modules]
    return any(not isinstance(sys.modules[m]._gradient_kernel, JITFunction) for m in mods)


def _subprocess_json(mode: str, payload: dict, interpret: bool, timeout=1800) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["ASKD_KERNELS_BACKEND"] = "triton"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.static", mode, json.dumps(payload)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"bench.static {mode} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def compile_all(names=None, vocabs=VOCABS, targets=TARGETS, triples=None) -> list[dict]:
    """One record per (launch, V, target) — the product of ``names`` × ``vocabs`` × ``targets``, or
    exactly the ``(kernel name, V, target)`` ``triples`` — with resources and loops. Runs in a
    subprocess when this process interprets the kernels (kernels decorated under ``TRITON_INTERPRET``
    cannot be compiled)."""
    if _interpreted():
        return _subprocess_json("--_compile", {"names": names, "vocabs": list(vocabs), "targets": list(targets),
                                               "triples": triples}, interpret=False)
    return _compile_in_process(names, vocabs, targets, triples)


# ---------------------------------------------------------------------------------------------
# Bytes per element, counted under the interpreter (bench/traffic.py) at a small shape.

TRAFFIC_SHAPE = (2, 3, 200)      # B, T, V; run at V and 2V to separate per-element from per-row bytes


def _traffic_once(launch, B, T, V):
    from bench.traffic import count_traffic
    with count_traffic() as traffic:
        a = launch.call("cpu", B, T, V)
    if launch.rows_per_program:   # vocabulary kernels: bytes of the logits and of the bf16 gradient
        loaded = sum(traffic.loaded(x) for x in (a["student"], a["teacher"]))
        stored = sum(size * int(addr.size) for addr, size in traffic._stores if size == 2)
    else:                         # the per-sequence kernel: every byte
        loaded = sum(size * int(addr.size) for addr, size in traffic._loads)
        stored = sum(size * int(addr.size) for addr, size in traffic._stores)
    return loaded, stored


def _traffic_in_process(names) -> list[dict]:
    from askd_kernels import _triton_math
    _triton_math.MAX_BLOCK = 64  # several blocks per row and a masked tail, as at full size
    B, T, V = TRAFFIC_SHAPE
    out = []
    for launch in launches(names):
        (l1, s1), (l2, s2) = _traffic_once(launch, B, T, V), _traffic_once(launch, B, T, 2 * V)
        rows = B * T
        if launch.rows_per_program:
            # bytes = per_elem · rows · V + per_row · rows (the label logits of askd's row stats)
            row = {"loaded_per_elem": (l2 - l1) / (rows * V), "stored_per_elem": (s2 - s1) / (rows * V),
                   "loaded_per_row": (2 * l1 - l2) / rows, "stored_per_row": (2 * s1 - s2) / rows}
        else:
            row = {"loaded_per_elem": l1 / rows, "stored_per_elem": s1 / rows, "loaded_per_row": 0.0,
                   "stored_per_row": 0.0}
        out.append({"kernel": launch.name, "per_vocab_element": bool(launch.rows_per_program), **row})
    return out


def bytes_per_elem(traffic_row: dict, V: int) -> float:
    """Design bytes per element at vocabulary ``V`` (per token for the per-sequence kernel)."""
    per_row = traffic_row["loaded_per_row"] + traffic_row["stored_per_row"]
    per_elem = traffic_row["loaded_per_elem"] + traffic_row["stored_per_elem"]
    return per_elem + (per_row / V if traffic_row["per_vocab_element"] else 0.0)


def traffic_all(names=None) -> list[dict]:
    """Design bytes per logit element of each kernel's logits (loads + bf16 gradient stores)."""
    return _subprocess_json("--_traffic", {"names": names}, interpret=True)


# ---------------------------------------------------------------------------------------------
# Occupancy and the time model.

def occupancy(gpu: Gpu, regs: int, num_warps: int, shared: int) -> dict:
    """CTAs and warps per SM: registers allocated per warp in units of 256 (regs/thread rounded up
    to 8), warps allocated per SM in units of 4 (one per scheduler); shared memory plus 1 KB reserved
    per CTA; at most 64 warps and 32 CTAs."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    warps_by_regs = (gpu.regs_per_sm // regs_per_warp) // 4 * 4
    by_regs = warps_by_regs // num_warps
    by_warps = gpu.max_warps_per_sm // num_warps
    by_smem = gpu.smem_per_sm // (shared + gpu.smem_reserved_per_cta)
    ctas = min(by_regs, by_warps, by_smem, gpu.max_ctas_per_sm)
    limiter = {by_regs: "registers", by_warps: "warps", by_smem: "shared"}.get(ctas, "ctas")
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "occupancy_limiter": limiter}


def predict(rec: dict, bytes_per_elem: float | None, alternatives: int, gpu: Gpu, per_row: int = 1,
            ipc: float = IPC, dram_eff: float = DRAM_EFFICIENCY) -> dict:
    """Predicted microseconds of each loop and of the kernel: B·T rows of ``per_row`` elements (V for
    the vocabulary kernels, 1 for the per-sequence one, whose elements are tokens). A grid of fewer
    programs than SMs uses only that many SMs and that fraction of the DRAM bandwidth."""
    elements = rec["B"] * rec["T"] * per_row
    programs = 1
    for g in rec["grid"]:
        programs *= g
    share = min(1.0, programs / gpu.sms)
    clock = gpu.clock_ghz * 1e9
    bw = gpu.dram_tbps * 1e12
    out_loops = []
    for lp in rec["loops"]:
        t_dram = elements * lp["bytes_per_elem"] / (dram_eff * bw * share)
        t_issue = elements * lp["instr_per_elem"] / 32 / (gpu.sms * share * 4 * clock * ipc)
        t_mufu = elements * lp["mufu_per_elem"] / (gpu.sms * share * MUFU_PER_SM_CLOCK * clock)
        times = {"dram": t_dram, "issue": t_issue, "mufu": t_mufu}
        bound = max(times, key=times.get)
        out_loops.append({**{f"t_{k}_us": v * 1e6 for k, v in times.items()}, "t_us": times[bound] * 1e6,
                          "bound": bound})
    n = len(out_loops)
    weights = [1.0] * n
    if alternatives and n >= alternatives:
        for i in range(n - alternatives, n):
            weights[i] = 1.0 / alternatives
    total = sum(w * lp["t_us"] for w, lp in zip(weights, out_loops))
    roof = elements * bytes_per_elem / (bw * share) * 1e6 if bytes_per_elem is not None else None
    return {"loops": out_loops, "weights": weights, "predicted_us": total, "roofline_us": roof,
            "pct_of_roofline": (100.0 * roof / total) if roof and total else None}


# ---------------------------------------------------------------------------------------------
# The report.

KERNEL_FIELDS = ["kernel", "V", "sm", "gpu", "reg", "local", "stack", "shared", "num_warps", "block",
                 "ctas_per_sm", "warps_per_sm", "occupancy_limiter", "loops", "instr_per_elem", "mufu_per_elem",
                 "sass_bytes_per_elem", "bytes_per_elem", "predicted_us", "roofline_us", "pct_of_roofline",
                 "pct_pessimistic", "pct_optimistic", "predicted_us_pessimistic", "predicted_us_optimistic",
                 "divisible_by_16"]
LOOP_FIELDS = ["kernel", "V", "sm", "loop", "weight", "instructions", "local", "elems_per_thread", "instr_per_elem", "mufu",
               "mufu_per_elem", "mufu_ops", "loads", "stores", "bytes_per_elem", "t_dram_us", "t_issue_us",
               "t_mufu_us", "bound"]


def build(names=None, vocabs=VOCABS, targets=TARGETS, ipc=IPC, dram_eff=DRAM_EFFICIENCY,
          compiled=None, traffic=None) -> tuple[list[dict], list[dict]]:
    """``(kernel rows, loop rows)`` of the report."""
    compiled = compile_all(names, vocabs, targets) if compiled is None else compiled
    traffic = traffic_all(names) if traffic is None else traffic
    bytes_of = {t["kernel"]: t for t in traffic}
    alt = {la.name: la.alternatives for la in launches(names)}
    per_row = {la.name: la.rows_per_program for la in launches(names)}
    kernels, loop_rows = [], []
    for rec in compiled:
        gpu = GPUS[rec["sm"]]
        moved = bytes_per_elem(bytes_of[rec["kernel"]], rec["V"]) if rec["kernel"] in bytes_of else None
        elems = rec["V"] if per_row.get(rec["kernel"], 1) else 1
        pred = predict(rec, moved, alt.get(rec["kernel"], 0), gpu, elems, ipc, dram_eff)
        ends = [predict(rec, moved, alt.get(rec["kernel"], 0), gpu, elems, r, dram_eff)
                for r in (IPC_PESSIMISTIC, IPC_OPTIMISTIC)]
        timed = bool(per_row.get(rec["kernel"], 1))  # the per-sequence kernel: latency, no time
        w = pred["weights"]
        kernels.append({
            "kernel": rec["kernel"], "V": rec["V"], "sm": rec["sm"], "gpu": gpu.name, "reg": rec.get("reg"),
            "local": rec.get("local"), "stack": rec.get("stack"), "shared": rec["shared"],
            "num_warps": rec["num_warps"], "block": rec["block"],
            **occupancy(gpu, rec.get("reg", 0), rec["num_warps"], rec["shared"]),
            "loops": len(rec["loops"]),
            "instr_per_elem": sum(wi * lp["instr_per_elem"] for wi, lp in zip(w, rec["loops"])),
            "mufu_per_elem": sum(wi * lp["mufu_per_elem"] for wi, lp in zip(w, rec["loops"])),
            "sass_bytes_per_elem": sum(wi * lp["bytes_per_elem"] for wi, lp in zip(w, rec["loops"])),
            "bytes_per_elem": moved,
            # the per-sequence kernel is a serial scan over 8 programs: latency, not throughput
            "predicted_us": pred["predicted_us"] if per_row.get(rec["kernel"], 1) else None,
            "roofline_us": pred["roofline_us"] if per_row.get(rec["kernel"], 1) else None,
            "pct_of_roofline": pred["pct_of_roofline"] if timed else None,
            "pct_pessimistic": ends[0]["pct_of_roofline"] if timed else None,
            "pct_optimistic": ends[1]["pct_of_roofline"] if timed else None,
            "predicted_us_pessimistic": ends[0]["predicted_us"] if timed else None,
            "predicted_us_optimistic": ends[1]["predicted_us"] if timed else None,
            "divisible_by_16": " ".join(rec["divisible_by_16"]),
        })
        for i, (lp, p) in enumerate(zip(rec["loops"], pred["loops"])):
            loop_rows.append({
                "kernel": rec["kernel"], "V": rec["V"], "sm": rec["sm"], "loop": i, "weight": w[i],
                "instructions": lp["instructions"], "local": lp["local"], "elems_per_thread": lp["elems_per_thread"],
                "instr_per_elem": lp["instr_per_elem"], "mufu": lp["mufu"], "mufu_per_elem": lp["mufu_per_elem"],
                "mufu_ops": " ".join(lp["mufu_ops"]), "loads": _vector_summary(lp["loads"]),
                "stores": _vector_summary(lp["stores"]), "bytes_per_elem": lp["bytes_per_elem"],
                "t_dram_us": p["t_dram_us"], "t_issue_us": p["t_issue_us"], "t_mufu_us": p["t_mufu_us"],
                "bound": p["bound"],
            })
    return kernels, loop_rows


# Forward + backward of each op: (name, forward kernel, backward kernel).
PAIRS = [("askd (stage a + c)", "row_stats", "gradient"),
         ("askd rao_blackwell (a + c)", "full_vocab_row_stats", "full_vocab_gradient"),
         *[(f"divergence {k} (fwd + bwd)", f"divergence_forward[{k}]", f"divergence_backward[{k}]")
           for k in DIVERGENCE_KINDS]]


def pairs(kernels: list[dict]) -> list[dict]:
    """Forward + backward per op, shape and target: predicted µs at IPC 0.5 / 0.7 / 1.0, the DRAM
    roofline of the bytes both kernels move, and % of it (PREDICTED)."""
    by = {(k["kernel"], k["V"], k["sm"]): k for k in kernels}
    out = []
    for name, fwd, bwd in PAIRS:
        for (kname, V, sm), f in by.items():
            b = by.get((bwd, V, sm))
            if kname != fwd or b is None or f["predicted_us"] is None or f["roofline_us"] is None:
                continue
            row = {"op": name, "V": V, "sm": sm, "bytes_per_elem": f["bytes_per_elem"] + b["bytes_per_elem"],
                   "roofline_us": f["roofline_us"] + b["roofline_us"]}
            for tag, key in (("pessimistic", "predicted_us_pessimistic"), ("", "predicted_us"),
                             ("optimistic", "predicted_us_optimistic")):
                t = f[key] + b[key]
                row[f"predicted_us{'_' + tag if tag else ''}"] = t
                row[f"pct{'_' + tag if tag else ''}"] = 100.0 * row["roofline_us"] / t
            out.append(row)
    return out


PAIR_FIELDS = ["op", "V", "sm", "bytes_per_elem", "roofline_us", "predicted_us_pessimistic", "predicted_us",
               "predicted_us_optimistic", "pct_pessimistic", "pct", "pct_optimistic"]


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(kernels: list[dict], loop_rows: list[dict], fused=None) -> str:
    """The report; ``fused`` = ``bench.fused_traffic.build()``'s ``(summary, per-op rows)`` adds the
    fused-linear section."""
    lines = [f"Static report: B={BATCH}, T={SEQ}, bf16 logits. Times are PREDICTED by the model of "
             f"bench/static.py (IPC={IPC}, range {IPC_PESSIMISTIC}–{IPC_OPTIMISTIC}; DRAM efficiency="
             f"{DRAM_EFFICIENCY}), not measured.", "",
             "### Forward + backward (predicted)", "",
             f"| op | V | sm | bytes/elem | DRAM roofline µs | predicted µs (IPC {IPC_PESSIMISTIC} / {IPC} / "
             f"{IPC_OPTIMISTIC}) | % of roofline (IPC {IPC_PESSIMISTIC} / {IPC} / {IPC_OPTIMISTIC}) |",
             "|---|---|---|---|---|---|---|"]
    for p in pairs(kernels):
        lines.append("| " + " | ".join([
            p["op"], str(p["V"]), str(p["sm"]), _fmt(p["bytes_per_elem"]), _fmt(p["roofline_us"], 0),
            " / ".join(_fmt(p[k], 0) for k in ("predicted_us_pessimistic", "predicted_us", "predicted_us_optimistic")),
            " / ".join(_fmt(p[k], 0) for k in ("pct_pessimistic", "pct", "pct_optimistic"))]) + " |")
    lines += ["", "### Kernels", "",
              "| kernel | V | sm | reg | spill/stack | smem B | CTAs/SM | warps/SM | loops | instr/elem | MUFU/elem "
              "| bytes/elem | predicted µs | DRAM roofline µs | % of roofline (predicted; IPC 0.5 / 0.7 / 1.0) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        pct = " / ".join(_fmt(k[c], 0) for c in ("pct_pessimistic", "pct_of_roofline", "pct_optimistic"))
        lines.append("| " + " | ".join([
            k["kernel"], str(k["V"]), str(k["sm"]), _fmt(k["reg"]), f"{_fmt(k['local'])}/{_fmt(k['stack'])}",
            _fmt(k["shared"]), _fmt(k["ctas_per_sm"]), _fmt(k["warps_per_sm"]), _fmt(k["loops"]),
            _fmt(k["instr_per_elem"]), _fmt(k["mufu_per_elem"]), _fmt(k["bytes_per_elem"]),
            _fmt(k["predicted_us"], 0), _fmt(k["roofline_us"], 0),
            pct if k["pct_of_roofline"] is not None else "-"]) + " |")
    lines += ["", "### Loops of the SASS (per element; weight < 1: one of mutually exclusive branches)", "",
              "| kernel | V | sm | loop | weight | body instr | elem/thread | instr/elem | MUFU/elem | MUFU ops "
              "| global loads | global stores | bytes/elem | bound (predicted) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lp in loop_rows:
        lines.append("| " + " | ".join([
            lp["kernel"], str(lp["V"]), str(lp["sm"]), str(lp["loop"]), _fmt(lp["weight"]), str(lp["instructions"]),
            _fmt(lp["elems_per_thread"], 0), _fmt(lp["instr_per_elem"]), _fmt(lp["mufu_per_elem"]),
            lp["mufu_ops"] or "-", lp["loads"], lp["stores"], _fmt(lp["bytes_per_elem"]), lp["bound"]]) + " |")
    text = "\n".join(lines) + "\n"
    if fused is not None:
        from bench import fused_traffic
        text += "\n" + fused_traffic.markdown(*fused)
    return text


def write(out: Path, kernels: list[dict], loop_rows: list[dict], fused=None) -> list[Path]:
    """``kernels.csv``, ``loops.csv``, ``pairs.csv``, with ``fused`` (see :func:`markdown`)
    ``fused_linear.csv`` and ``fused_linear_ops.csv``, and ``report.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    tables = [("kernels.csv", kernels, KERNEL_FIELDS), ("loops.csv", loop_rows, LOOP_FIELDS),
              ("pairs.csv", pairs(kernels), PAIR_FIELDS)]
    if fused is not None:
        from bench import fused_traffic
        tables += [("fused_linear.csv", fused[0], fused_traffic.SUMMARY_FIELDS),
                   ("fused_linear_ops.csv", fused[1], fused_traffic.OP_FIELDS)]
    for name, rows, fields in tables:
        path = out / name
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        paths.append(path)
    path = out / "report.md"
    path.write_text(markdown(kernels, loop_rows, fused))
    return paths + [path]


def report(out: Path | str | None = DEFAULT_OUT, names=None, vocabs=VOCABS, targets=TARGETS, ipc=IPC,
           dram_eff=DRAM_EFFICIENCY, traffic: bool = True, fused_linear=True) -> tuple[list[dict], list[dict]]:
    """Build the report, write ``kernels.csv``, ``loops.csv`` and ``report.md`` under ``out`` (unless
    None) and return ``(kernel rows, loop rows)``. ``traffic=False`` skips the interpreter count (no
    bytes/element, roofline or % columns). ``fused_linear``: True counts the fused-linear section
    (``bench/fused_traffic.py``, a few seconds), a precomputed ``(summary, per-op rows)`` is used as
    is, False leaves the section out."""
    kernels, loop_rows = build(names, vocabs, targets, ipc, dram_eff, traffic=None if traffic else [])
    if out is not None:
        fused = fused_linear or None
        if fused is True:
            from bench import fused_traffic
            fused = fused_traffic.build()
        write(Path(out), kernels, loop_rows, fused)
    return kernels, loop_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default build/static, untracked)")
    parser.add_argument("--kernels", help="comma list: only kernels whose name contains one of these")
    parser.add_argument("--vocab", help="comma list of vocabulary sizes (default 151936,151943)")
    parser.add_argument("--sm", help="comma list of targets among 90,80 (default both)")
    parser.add_argument("--ipc", type=float, default=IPC, help=f"issue IPC per scheduler assumed (default {IPC})")
    parser.add_argument("--no-traffic", action="store_true",
                        help="skip the interpreter's byte count (faster; no roofline columns)")
    parser.add_argument("--dram-efficiency", type=float, default=DRAM_EFFICIENCY,
                        help=f"fraction of peak DRAM bandwidth reachable (default {DRAM_EFFICIENCY})")
    parser.add_argument("--no-fused-linear", action="store_true",
                        help="skip the count of the fused-linear path's traffic outside the GEMMs")


def run_cli(args: argparse.Namespace) -> int:
    words = lambda s: [w.strip() for w in s.split(",") if w.strip()] if s else None  # noqa: E731
    vocabs = [int(v) for v in words(args.vocab)] if args.vocab else VOCABS
    targets = [int(v) for v in words(args.sm)] if args.sm else TARGETS
    fused = None
    if not getattr(args, "no_fused_linear", False):
        from bench import fused_traffic
        fused = fused_traffic.build()
    kernels, loop_rows = report(args.out, words(args.kernels), vocabs, targets, args.ipc, args.dram_efficiency,
                                not args.no_traffic, fused_linear=fused or False)
    print(markdown(kernels, loop_rows, fused))
    extra = ", fused_linear.csv, fused_linear_ops.csv" if fused else ""
    print(f"wrote kernels.csv, loops.csv, pairs.csv{extra}, report.md in {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--_compile", "--_traffic"):   # internal: the subprocesses of compile_all/traffic_all
        payload = json.loads(argv[1])
        if argv[0] == "--_compile":
            if os.environ.get("TRITON_INTERPRET"):
                sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
            rows = _compile_in_process(payload["names"], payload["vocabs"], payload["targets"], payload.get("triples"))
        else:
            rows = _traffic_in_process(payload["names"])
        for row in rows:
            print(json.dumps(row), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench static", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
