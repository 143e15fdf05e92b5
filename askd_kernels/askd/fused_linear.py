"""ASKD and per-token log-probs straight from hidden states and the lm_head weight.

``logits = hidden @ weight.T + bias`` is never materialised for all tokens at once. The B·T rows are
processed ``chunk_rows(V, H)`` at a time:

* forward: each chunk's logits come from one GEMM (``torch.mm``/``torch.addmm`` in the inputs' dtype
  — fp32 accumulation inside the GEMM, the chunk stored in fp32/bf16/fp16 like materialised logits
  would be) and go straight into the existing stage-(a) launcher, called on a ``[1, C, V]`` view
  with the teacher's log-probs (the student-only variant). Only the per-token fp32 vectors
  ``log q``, ``ℓ`` and ``logsumexp`` survive the chunk. The coefficient scan (stage b) runs once
  after the last chunk, on those vectors.
* backward: each chunk's logits are recomputed and turned into ``grad_logits`` by the existing
  stage-(c) launcher, with the per-token factor ``coef_t·g_b`` (the upstream gradient folded in,
  since a chunk spans several sequences); then ``grad_hidden[chunk] = grad_logits @ W`` and
  ``grad_W += grad_logitsᵀ @ hidden[chunk]``, ``grad_b += Σ_rows grad_logits``, both accumulated in
  fp32 across chunks and cast to the parameters' dtype at the end.

``token_logprobs`` is stage (a) alone (log q_t with the teacher slot unused); its backward is the same
stage-(c) launcher with factor −g_t, since ∂log q_t/∂z = (onehot(y_t) − softmax(z/τ))/τ.

Chunk rule (:func:`chunk_rows`): ``C = min(H, LOGITS_CHUNK_ELEMENTS // V)`` rows, at least 1, rounded down to
a multiple of 64 (the GEMM tile) once it is ≥ 128; on CPU the budget is at most
``CPU_LOGITS_CHUNK_ELEMENTS`` (2^24) entries. The budget bounds one chunk's logits to
``LOGITS_CHUNK_ELEMENTS`` entries (2^27: 256 MiB in bf16), the cap ``H`` keeps a chunk's logits no larger
than the weight itself. For Qwen2-7B (V = 152064, H = 3584) that is 832 rows, enough for the GEMM to
be compute-bound (the weight is re-read once per chunk: C flops per byte of W). Peak extra memory is
O(C·V) — independent of the number of tokens — plus O(B·T) fp32 vectors and, in the backward, the
fp32 accumulator of ``grad_W`` (V·H·4 bytes; the gradient itself for fp32 weights).

Backend choice is the ASKD family's (:func:`askd_kernels.askd.ops.stages`): the Triton launchers on
CUDA, the chunked PyTorch stages of :mod:`askd_kernels.askd.cpu` on CPU. All three functions are
``torch.library`` custom ops with fake implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces through them.

Vocabulary parallel (``process_group=``): each rank holds a contiguous row-slice ``[width_r, H]`` of
the weight (vocabulary ids ``[start_r, start_r + width_r)``, rank order, any widths), of its bias,
and of the teacher head's weight and bias (the same widths); hidden states and the global labels are
the same on every rank. The same chunk loops run on the shard, with the shard's labels
(:func:`askd_kernels.distributed.local_labels`), inside a ``torch.autograd.Function`` (a
``ProcessGroup`` is no custom-op argument):

* forward: per chunk, :func:`~askd_kernels.askd.vocab_parallel.shard_label_stats` of the shard's
  logits — the shard's (max, log-sum) pair and the label's in-shard log-prob, 4 fp32 numbers per
  token and model — kept for the whole batch; then ONE ``all_gather`` and
  :func:`~askd_kernels.askd.vocab_parallel.gathered_label_stats` give every rank the whole rows'
  pairs, log q and ℓ, and stage (b) runs replicated. ``rao_blackwell`` adds a second chunk pass:
  the shard's partial full-vocabulary value and S under the global pairs (the divergence family's
  ``forward_given_pairs``, :func:`~askd_kernels.askd.vocab_parallel.full_vocab_partial_sums`), added by
  ONE ``all_reduce`` of two numbers per token;
* backward: per chunk the shard's logits are recomputed and stage (c) writes the shard's columns of
  ``grad_logits`` from the global pairs (another shard's label marks no column); the shard's rows of
  ``grad_W``/``grad_b`` are exactly those of the unsharded gradients; ``grad_hidden`` is the sum over
  all vocabulary columns, so each rank forms its partial ``grad_logits @ W_shard`` into an fp32
  ``[B·T, H]`` buffer and ONE ``all_reduce`` adds them (fp32: the sum is rounded once to the hidden
  states' dtype, as the unsharded GEMM's output is; B·T·H·4 bytes of buffer and traffic).

Every rank must make the call with the same hidden states, labels and options; every rank gets the
same loss, stats and ``grad_hidden``. Chunk sizes follow each rank's own width.
"""
import inspect
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _checks as check
from .. import distributed
from .._custom_op import custom_op
from .api import option_parameters, bind_options, check_askd_options, detached_fp32, finish_askd
from .ops import forward_fake, run_coefficients, stages
from .vocab_parallel import (full_vocab_partial_sums, full_vocab_weights, gathered_label_stats,
                             shard_label_stats)

