"""The fused-linear path's memory traffic outside the GEMMs and the Triton kernels, COUNTED on fake
CUDA tensors (``bench/fused_traffic.py``) at the static report's production shape (B = 8, T = 2048,
V = 151936, bf16; H = 1536 and 3584), equals the design — and regressions fail here.

``askd_loss_from_hidden`` forward + backward (teacher_logprobs, every gradient), n = B·T tokens,
C = ``chunk_rows(V, H)`` = 832 rows per chunk, k = ⌈n / C⌉ = 20 chunks, bytes:

    after  (weight gradient: addmm(acc, gᵀ, x, out_dtype=float32, out=acc))
        backward  zeros (the fp32 accumulator)            4·V·H
                  _to_copy (accumulator → bf16 grad_W)    (4 + 2)·V·H
                  ones (the per-chunk unit factor)        4·n
        forward   copy_ (log q, ℓ, lse pair per chunk)    2·(4 + 4 + 8)·n
                  zeros_like (stage b's placeholder)      4·n
    before (the fallback: mm into an fp32 temporary, then acc.add_(tmp), V sliced in ⌈V / ⌊2^27/H⌋⌉)
        the same + add_.Tensor                            (4 + 4 + 4)·V·H·k

so outside the GEMMs: 10·H/n + 40/V bytes per logit element after (0.94 at H = 1536, 2.19 at 3584)
against 12·H·k/n more before (22.5 / 52.5): ≤ ½ with a wide margin. The weight gradient's own
(v, h) traffic per chunk goes from 16 B (4 written by the GEMM into the temporary + 12 by the add)
to 8 B (the GEMM's accumulator, read and written once). A lm_head bias adds its per-chunk sum of the
bf16 gradient rows: 2 B per logit element, outside the GEMMs, in both forms.
"""
import functools
import math

import pytest
import torch

from bench import fused_traffic as ft

B, T, V = ft.BATCH, ft.SEQ, ft.VOCAB
N = B * T
BUDGET = 1 << 27        # fused_linear.LOGITS_CHUNK_ELEMENTS


@functools.lru_cache(maxsize=None)
def _count(H, bias, after):
    return ft.count(B, T, V, H, bias=bias, addmm_out_dtype=after)


def _ops(c, phase, kind="other"):
    return {op: t for (ph, k, op), t in c.op_counts.items() if ph == phase and k == kind}


