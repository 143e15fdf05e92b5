"""Ahead-of-time compilation of every kernel specialisation for real GPUs, without a GPU.

Run as a script (``python tests/aot_compile.py``) in a process where ``TRITON_INTERPRET`` is unset:
kernels decorated under the interpreter cannot be compiled. For each entry of ``SPECS`` and each
target it compiles the kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))``, reads the resource usage of the cubin with the ``cuobjdump`` shipped in the triton wheel,
and prints one JSON line per compile: kernel, target, registers, local memory (spills), shared.

The signatures mirror what the launchers pass: logits in each supported dtype, 32-bit sizes and
strides with the innermost stride specialised to 1 (what Triton does for contiguous rows), the
smallest and largest block each launcher can choose, and the aligned main loop's ``VEC`` (16 bytes
of the dtype: the edge block and the aligned loop; the i64-stride variants take VEC = 1, the plain
masked loop of rows that cannot be aligned together). No divisibility-by-16 attributes are given, so
these are the most conservative (narrowest-access) versions; ``tests/test_static.py`` compiles the
benchmark's launches with the attributes a real launch derives (``bench/static.py``).
"""
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from askd_kernels import _triton_math  # noqa: E402
from askd_kernels.askd import triton_coefficients as coefficients  # noqa: E402
from askd_kernels.askd import triton_gradient as gradient  # noqa: E402
from askd_kernels.askd import triton_row_stats as row_stats  # noqa: E402
from askd_kernels.divergence import triton as divergences  # noqa: E402

TARGETS = (80, 90)
LOGIT_TYPES = ("*bf16", "*fp16", "*fp32")


def _vec(dtype, stride):
    """VEC of the launchers' row_vector: 16 bytes of the dtype, or 1 (i64 variants: the unaligned path)."""
    return 1 if stride == "i64" else 16 // {"*bf16": 2, "*fp16": 2, "*fp32": 4}[dtype]


def _row_stats_specs():
    # (teacher logits?, logits dtype, block, stride type): i64 strides are what the launcher passes
    # once a tensor spans more than 2^31 elements.
    variants = [(t, d, b, "i32") for t in (True, False) for d in LOGIT_TYPES for b in (16, _triton_math.MAX_BLOCK)]
    variants.append((True, "*bf16", _triton_math.MAX_BLOCK, "i64"))
    for teacher, dtype, block, stride in variants:
        sig = {
            "S": dtype, "stride_sb": stride, "stride_st": stride, "stride_sv": "constexpr", "V_s": "i32",
            "W": dtype, "stride_wb": stride, "stride_wt": stride, "stride_wv": "constexpr", "V_t": "i32",
            "LOGP_T": "*fp32", "LABELS": "*i64", "T": "i32", "ignore_index": "i32", "inv_tau": "fp32",
            "LOG_Q": "*fp32", "LOG_RATIO": "*fp32", "LSE": "*fp32",
            "TEACHER_LOGITS": "constexpr", "BLOCK": "constexpr", "VEC": "constexpr", "VEC_T": "constexpr",
        }
        const = {"stride_sv": 1, "stride_wv": 1, "TEACHER_LOGITS": teacher, "BLOCK": block,
                 "VEC": _vec(dtype, stride), "VEC_T": _vec(dtype, stride) if teacher else 1}
        yield f"row_stats[{dtype[1:]},teacher={teacher},BLOCK={block},strides={stride}]", \
            row_stats._row_stats_kernel, sig, const, _triton_math.NUM_WARPS


def _coefficients_specs():
    for block_t in (16, coefficients.BLOCK_T):
        sig = {
            "LOG_Q": "*fp32", "LOG_RATIO": "*fp32", "LOG_Q_OLD": "*fp32", "LABELS": "*i64",
            "FV_VALUE": "*fp32", "BASELINE": "*fp32",
            "ALPHA": "*fp32", "SGO": "*i32", "KAPPA": "*fp32", "LAM": "*fp32", "COEF": "*fp32", "RET": "*fp32",
            "VALUE": "*fp32",
            "T": "i32", "ignore_index": "i32", "gamma": "fp32", "w_max": "fp32", "estimator": "i32",
            "length_normalize": "i32", "BLOCK_T": "constexpr",
        }
        yield f"coefficients[BLOCK_T={block_t}]", coefficients._coefficients_kernel, sig, \
            {"BLOCK_T": block_t}, coefficients.NUM_WARPS


def _gradient_specs():
    # every dtype × smallest/largest block with the aligned main loop, plus the VEC = 1 variant
    variants = [(d, b, _vec(d, "i32")) for d in LOGIT_TYPES for b in (16, _triton_math.MAX_BLOCK)]
    variants.append(("*bf16", _triton_math.MAX_BLOCK, 1))
    for dtype, block, vec in variants:
        sig = {
            "S": dtype, "stride_sb": "i32", "stride_st": "i32", "stride_sv": "constexpr", "V_s": "i32",
            "LABELS": "*i64", "COEF": "*fp32", "LSE": "*fp32", "G_SEQ": "*fp32", "GRAD": dtype,
            "T": "i32", "inv_tau": "fp32", "BLOCK": "constexpr", "VEC": "constexpr",
        }
        yield f"gradient[{dtype[1:]},BLOCK={block},VEC={vec}]", gradient._gradient_kernel, sig, \
            {"stride_sv": 1, "BLOCK": block, "VEC": vec}, _triton_math.NUM_WARPS