# Entries of one chunk's logits (tests lower it to force several chunks on tiny shapes).
LOGITS_CHUNK_ELEMENTS = 1 << 27
# On CPU at most this many (2^24: 32 MiB in bf16): the CPU's GEMM is already efficient at a few
# hundred rows (512 rows at V = 32000, 110 at V = 151936), and every chunk-sized buffer of the
# backward — the logits, the gradient rows and their fp32 copies for the weight's GEMM (no
# mixed-precision GEMM on CPU) — is then 8× smaller, which keeps the full step's peak below
# eager's at CPU-realistic sizes (0.35–0.60× at 4096 × 32000 and 1024 × 151936, whole process).
# Where the whole logits are smaller than one chunk (a few tokens) the chunk buffers are not smaller
# than eager's temporaries, and the peak is slightly above eager's (in-process, H = 256: 223 against
# 186 MiB at 64 × 151936, both dominated by grad_weight's 148): smaller chunks would re-read the
# weight once more per chunk in each GEMM.
CPU_LOGITS_CHUNK_ELEMENTS = 1 << 24
TILE_ROWS = 64


def chunk_rows(vocab: int, hidden_size: int, budget: Optional[int] = None) -> int:
    """Rows per chunk: ``min(H, budget // V)`` (``budget`` = ``LOGITS_CHUNK_ELEMENTS`` by default), ≥ 1,
    a multiple of 64 once ≥ 128."""
    budget = LOGITS_CHUNK_ELEMENTS if budget is None else budget
    rows = max(1, min(hidden_size, budget // max(1, vocab)))
    return rows - rows % TILE_ROWS if rows >= 2 * TILE_ROWS else rows


class Head(NamedTuple):
    """A linear head: ``hidden [B, T, H]``, ``weight [V, H]``, ``bias [V]`` or None."""
    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the B·T rows of ``hidden``: a view when the strides allow one;
        otherwise (e.g. ``hidden[:, :-1]`` of a contiguous buffer) only those rows are gathered,
        never a copy of all of ``hidden``."""
        B, T, H = self.hidden.shape
        try:
            return self.hidden.view(B * T, H)[start:stop]
        except RuntimeError:
            i = torch.arange(start, stop, device=self.hidden.device)
            return self.hidden[i // T, i % T]

    def logits(self, rows: Tensor) -> Tensor:
        """The chunk's logits ``[1, C, V]`` in the inputs' dtype."""
        out = torch.mm(rows, self.weight.T) if self.bias is None else torch.addmm(self.bias, rows, self.weight.T)
        return out.unsqueeze(0)


def _chunks(student: Head, teacher: Optional[Head]):
    """Consecutive ``(start, stop)`` chunks of the B·T rows, :func:`chunk_rows` long for the logits of
    both heads together."""
    B, T, H = student.hidden.shape
    vocab = student.weight.shape[0] + (0 if teacher is None else teacher.weight.shape[0])
    budget = LOGITS_CHUNK_ELEMENTS
    if student.hidden.device.type == "cpu":
        budget = min(budget, CPU_LOGITS_CHUNK_ELEMENTS)
    step = chunk_rows(vocab, H, budget)
    for start in range(0, B * T, step):
        yield start, min(B * T, start + step)


def _per_row(logits: Tensor) -> Tensor:
    """A chunk's logits ``[1, C, V]`` as ``[C, 1, V]``: every row its own length-1 sequence, for the
    rao_blackwell stages, which take their per-sequence inputs per token here."""
    return logits.view(logits.shape[1], 1, logits.shape[2])


def _chunked_row_stats(student: Head, labels, teacher_logprobs, teacher: Optional[Head], temperature, ignore_index,
                       per_token=None, local=None, pairs=None):
    """Stage (a) chunk by chunk. Returns fp32 ``[log_q, log_ratio, lse]`` over the B·T tokens, and for
    rao_blackwell (``per_token`` = the per-token α, SGO flag and κ) also ``lse_t, fv_value, fv_sum``.
    The teacher is its head's logits, else ``teacher_logprobs``; without either the teacher slot reads
    zeros and ``log_ratio`` is meaningless.

    On a vocabulary shard (``local``: this shard's labels, flat [B·T], see
    :func:`askd_kernels.distributed.local_labels`) it returns ``[stats]`` instead: the
    :func:`~askd_kernels.askd.vocab_parallel.shard_label_stats` of the student's shard ``[B·T, 4]``,
    followed by the teacher head's (``[B·T, 8]``), for one gather of the whole batch afterwards. With
    ``pairs`` = the whole rows' ``(lse, lse_t)`` and the per-token ``(log α, log(1−α))`` [B·T, 2], κ of
    the TGO rows and κ of the SGO rows (0 elsewhere), it is rao_blackwell's second pass on the shard:
    ``[partial]``, the shard's partial ``(fv_value, fv_sum)`` [B·T, 2] (skl on TGO rows, srkl on SGO
    rows), for one all_reduce afterwards."""
    stage = stages(student.hidden.device)
    n = labels.numel()
    flat_labels = labels.view(n)
    if pairs is not None:
        lse, lse_t, log_w, kinds = pairs
        shapes = ((n, 2),)

        def chunk(z, w, start, stop):
            return (full_vocab_partial_sums(_per_row(z), local[start:stop].view(-1, 1), _per_row(w),
                                            lse[start:stop], lse_t[start:stop], log_w[start:stop],
                                            [(kind, k[start:stop]) for kind, k in kinds], temperature=temperature),)
    elif local is not None:
        shapes = ((n, 4 if teacher is None else 8),)

        def chunk(z, w, start, stop):
            lab = local[start:stop].view(1, -1)
            parts = [shard_label_stats(stage, x, lab, temperature) for x in (z, w) if x is not None]
            return (torch.cat(parts, 1) if len(parts) > 1 else parts[0],)
    elif per_token is not None:
        shapes = (n, n, (n, 2), (n, 2), n, n)

        def chunk(z, w, start, stop):
            return stage.full_vocab_row_stats(_per_row(z), flat_labels[start:stop].view(-1, 1), _per_row(w),
                                              *(x[start:stop] for x in per_token),
                                              temperature=temperature, ignore_index=ignore_index)
    else:
        shapes = (n, n, (n, 2))

        def chunk(z, w, start, stop):
            tlp = None
            if w is None:
                tlp = (torch.zeros(stop - start, dtype=torch.float32, device=z.device)
                       if teacher_logprobs is None else teacher_logprobs.view(n)[start:stop]).view(1, -1)
            return stage.row_stats(z, flat_labels[start:stop].view(1, -1), w, tlp, temperature=temperature,
                                   ignore_index=ignore_index)
    out = [torch.empty(shape, dtype=torch.float32, device=student.hidden.device) for shape in shapes]
    for start, stop in _chunks(student, teacher):
        z = student.logits(student.rows(start, stop))
        w = None if teacher is None else teacher.logits(teacher.rows(start, stop))
        for dst, src in zip(out, chunk(z, w, start, stop)):
            dst[start:stop] = src
    return out


# The CUDA weight gradient of bf16/fp16 heads: True = one ``addmm`` with fp32 ``out_dtype`` into the
# accumulator; False = always the fallback of a torch without it (a GEMM into an fp32 temporary, then
# ``add_``). Only bench/fused_traffic.py sets it False, to count the fallback's memory traffic.
ADDMM_OUT_DTYPE = True


def _add_weight_grad(acc: Tensor, grad_rows: Tensor, rows: Tensor) -> None:
    """``acc [V, H] (fp32) += grad_rowsᵀ @ rows`` with fp32 accumulation across chunks, in place."""
    if grad_rows.dtype == torch.float32:
        acc.addmm_(grad_rows.T, rows)
    elif grad_rows.is_cuda:
        # bf16/fp16 tensor-core GEMM accumulated straight into the fp32 accumulator (β = 1, fp32
        # out_dtype): no fp32 temporary and no separate add.
        if ADDMM_OUT_DTYPE:
            try:
                torch.addmm(acc, grad_rows.T, rows, out_dtype=torch.float32, out=acc)
                return
            except (TypeError, RuntimeError, NotImplementedError):
                pass
        # a torch without addmm's out_dtype: the GEMM into a temporary, V sliced so that it stays
        # within LOGITS_CHUNK_ELEMENTS entries, then added
        step = max(1, LOGITS_CHUNK_ELEMENTS // rows.shape[1])
        for v in range(0, acc.shape[0], step):
            acc[v:v + step].add_(torch.mm(grad_rows[:, v:v + step].T, rows, out_dtype=torch.float32))
    else:
        # CPU has no mixed-precision GEMM: fp32 copies of this chunk's operands (O(C·V)), then addmm_
        # into the accumulator.
        acc.addmm_(grad_rows.T.float(), rows.float())


def _hidden_grad_fp32(dst: Tensor, grad_rows: Tensor, weight: Tensor, weight_fp32: Optional[Tensor]):
    """``dst [C, H] (fp32) = grad_rows @ weight`` with fp32 output: a shard's partial sum of
    grad_hidden, kept in fp32 until the shards' partials are added (then rounded once, as the
    unsharded GEMM's output is). ``weight_fp32``: an fp32 copy of a low-precision weight for devices
    without a mixed-precision GEMM (CPU), else None. Returns the copy to use for the next chunks."""
    if grad_rows.dtype == torch.float32:
        torch.mm(grad_rows, weight, out=dst)
        return weight_fp32
    if weight_fp32 is None:
        try:  # CUDA: the bf16/fp16 tensor-core GEMM with fp32 output, no fp32 copy
            torch.mm(grad_rows, weight, out_dtype=torch.float32, out=dst)
            return None
        except (TypeError, RuntimeError, NotImplementedError):
            weight_fp32 = weight.float()  # no mm with out_dtype here: one copy for the remaining chunks
    torch.mm(grad_rows.float(), weight_fp32, out=dst)
    return weight_fp32


def _chunked_backward(student: Head, labels, scale, lse, temperature, ignore_index, need_hidden, need_weight,
                      need_bias, teacher: Optional[Head] = None, full_vocab=None, partial=False):
    """Stage (c) chunk by chunk with per-token factor ``scale`` (fp32 [B·T], zero where no gradient),
    then the two GEMMs of the linear layer. For rao_blackwell, ``full_vocab`` holds the per-token
    ``(lse_t, fv_sum, κ·g, α, SGO flag)`` and ``teacher`` the teacher's head. Gradients not needed
    come back as empty tensors.

    ``partial``: the weight is a vocabulary shard (``labels`` are then the shard's labels and ``lse``
    the whole row's pairs); grad_hidden comes back as this shard's fp32 partial sum ``[B, T, H]``, to
    be summed over the shards by the caller."""
    hidden, weight = student.hidden, student.weight
    stage = stages(hidden.device)
    B, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    flat_labels = labels.view(-1)
    grad_hidden = torch.empty((B, T, H) if need_hidden else (0,), dtype=torch.float32 if partial else hidden.dtype,
                              device=dev)
    weight_fp32 = None
    if partial and need_hidden and weight.dtype != torch.float32 and not weight.is_cuda:
        weight_fp32 = weight.float()  # CPU: no mixed-precision GEMM (V_shard·H·4 bytes, like grad_W's accumulator)
    grad_weight = torch.zeros((V, H) if need_weight else (0,), dtype=torch.float32, device=dev)
    grad_bias = torch.zeros((V,) if need_bias else (0,), dtype=torch.float32, device=dev)
    for start, stop in _chunks(student, teacher):
        rows = student.rows(start, stop)
        z = student.logits(rows)
        lab = flat_labels[start:stop]
        # g is already folded into the per-token factors: the per-sequence upstream gradient is 1.
        one = torch.ones(stop - start, dtype=torch.float32, device=dev)
        if full_vocab is not None:
            lse_t, fv_sum, kappa_g, alpha, sgo = (x[start:stop] for x in full_vocab)
            w = teacher.logits(teacher.rows(start, stop))
            grad_rows = stage.full_vocab_gradient(
                _per_row(z), lab.view(-1, 1), _per_row(w), scale[start:stop], lse[start:stop], lse_t, fv_sum,
                alpha, sgo, kappa_g, one, temperature=temperature, ignore_index=ignore_index).view(-1, V)
        else:
            grad_rows = stage.student_gradient(z, lab.view(1, -1), scale[start:stop], lse[start:stop], one[:1],
                                               temperature=temperature)[0]
        if need_hidden:
            dst = grad_hidden.view(B * T, H)[start:stop]
            if partial:
                weight_fp32 = _hidden_grad_fp32(dst, grad_rows, weight, weight_fp32)
            else:
                torch.mm(grad_rows, weight, out=dst)
        if need_weight:
            _add_weight_grad(grad_weight, grad_rows, rows)
        if need_bias:
            grad_bias += grad_rows.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


# ---- custom ops ------------------------------------------------------------------------------------

def _linear_backward_fake(hidden, weight, bias, *args):
    need_hidden, need_weight, need_bias = args[-3:]

    def like(t, needed):
        return t.new_empty(t.shape if needed else (0,), dtype=weight.dtype)
    return like(hidden, need_hidden), like(weight, need_weight), like(weight[:, 0], need_bias)


@custom_op("linear_backward", fake=_linear_backward_fake)
def linear_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, scale: Tensor, lse: Tensor,
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    lse_t: Optional[Tensor], fv_sum: Optional[Tensor], kappa_g: Optional[Tensor], alpha: Optional[Tensor],
    student_generated: Optional[Tensor], temperature: float, ignore_index: int,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. hidden, weight and bias of the REINFORCE form ``grad_logits =
    scale_t·(softmax(z/τ) − onehot(y_t))/τ`` — plus, for rao_blackwell (``teacher_hidden`` given), the
    full-vocabulary part ``κ·g·(a − q·S)/τ`` with the per-token ``lse_t, fv_sum, kappa_g, alpha,
    student_generated``. Unneeded gradients are empty tensors."""
    def flat(x, *shape):
        return x.float().contiguous().view(-1, *shape)

    teacher = full_vocab = None
    if teacher_hidden is not None:
        teacher = Head(teacher_hidden, teacher_weight, teacher_bias)
        full_vocab = (flat(lse_t, 2), flat(fv_sum), flat(kappa_g), flat(alpha), student_generated.contiguous())
    return _chunked_backward(Head(hidden, weight, bias), labels, flat(scale), flat(lse, 2), temperature, ignore_index,
                             need_hidden, need_weight, need_bias, teacher, full_vocab)


def _linear_grads(ctx, scale, full_vocab=(None,) * 8):
    """``(grad_hidden, grad_weight, grad_bias)`` for the inputs that need one, else None, from the
    saved ``hidden, weight, bias, labels, lse``, the per-token factor ``scale`` and, for
    rao_blackwell, the teacher head and per-token tensors of :func:`linear_backward`."""
    hidden, weight, bias, labels, lse = ctx.saved_tensors[:5]
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    if not any(need):
        return None, None, None
    grads = linear_backward(hidden, weight, bias, labels, scale, lse, *full_vocab, ctx.temperature,
                            ctx.ignore_index, *need)
    return tuple(g if needed else None for g, needed in zip(grads, need))


def _askd_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, _tlp, teacher_hidden, teacher_weight, teacher_bias, student_generated, alpha,
     kappa, _old, _groups, _w_max, estimator, _gamma, _norm, temperature, ignore_index) = inputs
    _value, _log_q, _log_ratio, _lam, coef, lse, lse_t, fv_sum = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, coef, teacher_hidden, teacher_weight, teacher_bias,
                          lse_t, fv_sum, alpha, student_generated, kappa)
    ctx.full_vocab = estimator == "rao_blackwell"
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.mark_non_differentiable(*output[1:])