@pytest.mark.parametrize("H", ft.HIDDEN)
def test_outside_gemm_bytes_halved_at_the_production_shape(H):
    before, after = _count(H, False, False), _count(H, False, True)
    chunks = math.ceil(N / after.chunk_rows)
    assert (after.chunk_rows, chunks) == (832, 20) and after.chunks == chunks
    slices = math.ceil(V / (BUDGET // H))
    # the design, exactly
    assert {op: t.read + t.written for op, t in _ops(after, "forward").items()} == {
        "copy_": 2 * (4 + 4 + 8) * N, "zeros_like": 4 * N}
    assert {op: t.read + t.written for op, t in _ops(after, "backward").items()} == {
        "zeros": 4 * V * H, "_to_copy": 6 * V * H, "ones": 4 * N}
    assert after.bytes() == 10 * V * H + 40 * N
    added = _ops(before, "backward")["add_.Tensor"]
    assert (added.calls, added.read, added.written) == (chunks * slices, 8 * V * H * chunks, 4 * V * H * chunks)
    assert before.bytes() == after.bytes() + 12 * V * H * chunks
    # the target: traffic outside the GEMMs per logit element at least halved
    assert after.per_element() <= 0.5 * before.per_element()
    assert after.per_element() == pytest.approx(10 * H / N + 40 / V)
    assert before.per_element() - after.per_element() == pytest.approx(12 * H * chunks / N)


@pytest.mark.parametrize("H", ft.HIDDEN)
def test_weight_gradient_gemm_forms(H):
    """After: one addmm(out_dtype=) per chunk into the accumulator (8 B per (v, h) of accumulator
    traffic); before: the mm into a temporary (4 B written) plus the add (12 B) — 16 → 8 B."""
    before, after = _count(H, False, False), _count(H, False, True)
    chunks = after.chunks
    gemm_after, gemm_before = _ops(after, "backward", "gemm"), _ops(before, "backward", "gemm")
    assert "mm.dtype" not in gemm_after and "addmm.dtype_out" not in gemm_before
    addmm = gemm_after["addmm.dtype_out"]
    assert addmm.calls == chunks and addmm.written == 4 * V * H * chunks
    assert addmm.read == 4 * V * H * chunks + 2 * N * V + 2 * N * H     # accumulator + gᵀ + x, once each
    tmp = gemm_before["mm.dtype"]
    slices = math.ceil(V / (BUDGET // H))  # x is read once per slice of V
    assert tmp.written == 4 * V * H * chunks and tmp.read == 2 * N * V + 2 * N * H * slices
    accumulator_after = addmm.read - (2 * N * V + 2 * N * H) + addmm.written
    accumulator_before = tmp.written + _ops(before, "backward")["add_.Tensor"].read \
        + _ops(before, "backward")["add_.Tensor"].written
    assert accumulator_before == 16 * V * H * chunks and 2 * accumulator_after == accumulator_before
    # the Triton kernels ran as launches only: stage (a) and (c) per chunk, stage (b) once
    assert len(after.launches) == 2 * chunks + 1


def test_bias_sum_is_the_remaining_per_element_term():
    H = ft.HIDDEN[0]
    plain, biased = _count(H, False, True), _count(H, True, True)
    chunks = biased.chunks
    ops = _ops(biased, "backward")
    summed = ops["sum.dim_IntList"]
    assert (summed.calls, summed.read, summed.written) == (chunks, 2 * N * V, 4 * V * chunks)
    assert ops["add_.Tensor"].read + ops["add_.Tensor"].written == 12 * V * chunks
    assert biased.bytes() == plain.bytes() + 2 * N * V + 16 * V * chunks + 4 * V + 6 * V


def test_counter_rules():
    counter = ft.OpCounter()
    with ft.fake_cuda():
        a, b = (torch.empty((4, 8), device="cuda") for _ in range(2))
        x, y = torch.empty((4, 8), dtype=torch.bfloat16, device="cuda"), torch.empty((8, 3), dtype=torch.bfloat16,
                                                                                       device="cuda")
        bias = torch.empty((8,), device="cuda")
        assert a.is_cuda
        with counter:
            a.add_(b)                               # reads both, writes a
            a[0:2] = b[2:4]                         # a view, then copy_: 2·8·4 read and written
            a[1] = 0.0                              # fill_: written only
            a.to(torch.bfloat16)                    # 128 read, 64 written
            torch.add(a, bias.expand(4, 8))         # the broadcast bias counted once
            torch.mm(x, y)                          # a GEMM: tallied apart
            torch.zeros_like(a)                     # reads no data
            a.T.contiguous()
            a.contiguous()                          # already contiguous: nothing
    got = {(k, op): (t.calls, t.read, t.written) for (_, k, op), t in counter.op_counts.items()}
    assert got == {("other", "add_.Tensor"): (1, 256, 128), ("other", "copy_"): (1, 64, 64),
                   ("other", "fill_.Scalar"): (1, 0, 32), ("other", "_to_copy"): (1, 128, 64),
                   ("other", "add.Tensor"): (1, 128 + 32, 128), ("gemm", "mm"): (1, 64 + 48, 24),
                   ("other", "zeros_like"): (1, 0, 128), ("other", "clone"): (1, 128, 128)}


def test_count_leaves_nothing_patched():
    from torch._subclasses.fake_tensor import FakeTensor

    from askd_kernels.askd import fused_linear as fl
    from askd_kernels.askd import ops, triton_gradient

    ft.count(2, 8, 1000, 64, addmm_out_dtype=False)
    assert fl.ADDMM_OUT_DTYPE is True and fl.stages is ops.stages
    assert not {"__getitem__", "__setitem__", "copy_", "contiguous"} & set(vars(FakeTensor))
    assert "run" not in vars(triton_gradient._gradient_kernel)


def test_report_section():
    summary, per_op = ft.build([("H=64", 64, False)], B=2, T=8, V=1000)
    text = ft.markdown(summary, per_op)
    assert "COUNTED, not measured" in text and "`add_.Tensor`" in text
    assert summary[0]["outside_after"] <= 0.5 * summary[0]["outside_before"]
    assert (summary[0]["weight_gemm_before"], summary[0]["weight_gemm_after"]) == ("mm.dtype", "addmm.dtype_out")