def _divergence_specs():
    # Every KIND × logits dtype × smallest/largest block, for the forward and the backward kernel, plus
    # the i64-stride variant of the heaviest kind (srkl) that tensors beyond 2^31 elements get.
    variants = [(k, d, b, "i32") for k in divergences.KINDS for d in LOGIT_TYPES for b in (16, _triton_math.MAX_BLOCK)]
    variants.append(("srkl", "*bf16", _triton_math.MAX_BLOCK, "i64"))
    for kind, dtype, block, stride in variants:
        rows = {
            "S": dtype, "stride_sb": stride, "stride_st": stride, "stride_sv": "constexpr",
            "W": dtype, "stride_wb": stride, "stride_wt": stride, "stride_wv": "constexpr",
        }
        per_seq = {"LABELS": "*i64", "KAPPA": "*fp32", "LOG_W": "*fp32"}
        tail = {"T": "i32", "ignore_index": "i32", "inv_tau": "fp32", "KIND": "constexpr", "BLOCK": "constexpr",
                "VEC": "constexpr"}
        const = {"stride_sv": 1, "stride_wv": 1, "KIND": divergences.KINDS[kind], "BLOCK": block,
                 "VEC": _vec(dtype, stride)}
        forward = {**rows, "V": "i32", **per_seq,
                   "VALUE": "*fp32", "ROW_SUM": "*fp32", "LSE_S": "*fp32", "LSE_T": "*fp32", **tail}
        backward = {**dict(list(rows.items())[:4]), "V_s": "i32", **dict(list(rows.items())[4:]), "V": "i32",
                    **per_seq, "LSE_S": "*fp32", "LSE_T": "*fp32", "ROW_SUM": "*fp32", "G": "*fp32",
                    "GRAD": dtype, **tail}
        label = f"{kind},{dtype[1:]},BLOCK={block},strides={stride}"
        forward["MODE"] = "constexpr"
        yield f"divergence_forward[{label}]", divergences._divergence_forward_kernel, forward, \
            {**const, "MODE": 0}, _triton_math.NUM_WARPS
        # the vocabulary-parallel split: pass 2 from given pairs (every kind), pass 1 alone (one
        # specialisation per dtype and block: the launcher passes KIND = 0 for it)
        yield f"divergence_forward_given_pairs[{label}]", divergences._divergence_forward_kernel, forward, \
            {**const, "MODE": 2}, _triton_math.NUM_WARPS
        if kind == "fkl" or (kind, stride) == ("srkl", "i64"):
            yield f"divergence_pairs[{dtype[1:]},BLOCK={block},strides={stride}]", \
                divergences._divergence_forward_kernel, forward, {**const, "KIND": 0, "MODE": 1}, _triton_math.NUM_WARPS
        yield f"divergence_backward[{label}]", divergences._divergence_backward_kernel, backward, const, \
            _triton_math.NUM_WARPS


def _full_vocab_specs():
    # The rao_blackwell estimator's stage (a) and (c) kernels: every logits dtype × smallest/largest
    # block, plus the i64-stride variant.
    variants = [(d, b, "i32") for d in LOGIT_TYPES for b in (16, _triton_math.MAX_BLOCK)]
    variants.append(("*bf16", _triton_math.MAX_BLOCK, "i64"))
    for dtype, block, stride in variants:
        rows = {
            "S": dtype, "stride_sb": stride, "stride_st": stride, "stride_sv": "constexpr", "V_s": "i32",
            "W": dtype, "stride_wb": stride, "stride_wt": stride, "stride_wv": "constexpr", "V_t": "i32",
        }
        per_seq = {"ALPHA": "*fp32", "SGO": "*i32", "KAPPA": "*fp32"}
        const = {"stride_sv": 1, "stride_wv": 1, "BLOCK": block, "VEC": _vec(dtype, stride)}
        forward = {**rows, "LABELS": "*i64", "T": "i32", "ignore_index": "i32", "inv_tau": "fp32", **per_seq,
                   "LOG_Q": "*fp32", "LOG_RATIO": "*fp32", "LSE": "*fp32", "LSE_T": "*fp32",
                   "FV_VALUE": "*fp32", "FV_SUM": "*fp32", "BLOCK": "constexpr", "VEC": "constexpr"}
        backward = {**rows, "LABELS": "*i64", "COEF": "*fp32", "LSE": "*fp32", "LSE_T": "*fp32", "FV_SUM": "*fp32",
                    **per_seq, "G_SEQ": "*fp32", "GRAD": dtype, "T": "i32", "ignore_index": "i32", "inv_tau": "fp32",
                    "BLOCK": "constexpr", "VEC": "constexpr"}
        label = f"{dtype[1:]},BLOCK={block},strides={stride}"
        yield f"full_vocab_row_stats[{label}]", row_stats._full_vocab_row_stats_kernel, forward, const, \
            _triton_math.NUM_WARPS
        yield f"full_vocab_gradient[{label}]", gradient._full_vocab_gradient_kernel, backward, const, \
            _triton_math.NUM_WARPS


SPECS = [_row_stats_specs, _coefficients_specs, _gradient_specs, _divergence_specs, _full_vocab_specs]
# The cubin's resources are read the same way as by the static report (bench/static.py), which also
# compiles every launch with its real launch specialisation and reads the SASS loops.
from bench.static import resource_usage  # noqa: E402


def main(selected=None):
    for family in SPECS:
        for name, kernel, sig, const, num_warps in family():
            if selected and not any(s in name for s in selected):
                continue
            for cc in TARGETS:
                src = ASTSource(fn=kernel, signature=sig, constexprs=const)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
                print(json.dumps({"kernel": name, "sm": cc, **resource_usage(compiled.asm["cubin"])}), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    main(sys.argv[1:])