def _askd_backward(ctx, grad_value, *_unused_grads):
    coef, t_hidden, t_weight, t_bias, lse_t, fv_sum, alpha, sgo, kappa = ctx.saved_tensors[5:]
    g = grad_value.float().unsqueeze(1)
    scale = coef * g  # κ·w·λ·g_b per token (the future term's factor for rao_blackwell)
    if not ctx.full_vocab:
        return _linear_grads(ctx, scale)
    T = coef.shape[1]
    per_token = [x.repeat_interleave(T) for x in ((kappa.unsqueeze(1) * g).squeeze(1), alpha, sgo)]
    return _linear_grads(ctx, scale, (t_hidden, t_weight, t_bias, lse_t, fv_sum, *per_token))


def _askd_forward_fake(hidden, weight, bias, labels, _tlp, _th, _tw, _tb, _sgo, _alpha, _kappa, _old, _groups,
                       _w_max, estimator, *_options):
    return forward_fake(labels, estimator == "rao_blackwell")


@custom_op("linear_askd_forward", fake=_askd_forward_fake, backward=_askd_backward,
           setup_context=_askd_setup_context)
def linear_askd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, teacher_logprobs: Optional[Tensor],
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    student_generated: Tensor, alpha: Tensor, kappa: Tensor, old_logprobs: Optional[Tensor],
    baseline_groups: Optional[Tensor], w_max: float, estimator: str, gamma: float, length_normalize: bool,
    temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked stage (a), then stage (b): the outputs of ``askd_forward`` for the materialised logits
    (``value [B]``, ``log_q, log_ratio, lam, coef`` [B, T], ``lse`` [B, T, 2], and for rao_blackwell
    ``lse_t`` [B, T, 2] and ``fv_sum`` [B, T], else empty). The teacher is ``teacher_logprobs`` or the
    head ``teacher_hidden @ teacher_weight.T + teacher_bias``."""
    B, T = labels.shape
    teacher = None if teacher_hidden is None else Head(teacher_hidden, teacher_weight, teacher_bias)
    per_token = None
    if estimator == "rao_blackwell":
        per_token = [x.repeat_interleave(T).contiguous() for x in (alpha, student_generated, kappa)]
    stats = _chunked_row_stats(Head(hidden, weight, bias), labels, teacher_logprobs, teacher, temperature,
                               ignore_index, per_token)
    log_q, log_ratio, lse = stats[:3]
    fv_value = stats[4] if per_token is not None else None
    lam, coef, value = run_coefficients(stages(hidden.device), log_q, log_ratio, labels, student_generated,
                                        alpha, kappa, old_logprobs, baseline_groups, w_max, estimator, gamma,
                                        length_normalize, ignore_index, fv_value=fv_value)
    extra = ((stats[3].view(B, T, 2), stats[5].view(B, T)) if per_token is not None
             else forward_fake(labels)[6:])
    return (value, *(x.view(B, T) for x in (log_q, log_ratio, lam, coef)), lse.view(B, T, 2), *extra)


def _logprobs_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.mark_non_differentiable(output[1])


def _logprobs_backward(ctx, grad_log_q, _grad_lse):
    labels, V = ctx.saved_tensors[3], ctx.saved_tensors[1].shape[0]
    # ∂log q/∂z = (onehot − softmax)/τ: stage (c)'s (softmax − onehot)/τ with factor −g. A label
    # outside [0, V) (unchecked on CUDA / under compile) has a NaN log q: its gradient row is NaN too.
    scale = torch.where((labels >= 0) & (labels < V), -grad_log_q.float(), float("nan"))
    return _linear_grads(ctx, torch.where(labels != ctx.ignore_index, scale, 0.0))


def _logprobs_fake(hidden, weight, bias, labels, temperature, ignore_index):
    log_q, lse = forward_fake(labels)[1::4]
    return log_q, lse


@custom_op("linear_logprobs_forward", fake=_logprobs_fake, backward=_logprobs_backward,
           setup_context=_logprobs_setup_context)
def linear_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                            temperature: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Chunked stage (a) without a teacher: ``log_q`` and ``lse``, fp32 [B, T], 0 at ignored positions."""
    log_q, _, lse = _chunked_row_stats(Head(hidden, weight, bias), labels, None, None, temperature, ignore_index)
    return log_q.view(labels.shape), lse.view(*labels.shape, 2)


