"""The public op of the ASKD family: ``askd_loss`` and its module ``ASKDLoss`` (``docs/contract.md`` §1–4, §7)."""
import inspect
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import _checks as check
from .. import _packed, distributed
from .ops import _Layout, askd_forward, askd_packed_forward
from .triton_coefficients import ESTIMATORS


def askd_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Optional[Tensor] = None,
    *,
    teacher_logprobs: Optional[Tensor] = None,
    student_generated: Union[Tensor, bool],
    alpha: Union[Tensor, float],
    clip: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    is_max: Optional[float] = None,
    estimator: str = "exact",
    baseline_groups: Optional[Tensor] = None,
    gamma: float = 1.0,
    length_normalize: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Optional[Union[int, float, Tensor]] = None,
    return_stats: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    process_group=None,
):
    """The ASKD sampled-token loss on teacher-generated (SKL) and student-generated (SRKL) outputs.

    Args:
        student_logits: ``[B, T, V_s]`` fp32/bf16/fp16, any strides; ``logits[b, t]`` predicts
            ``labels[b, t]``. The only input that receives a gradient. With ``cu_seqlens`` or
            ``position_ids`` the rows are packed (several sequences per row) and a flat ``[N, V_s]``
            with ``[N]`` labels is accepted too; see "Packed rows" below.
        labels: ``[B, T]`` integer; ``ignore_index`` marks positions that take no part anywhere.
            Other labels must be in ``[0, V_s)`` (checked for CPU tensors; on CUDA an out-of-range
            label gives a NaN loss instead of an error, since checking would sync the device).
        teacher_logits: ``[B, T, V_t]`` (V_t may differ from V_s; a label ≥ V_t has p = 0).
        teacher_logprobs: ``[B, T]`` teacher log p(labels), used as given (no temperature).
            Exactly one of ``teacher_logits`` / ``teacher_logprobs``.
        student_generated: ``[B]`` bool (True = SGO, trained with SRKL; False = TGO, with SKL), or
            one python bool for the whole batch.
        alpha: skewness, the **student's** weight in the mixture ``m = α q + (1−α) p``: ``[B]`` or
            a float in [0, 1] (checked for floats and CPU tensors; on CUDA a value outside gives NaN
            for that sequence).
        clip: ``[B]`` bool, True = κ = 0 (a correct SGO: no loss, no gradient). Ignored for TGOs.
        old_logprobs: ``[B, T]`` log q_old(labels) of the policy that sampled the SGOs; enables the
            importance weight ``min(q/q_old, is_max)`` on SGO tokens (detached).
        is_max: cap of the importance weight (> 0); None = no cap.
        estimator: ``"exact"`` (unbiased, default), ``"rao_blackwell"`` (unbiased, lower variance,
            needs ``teacher_logits``: the full-vocabulary skl/srkl of each token plus the
            sampled-token future return; the recommended choice when teacher logits exist),
            ``"paper"`` (Eqs. 10–11) or ``"sequence"`` (Eqs. 8–9); see ``docs/contract.md`` §3.
        baseline_groups: ``[B]`` integer group ids (responses to the same prompt share one), for
            ``exact`` and ``rao_blackwell``: each SGO's return is reduced by the leave-one-out mean
            of the other unclipped SGOs of its group at the same position (unbiased; lower variance).
        gamma: discount in (0, 1] of the cumulative mixture term G_t; [0, 1] for ``rao_blackwell``,
            where γ = 0 is the token-level full-vocabulary loss.
        length_normalize: divide G_t by the discounted number of remaining valid tokens (not with
            ``rao_blackwell``).
        temperature: τ > 0 applied to both logits (not to ``teacher_logprobs``).
        reduction: ``"mean"`` (Σ_b κ_b D_b / N), ``"sum"``, or ``"none"`` (the [B] vector κ_b D_b).
        num_items: N for ``"mean"``; default the number of valid tokens in the batch (a device
            tensor, no sync). An all-ignored batch gives 0.
        return_stats: also return a dict of detached fp32 ``[B, T]`` tensors: ``log_q``,
            ``log_ratio`` (ℓ_t), ``lam`` (λ_t), ``coef`` (κ_b·w_t·λ_t, the gradient's factor),
            all 0 at ignored positions.
        cu_seqlens: packed rows: ``[S + 1]`` integer cumulative sequence lengths over the tokens in
            row-major order (``[0, n_1, n_1 + n_2, …, N]``, as flash-attention's varlen functions).
        position_ids: packed rows, the other way: ``[B, T]`` (or ``[N]``; ``[1, N]`` for flat input)
            integer; a sequence starts wherever it is 0 and at the start of each row (as
            ``transformers`` derives the sequences from ``DataCollatorWithFlattening``'s position ids).
        max_seqlen: with ``cu_seqlens``, the longest sequence's length (≥ it) as a python int; saves
            the one device sync that otherwise reads it.
        process_group: vocabulary parallelism (``docs/contract.md`` §7, "Vocabulary parallel:
            askd_loss"): a ``torch.distributed`` ``ProcessGroup`` over which the vocabulary is
            sharded. Rank r passes its contiguous slice of columns ``[start_r, start_r + width_r)``
            (in rank order; widths may differ) of ``student_logits`` and of ``teacher_logits``
            (the same width as the student's on a rank; ``teacher_logprobs`` stay whole), and the
            same ``labels`` (global vocabulary ids, checked against the total width) and options as
            every other rank. Every rank gets the same loss and stats — those of the unsharded
            call — and its backward writes exactly this rank's columns of the unsharded gradient,
            with no collective. The forward runs one ``all_gather`` (plus one ``all_reduce`` for
            ``rao_blackwell``); the first call with a given shard width also exchanges the widths.
            Every rank must make the call. None (default): one device, the whole vocabulary.

    Packed rows: with ``cu_seqlens`` or ``position_ids`` the S sequences are the units of the loss.
    ``student_generated``, ``alpha``, ``clip`` and ``baseline_groups`` are then ``[S]``, indexed by
    sequence in order; the suffix scans restart at every boundary; ``reduction="none"`` gives the
    ``[S]`` values; ``labels``, ``teacher_logprobs``, ``old_logprobs`` and the stats keep the tokens'
    shape. The result equals, bit for bit, that of the padded ``[S, L, V]`` call (L the longest
    sequence, the rest ``ignore_index``), value and gradient, on both backends.

    Returns the loss (fp32), or ``(loss, stats)``. Its backward is the REINFORCE-style gradient of
    ``docs/contract.md`` §4, ``g·κ·w·λ·(softmax(z/τ) − onehot(y))/τ``, not the derivative of the value.
    """
    # ---- validation: everything before any kernel (or collective) runs -------------------------
    group = distributed.vocab_group(process_group)
    packed = cu_seqlens is not None or position_ids is not None
    check.not_swapped(labels, teacher_logits)
    if packed:
        V_s = _packed.token_shapes("student_logits", student_logits, "labels", labels, flat_ok=True)
    else:
        if isinstance(student_logits, Tensor) and student_logits.dim() == 2:
            raise ValueError(f"student_logits must be [B, T, V], or flat [N, V] with cu_seqlens or position_ids "
                             f"(ASKD's scans need the sequences), got shape {tuple(student_logits.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens (or position_ids)")
        _b, _t, V_s = check.sequence_tensor("student_logits", student_logits)
        check.tensor("labels", labels, shape=(_b, _t), integer=True)
    tokens = tuple(labels.shape)
    if (teacher_logits is None) == (teacher_logprobs is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_logprobs")
    if teacher_logits is not None:
        check.teacher_logits(teacher_logits, tokens)
        if group is not None and teacher_logits.shape[-1] != V_s:
            raise ValueError(f"with process_group, teacher_logits must hold the same vocabulary columns as "
                             f"student_logits on each rank: width {teacher_logits.shape[-1]} != {V_s}")
    else:
        check.tensor("teacher_logprobs", teacher_logprobs, shape=tokens, floating=check.LOGIT_DTYPES)
    device = student_logits.device
    layout = None
    if packed:
        check.same_device(device, labels=labels)
        layout = _packed.layout(labels, device, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                max_seqlen=max_seqlen)
    args = check_askd_options(
        device, labels, V_s, batch=None if layout is None else layout.num_seqs,
        teachers={"teacher_logits": teacher_logits, "teacher_logprobs": teacher_logprobs},
        student_generated=student_generated, alpha=alpha, clip=clip, old_logprobs=old_logprobs,
        is_max=is_max, estimator=estimator, gamma=gamma, length_normalize=length_normalize,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        baseline_groups=baseline_groups, process_group=group)

    if group is not None:
        return _vocab_parallel(student_logits, labels, teacher_logits, teacher_logprobs, args, layout, return_stats)
    # ---- stages (a) + (b) in one custom op; the reduction stays in autograd-visible torch ------
    if layout is not None:
        n = labels.numel()
        outputs = askd_packed_forward(
            _packed.per_token_view(student_logits, n), args.labels.view(n, 1),
            _packed.per_token_view(None if teacher_logits is None else teacher_logits.detach(), n),
            None if teacher_logprobs is None else detached_fp32(teacher_logprobs).view(n, 1),
            args.student_generated, args.alpha, args.kappa,
            None if args.old_logprobs is None else args.old_logprobs.view(n), args.baseline_groups,
            layout.seq_of_token, layout.slot, layout.gather, *args.op_args()[5:])
        value, *rest = outputs
        outputs = (value, *(x.view(*tokens, *x.shape[2:]) if x.numel() else x for x in rest))
        return finish_askd(outputs, args, return_stats)
    outputs = askd_forward(
        student_logits, args.labels, None if teacher_logits is None else teacher_logits.detach(),
        detached_fp32(teacher_logprobs), *args.op_args())
    return finish_askd(outputs, args, return_stats)


def _vocab_parallel(student_logits, labels, teacher_logits, teacher_logprobs, args, layout, return_stats):
    """``askd_loss`` on a vocabulary shard (validated ``args`` with a ``process_group``): the
    autograd function of :mod:`.vocab_parallel`, then the same reduction as the one-device call."""
    from .vocab_parallel import VocabParallelASKD

    teacher = None if teacher_logits is None else teacher_logits.detach()
    options = args.op_args()
    if layout is None:
        outputs = VocabParallelASKD.apply(student_logits, args.labels, teacher, detached_fp32(teacher_logprobs),
                                          *options[:5], None, *options[5:], args.process_group)
        return finish_askd(outputs, args, return_stats)
    n = labels.numel()
    maps = _Layout(layout.seq_of_token, layout.slot, layout.gather)
    outputs = VocabParallelASKD.apply(
        _packed.per_token_view(student_logits, n), args.labels.view(n, 1), _packed.per_token_view(teacher, n),
        None if teacher_logprobs is None else detached_fp32(teacher_logprobs).view(n, 1),
        *options[:3], None if args.old_logprobs is None else args.old_logprobs.view(n), args.baseline_groups,
        maps, *options[5:], args.process_group)
    value, *rest = outputs
    return finish_askd((value, *(x.view(labels.shape) for x in rest)), args, return_stats)


def detached_fp32(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.detach().float().contiguous()


class ASKDArgs(NamedTuple):
    """The validated options of an ASKD call, in the form the custom ops take them."""
    labels: Tensor                    # contiguous [B, T]
    student_generated: Tensor         # int32 [B]
    alpha: Tensor                     # fp32 [B]
    kappa: Tensor                     # fp32 [B], 0 = clipped SGO
    old_logprobs: Optional[Tensor]    # detached fp32 contiguous [B, T]
    baseline_groups: Optional[Tensor]  # int64 [B]
    w_max: float
    estimator: str
    gamma: float
    length_normalize: bool
    temperature: float
    ignore_index: int
    reduction: str
    num_items: Optional[Union[float, Tensor]]
    process_group: object = None      # a torch.distributed ProcessGroup: the vocabulary is sharded over it

    def op_args(self):
        """The custom ops' arguments after the logits (or hidden states) and the teacher."""
        return (self.student_generated, self.alpha, self.kappa, self.old_logprobs, self.baseline_groups,
                self.w_max, self.estimator, self.gamma, self.length_normalize, self.temperature, self.ignore_index)


def check_askd_options(device, labels, vocab, *, teachers, student_generated, alpha, clip, old_logprobs,
                       is_max, estimator, gamma, length_normalize, temperature, ignore_index, reduction,
                       num_items, baseline_groups, reference="student_logits", batch=None,
                       process_group=None) -> ASKDArgs:
    """The checks every ASKD entry point shares, after its own checks of the student, ``labels``
    (already known to be [B, T] integer, or any shape of tokens for packed rows) and the teacher
    tensors (``teachers``: name → tensor or None, checked here only for their device). ``reference``
    names the argument whose device is ``device``; ``vocab`` is the student vocabulary the labels
    must lie in; ``batch`` the number of sequences, default ``labels.shape[0]`` (packed rows: S).

    With ``process_group`` (vocabulary parallel) ``vocab`` is this rank's shard width: after every
    other check, :func:`askd_kernels.distributed.vocab_shard` (a collective the first time a width
    is seen) gives the total width the labels are checked against; the group is returned in
    ``ASKDArgs.process_group``."""
    group = distributed.vocab_group(process_group)
    B = labels.shape[0] if batch is None else batch
    if old_logprobs is not None:
        check.tensor("old_logprobs", old_logprobs, shape=labels.shape, floating=check.LOGIT_DTYPES)
    if clip is not None:
        check.tensor("clip", clip, ndim=1, shape=(B,), boolean=True)
    check.same_device(device, reference=reference, labels=labels, **teachers, old_logprobs=old_logprobs,
                      clip=clip)
    sgo = check.per_sequence_flag("student_generated", student_generated, B, device)
    alpha = check.per_sequence_alpha(alpha, B, device)
    w_max = float("inf") if is_max is None else check.number("is_max", is_max, low=0.0, low_open=True)
    check.choice("estimator", estimator, tuple(ESTIMATORS))
    full_vocab = estimator == "rao_blackwell"
    if full_vocab and teachers.get("teacher_logits") is None and teachers.get("teacher_hidden") is None:
        raise ValueError("estimator='rao_blackwell' needs the teacher's logits (teacher_logits, or "
                         "teacher_hidden with its head): it sums over the teacher's vocabulary; "
                         "teacher_logprobs are not enough")
    # γ = 0 is allowed only where it means something: rao_blackwell's token-level full-vocabulary loss.
    gamma = check.number("gamma", gamma, low=0.0, high=1.0, low_open=not full_vocab)
    if not isinstance(length_normalize, bool):
        raise TypeError(f"length_normalize must be a bool, got {type(length_normalize).__name__}")
    if full_vocab and length_normalize:
        raise ValueError("length_normalize is not defined for estimator='rao_blackwell'")
    if baseline_groups is not None:
        check.tensor("baseline_groups", baseline_groups, ndim=1, shape=(B,), integer=True)
        check.same_device(device, reference=reference, baseline_groups=baseline_groups)
        if estimator not in ("exact", "rao_blackwell"):
            raise ValueError(f"baseline_groups needs estimator 'exact' or 'rao_blackwell', got {estimator!r}")
        baseline_groups = baseline_groups.to(torch.int64).contiguous()
    temperature = check.temperature(temperature)
    check.integer("ignore_index", ignore_index)
    num_items = check.reduction_and_num_items(reduction, num_items, device)
    vocabulary = "the student vocabulary"
    if group is not None:  # the last check: the widths' exchange is a collective
        vocab = distributed.vocab_shard(vocab, group)[1]
        vocabulary = "the student vocabulary, all shards of process_group together"
    check.labels_in_vocab(labels, ignore_index, vocab, vocabulary)
    kappa = torch.where(sgo & clip, 0.0, 1.0) if clip is not None else torch.ones(B, device=device)
    return ASKDArgs(check.index_labels(labels), sgo.to(torch.int32), alpha, kappa.float(),
                    detached_fp32(old_logprobs), baseline_groups, w_max, estimator, gamma, length_normalize, temperature,
                    ignore_index, reduction, num_items, group)


def finish_askd(outputs, args: ASKDArgs, return_stats: bool):
    """The reduction of the per-sequence values (differentiable torch ops) and the optional stats,
    from a forward op's ``(value, log_q, log_ratio, lam, coef, lse)``."""
    value, log_q, log_ratio, lam, coef = outputs[:5]
    loss = check.apply_reduction(value, args.labels, args.ignore_index, args.reduction, args.num_items)
    if return_stats:
        return loss, {"log_q": log_q, "log_ratio": log_ratio, "lam": lam, "coef": coef}
    return loss


# askd_loss's packed-row arguments, which askd_loss_from_hidden does not take.
PACKING = ("cu_seqlens", "position_ids", "max_seqlen")


def option_parameters():
    """The keyword-only options of :func:`askd_loss` that every ASKD entry point shares (all but the
    teacher tensors), as ``inspect.Parameter`` objects: their names and defaults are askd_loss's."""
    own = ("teacher_logprobs",) + PACKING
    return [p for p in inspect.signature(askd_loss).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in own]


def bind_options(function: str, options: dict) -> dict:
    """``options`` completed with :func:`askd_loss`'s defaults; a ``TypeError`` naming ``function``
    and the argument for a missing required option or an unknown one."""
    params = {p.name: p for p in option_parameters()}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    bound = {}
    for name, p in params.items():
        if name not in options and p.default is inspect.Parameter.empty:
            raise TypeError(f"{function}() missing required keyword argument {name!r}")
        bound[name] = options.get(name, p.default)
    return bound


class ASKDLoss(nn.Module):
    """``nn.Module`` over :func:`askd_loss`: construct with the options, call with the tensors.

    ``ASKDLoss(estimator="exact", reduction="mean")(student_logits, labels, teacher_logits,
    student_generated=sgo, alpha=alpha, clip=clip)``; per-call keyword arguments override the
    options given at construction.
    """

    def __init__(self, **options):
        super().__init__()
        allowed = {"estimator", "gamma", "length_normalize", "temperature", "ignore_index", "reduction",
                   "baseline_groups",
                   "num_items", "is_max", "return_stats", "alpha", "student_generated", "clip",
                   "process_group"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"ASKDLoss got unknown option(s): {', '.join(sorted(unknown))}")
        self.options = options

    def forward(self, student_logits, labels, teacher_logits=None, **kwargs):
        return askd_loss(student_logits, labels, teacher_logits, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))