# ---- vocabulary parallel: the weight's rows sharded over a process group --------------------------
#
# A ProcessGroup cannot be a custom-op argument, so the sharded path is a torch.autograd.Function over
# the same chunk loops. Collectives: the forward gathers the per-token shard statistics of the whole
# batch once (4 fp32 numbers per token and model); the backward all-reduces grad_hidden once.

def _sum_over_shards(partial: Tensor, group) -> Tensor:
    """``partial`` (a buffer of ours, fp32) summed over the group in place: one ``all_reduce``."""
    import torch.distributed as dist

    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial


class _VocabParallelASKD(torch.autograd.Function):
    """``linear_askd_forward`` with ``weight``/``bias`` (and the teacher head's) this rank's rows of
    the vocabulary; ``local`` the shard's labels. Same outputs, the same on every rank."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, local, teacher_logprobs, teacher_hidden, teacher_weight,
                teacher_bias, student_generated, alpha, kappa, old_logprobs, baseline_groups, w_max, estimator,
                gamma, length_normalize, temperature, ignore_index, group):
        B, T = labels.shape
        n = B * T
        student = Head(hidden, weight, bias)
        teacher = None if teacher_hidden is None else Head(teacher_hidden, teacher_weight, teacher_bias)
        (shard_stats,) = _chunked_row_stats(student, labels, None, teacher, temperature, ignore_index,
                                            local=local.view(n))
        log_q, log_p, lse, lse_t = gathered_label_stats(shard_stats, labels, ignore_index=ignore_index,
                                                        temperature=temperature, group=group)
        if log_p is None:
            log_p = teacher_logprobs.view(n)
        log_ratio = torch.where(labels.view(n) != ignore_index, log_p - log_q, 0.0)
        fv_value = fv_sum = None
        full_vocab = estimator == "rao_blackwell"
        if full_vocab:  # the second pass under the whole rows' pairs, one all_reduce of two numbers per token
            a, sgo, k = (x.repeat_interleave(T) for x in (alpha, student_generated, kappa))
            log_w, kinds = full_vocab_weights(a, sgo, k)
            (partial,) = _chunked_row_stats(student, labels, None, teacher, temperature, ignore_index,
                                            local=local.view(n), pairs=(lse, lse_t, log_w, kinds))
            fv_value, fv_sum = (x.contiguous() for x in _sum_over_shards(partial, group).unbind(1))
        lam, coef, value = run_coefficients(stages(hidden.device), log_q, log_ratio, labels, student_generated,
                                            alpha, kappa, old_logprobs, baseline_groups, w_max, estimator, gamma,
                                            length_normalize, ignore_index, fv_value=fv_value)
        saved = (teacher_hidden, teacher_weight, teacher_bias, lse_t, fv_sum) if full_vocab else (None,) * 5
        ctx.save_for_backward(hidden, weight, bias, local, lse, coef.view(B, T), alpha, student_generated, kappa,
                              *saved)
        ctx.options = (temperature, group, full_vocab)
        extra = (lse_t.view(B, T, 2), fv_sum.view(B, T)) if full_vocab else forward_fake(labels)[6:]
        outputs = (value, *(x.view(B, T) for x in (log_q, log_ratio, lam, coef)), lse.view(B, T, 2), *extra)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_value, *_unused):
        (hidden, weight, bias, local, lse, coef, alpha, sgo, kappa, t_hidden, t_weight, t_bias, lse_t,
         fv_sum) = ctx.saved_tensors
        temperature, group, full_vocab = ctx.options
        g = grad_value.float().unsqueeze(1)
        scale = (coef * g).view(-1)  # κ·w·λ·g_b per token, coef [B, T] (rao_blackwell: the future term's factor)
        teacher = full_vocab_args = None
        if full_vocab:
            T = coef.shape[1]
            teacher = Head(t_hidden, t_weight, t_bias)
            full_vocab_args = (lse_t, fv_sum, *(x.repeat_interleave(T) for x in ((kappa * g.squeeze(1)), alpha)),
                               sgo.repeat_interleave(T).contiguous())
        grads = _shard_backward(ctx, hidden, weight, bias, local, scale, lse, temperature, group, teacher,
                                full_vocab_args)
        return (*grads, *(None,) * 18)


def _shard_backward(ctx, hidden, weight, bias, local, scale, lse, temperature, group, teacher=None,
                    full_vocab=None):
    """``(grad_hidden, grad_weight, grad_bias)`` (None where not needed) of a vocabulary shard: stage
    (c) on the shard's columns from the whole rows' pairs ``lse`` (rao_blackwell: ``teacher`` and
    ``full_vocab`` as for :func:`_chunked_backward`, with the global ``lse_t`` and ``fv_sum``), this
    shard's rows of grad_weight and grad_bias, and grad_hidden summed over the shards (one
    ``all_reduce``, in fp32)."""
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    if not any(need):
        return None, None, None
    grad_hidden, grad_weight, grad_bias = _chunked_backward(
        Head(hidden, weight, bias), local, scale, lse.view(-1, 2), temperature, -1, *need, teacher, full_vocab,
        partial=True)
    if need[0]:
        grad_hidden = _sum_over_shards(grad_hidden, group).to(hidden.dtype)
    return tuple(g if needed else None for g, needed in zip((grad_hidden, grad_weight, grad_bias), need))


class _VocabParallelLogprobs(torch.autograd.Function):
    """``linear_logprobs_forward`` on this rank's rows of the vocabulary: ``log_q`` [B, T]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, local, temperature, ignore_index, group):
        n = labels.numel()
        (shard_stats,) = _chunked_row_stats(Head(hidden, weight, bias), labels, None, None, temperature,
                                            ignore_index, local=local.view(n))
        log_q, _log_p, lse, _lse_t = gathered_label_stats(shard_stats, labels, ignore_index=ignore_index,
                                                          temperature=temperature, group=group)
        # ∂log q/∂z = (onehot − softmax)/τ: stage (c)'s (softmax − onehot)/τ with factor −g; a NaN log q
        # (a label outside the vocabulary) makes its gradient row NaN, as on one device.
        ctx.save_for_backward(hidden, weight, bias, local, lse, log_q.isnan())
        ctx.options = (temperature, group)
        return log_q.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_log_q):
        hidden, weight, bias, local, lse, poisoned = ctx.saved_tensors
        temperature, group = ctx.options
        scale = torch.where(local.view(-1) != -1, -grad_log_q.float().reshape(-1), 0.0)
        scale = torch.where(poisoned, float("nan"), scale)
        grads = _shard_backward(ctx, hidden, weight, bias, local, scale, lse, temperature, group)
        return (*grads, *(None,) * 5)


# ---- public functions ------------------------------------------------------------------------------

def _check_head(hidden, weight, bias, names):
    """Checks of a linear head's inputs; ``names`` = (hidden, weight, bias) argument names.
    Returns ``(B, T, V)``."""
    h_name, w_name, b_name = names
    B, T, H = check.sequence_tensor(h_name, hidden)
    check.tensor(w_name, weight, ndim=2, floating=check.LOGIT_DTYPES)
    V = weight.shape[0]
    if weight.shape[1] != H or V == 0:
        raise ValueError(f"{w_name} must have shape [V > 0, H={H}] (H from {h_name}), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} has dtype {weight.dtype} but {h_name} has {hidden.dtype}; "
                        f"they must match")
    if bias is not None:
        check.tensor(b_name, bias, ndim=1, shape=(V,), floating=check.LOGIT_DTYPES)
        if bias.dtype != weight.dtype:
            raise TypeError(f"{b_name} has dtype {bias.dtype} but {w_name} has {weight.dtype}; "
                            f"they must match")
    check.same_device(hidden.device, reference=h_name, **{w_name: weight, b_name: bias})
    return B, T, V


def token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, lm_head_bias: Optional[Tensor] = None,
                   temperature: float = 1.0, ignore_index: int = -100, bias: Optional[Tensor] = None,
                   process_group=None) -> Tensor:
    """``log softmax((hidden @ weight.T + lm_head_bias)/τ)[labels]`` per token, without materialising logits.

    Args:
        hidden: ``[B, T, H]`` fp32/bf16/fp16, any strides; or flat ``[N, H]`` with ``[N]`` labels.
        weight: ``[V, H]``, the same dtype and device (an lm_head's weight).
        labels: ``[B, T]`` integer. Positions equal to ``ignore_index`` give 0 and no gradient (as
            the ``log_q`` stat of ``askd_loss``); other labels must be in ``[0, V)`` (checked for
            CPU tensors; on CUDA an out-of-range label gives NaN, as in ``askd_loss``).
        lm_head_bias: optional ``[V]``, the same dtype (the name ``askd_loss_from_hidden`` uses).
        temperature: τ > 0 applied to the logits.
        bias: the old name of ``lm_head_bias``; still accepted, with a ``DeprecationWarning``.
        process_group: vocabulary parallelism (see :func:`askd_loss_from_hidden`): ``weight`` and
            ``lm_head_bias`` are this rank's contiguous rows of the vocabulary (rank order, any
            widths); ``hidden`` and the global ``labels`` the same on every rank. Every rank gets the
            same result; the backward gives every rank the full ``grad_hidden`` and its own rows of the
            weight's and bias' gradients. One ``all_gather`` forward, one ``all_reduce`` backward.

    Returns fp32 ``[B, T]`` (``[N]`` for flat input), differentiable w.r.t. ``hidden``, ``weight``
    and ``lm_head_bias`` (gradients in their dtype; ``grad_weight``/``grad_bias`` accumulated in
    fp32). Typical uses: the teacher's
    ``teacher_logprobs`` for :func:`askd_loss_from_hidden` (under ``torch.no_grad()``), or the
    policy log-probs of RL objectives. Logits are computed in chunks in the inputs' dtype (see the
    module docstring); the result matches ``log_softmax`` of the materialised logits in that dtype
    with everything after the GEMM in fp32.
    """
    bias_name = "lm_head_bias"
    if bias is not None:
        if lm_head_bias is not None:
            raise TypeError("token_logprobs() got both lm_head_bias and bias (its old name); pass lm_head_bias")
        warnings.warn("token_logprobs(bias=...) is deprecated: the argument is now lm_head_bias, as in "
                      "askd_loss_from_hidden", DeprecationWarning, stacklevel=2)
        lm_head_bias, bias_name = bias, "bias"
    flat = isinstance(hidden, Tensor) and hidden.dim() == 2
    if flat:  # [N, H] with [N] labels: one row of N tokens
        check.tensor("labels", labels, integer=True)
        if tuple(labels.shape) != tuple(hidden.shape[:1]):
            raise ValueError(f"hidden is flat [N={hidden.shape[0]}, H] so labels must have shape "
                             f"({hidden.shape[0]},), got {tuple(labels.shape)}")
        hidden, labels = hidden.unsqueeze(0), labels.unsqueeze(0)
    B, T, V = _check_head(hidden, weight, lm_head_bias, ("hidden", "weight", bias_name))
    check.tensor("labels", labels, shape=(B, T), integer=True)
    check.same_device(hidden.device, reference="hidden", labels=labels)
    temperature = check.temperature(temperature)
    check.integer("ignore_index", ignore_index)
    group = distributed.vocab_group(process_group)
    if group is not None:
        start, total = distributed.vocab_shard(V, group)
        check.labels_in_vocab(labels, ignore_index, total, vocabulary="the rows of weight over process_group")
        labels = check.index_labels(labels)
        local = distributed.local_labels(labels, start, V, ignore_index).contiguous()
        log_q = _VocabParallelLogprobs.apply(hidden, weight, lm_head_bias, labels, local, temperature, ignore_index,
                                             group)
        return log_q.view(-1) if flat else log_q
    check.labels_in_vocab(labels, ignore_index, V, vocabulary="the rows of weight")
    log_q, _lse = linear_logprobs_forward(hidden, weight, lm_head_bias, check.index_labels(labels), temperature,
                                          ignore_index)
    return log_q.view(-1) if flat else log_q


def askd_loss_from_hidden(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Optional[Tensor] = None,
    teacher_logprobs: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_lm_head_weight: Optional[Tensor] = None,
    teacher_lm_head_bias: Optional[Tensor] = None,
    **options,
):
    """``askd_loss`` of the logits ``student_hidden @ lm_head_weight.T + lm_head_bias``, computed
    chunk by chunk so that tokens × vocabulary logits never exist (peak extra memory O(chunk × V)).

    ``student_hidden [B, T, H]``, ``lm_head_weight [V, H]`` and ``lm_head_bias [V]`` share one
    floating dtype (fp32/bf16/fp16) and get gradients in it. The teacher comes either as
    ``teacher_logprobs [B, T]`` (e.g. :func:`token_logprobs` of the teacher's head under
    ``torch.no_grad()``) or as its own head — ``teacher_hidden [B, T, H_t]``,
    ``teacher_lm_head_weight [V_t, H_t]``, optional ``teacher_lm_head_bias [V_t]`` (one dtype,
    detached) — whose logits are formed chunk by chunk too; ``estimator="rao_blackwell"`` needs the
    head. Every other argument (``student_generated``, ``alpha``, ``clip``, …, ``return_stats``: the
    keyword-only options of :func:`askd_kernels.askd_loss`, with the same defaults), the value and
    the gradient are those of ``askd_loss`` on the materialised logits (which are rounded to the
    inputs' dtype there too); ``grad_weight``/``grad_bias`` are accumulated in fp32 over the chunks
    and returned in the weight's dtype.

    ``process_group``: vocabulary parallelism over a ``torch.distributed`` ``ProcessGroup``
    (``TypeError`` for anything else). ``lm_head_weight`` / ``lm_head_bias`` are then this rank's
    contiguous rows of the vocabulary ``[start_r, start_r + width_r)`` (in rank order; widths may
    differ), and so are ``teacher_lm_head_weight`` / ``teacher_lm_head_bias`` (the same width as
    the student's on each rank, a ``ValueError`` otherwise) — or ``teacher_logprobs`` are given
    whole. ``student_hidden``, ``teacher_hidden``, the global ``labels`` (checked against all
    shards' rows together) and every option are the same on every rank, and every rank must make
    the call. Every rank gets the loss and stats of the unsharded call; the backward gives every
    rank the whole ``grad_hidden`` (the same on all ranks) and its own rows of ``grad_weight`` /
    ``grad_bias``. Collectives: one ``all_gather`` of 4 fp32 numbers per token (8 with the teacher's
    head) and, for ``rao_blackwell``, one ``all_reduce`` of 2 in the forward; one ``all_reduce`` of
    the fp32 ``grad_hidden`` in the backward; plus, the first time a shard width is seen, one
    exchange of the widths. The sharded path is a ``torch.autograd.Function`` over the same chunk
    loops, not one of the custom ops.
    """
    B, T, V = _check_head(student_hidden, lm_head_weight, lm_head_bias,
                          ("student_hidden", "lm_head_weight", "lm_head_bias"))
    check.tensor("labels", labels, shape=(B, T), integer=True)
    if teacher_logprobs is None and teacher_hidden is None:
        raise TypeError("askd_loss_from_hidden() missing the teacher: pass teacher_logprobs, or teacher_hidden "
                        "with teacher_lm_head_weight")
    if teacher_logprobs is not None and teacher_hidden is not None:
        raise ValueError("pass exactly one of teacher_logprobs and teacher_hidden (with teacher_lm_head_weight)")
    teacher = None
    if teacher_hidden is not None:
        if teacher_lm_head_weight is None:
            raise ValueError("teacher_hidden needs teacher_lm_head_weight")
        _check_head(teacher_hidden, teacher_lm_head_weight, teacher_lm_head_bias,
                    ("teacher_hidden", "teacher_lm_head_weight", "teacher_lm_head_bias"))
        if teacher_hidden.shape[:2] != (B, T):
            raise ValueError(f"teacher_hidden must have shape [B={B}, T={T}, H_t], got {tuple(teacher_hidden.shape)}")
        teacher = tuple(None if x is None else x.detach()
                        for x in (teacher_hidden, teacher_lm_head_weight, teacher_lm_head_bias))
    else:
        check.tensor("teacher_logprobs", teacher_logprobs, shape=(B, T), floating=check.LOGIT_DTYPES)
    options = bind_options("askd_loss_from_hidden", options)
    return_stats = options.pop("return_stats")
    group = distributed.vocab_group(options["process_group"])
    if group is not None and teacher is not None and teacher_lm_head_weight.shape[0] != V:
        raise ValueError(f"with process_group, teacher_lm_head_weight must hold the same rows of the vocabulary "
                         f"as lm_head_weight: {V} rows on this rank, got {teacher_lm_head_weight.shape[0]}")
    # With process_group the labels are checked last, against all shards' rows together (the first
    # call with a given width exchanges the widths: a collective, after every other check).
    args = check_askd_options(student_hidden.device, labels, V,
                              teachers={"teacher_logprobs": teacher_logprobs, "teacher_hidden": teacher_hidden},
                              reference="student_hidden", **options)
    if group is not None:
        start, _total = distributed.vocab_shard(V, group)  # remembered from the check: no exchange
        local = distributed.local_labels(args.labels, start, V, args.ignore_index).contiguous()
        outputs = _VocabParallelASKD.apply(student_hidden, lm_head_weight, lm_head_bias, args.labels, local,
                                           detached_fp32(teacher_logprobs), *(teacher or (None,) * 3),
                                           *args.op_args(), group)
        return finish_askd(outputs, args, return_stats)
    outputs = linear_askd_forward(student_hidden, lm_head_weight, lm_head_bias, args.labels,
                                  detached_fp32(teacher_logprobs), *(teacher or (None,) * 3), *args.op_args())
    return finish_askd(outputs, args, return_stats)


# help() and IDEs show the options askd_loss_from_hidden forwards, with askd_loss's defaults.
askd_loss_from_hidden.__signature__ = inspect.Signature(
    [p for p in inspect.signature(askd_loss_from_hidden).parameters.values() if p.kind is not p.VAR_KEYWORD]
    + option_parameters())
