"""ASKD with ``transformers`` causal LMs: Algorithm 1 of the paper, and a ``Trainer`` ``compute_loss``.

``transformers`` is an optional dependency: it is imported lazily, inside the functions that need it
(``generate`` configs, the ``Trainer`` subclass). Everything else here only needs a model whose call
``model(input_ids=..., attention_mask=..., position_ids=...)`` returns an object with ``.logits`` and
that has ``.generate`` — i.e. any ``transformers`` causal LM.

One epoch of Algorithm 1 (:meth:`ASKDDistiller.epoch`):

1. **Sample.** For every prompt, ``group_size`` responses from the teacher (TGOs) and from the
   student (SGOs), with ``generate(do_sample=True, top_k=0, top_p=1)`` (the models' own
   distributions, so the stored log-probs are those of the sampling policy at τ = 1).
2. **Score.** ``reward_fn(prompts, responses)`` → one float per response. α = Φ(β·r̂) by
   :func:`askd_kernels.skew_from_rewards` with r̂ normalised per group of responses to the same prompt
   from the same source (GRPO), or over the source's batch when ``group_size == 1`` (REINFORCE++).
   κ: an SGO whose reward reaches ``correct_threshold`` is clipped (Eq. 13).
3. **Store.** Teacher per-token log-probs of every response (one no-grad forward) and the student's
   old-policy log-probs (for importance sampling when an SGO is reused over several iterations).
4. **Optimise.** ``iterations`` passes (T) over the shuffled union of TGOs and SGOs in micro-batches,
   each a step of :func:`compute_askd_loss` (estimator ``"auto"``: ``rao_blackwell``, with the
   teacher's logits). With ``log_grad_split`` the TGO and SGO parts of each step's gradient are
   taken separately (:func:`compute_askd_loss_parts`) and their norms and cosine logged.

Sequence layout (one row per response): ``[left-padded prompt | response | right padding]``.
``labels[b, t]`` is the token at ``t`` for response tokens, up to and including the EOS that ends
the response, and ``ignore_index`` for prompt, left padding and everything after that EOS (which is
replaced by ``pad_token_id`` and masked out of attention). The loss aligns ``logits[:, :-1]`` with
``labels[:, 1:]``; stored per-token log-probs have the shape of ``labels`` and hold, at column t,
``log π(input_ids[t] | input_ids[:t])`` (0 where the label is ignored).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..askd import askd_loss
from ..divergence import divergence_loss
from ..skew import skew_from_rewards

LOSSES = ("askd", "full_vocab", "grpo", "sft")
ESTIMATORS = ("auto", "exact", "rao_blackwell", "paper", "sequence")
# The signature of a too-small rollout: the SGO part of the gradient is at least
# GRAD_SPLIT_RATIO times the TGO part and nearly orthogonal to it (cosine below GRAD_SPLIT_COSINE).
GRAD_SPLIT_RATIO = 3.0
GRAD_SPLIT_COSINE = 0.2


@dataclass
class ASKDConfig:
    """Options of one ASKD run (Algorithm 1) and of :func:`compute_askd_loss`.

    ``loss`` selects the objective (the ablations of the paper's Table 3 and the baselines):

    * ``"askd"`` — the sampled-token ASKD loss (:func:`askd_kernels.askd_loss`): SKL on TGOs,
      SRKL on SGOs, per-sequence α, κ, importance weights.
    * ``"full_vocab"`` — the same objective without the Monte-Carlo estimate: the full-vocabulary
      :func:`askd_kernels.divergence_loss` ``skl`` on TGOs and ``srkl`` on SGOs, same α and κ
      (with ``adaptive_skew=False, clip_correct=False`` and α = (0.9, 0.1) it is DistiLLM-2's loss).
    * ``"grpo"`` — GRPO-style multiplicative advantage: the per-sequence sampled-token SKL/SRKL at
      α = ``fixed_alpha_*`` multiplied by the group-normalised reward r̂ (no adaptive α, no κ).
    * ``"sft"`` — cross-entropy on the TGOs (SFT on teacher outputs); SGOs are not used.

    ``estimator`` (``"askd"`` and ``"grpo"``) is that of :func:`askd_kernels.askd_loss`, or
    ``"auto"`` (the default): ``"rao_blackwell"`` whenever :func:`compute_askd_loss` is given the
    teacher model (as :class:`ASKDDistiller` and ``ASKDTrainer`` always do) — the full-vocabulary
    skl/srkl gradient of each token plus the sampled future return, the same expectation as
    ``"exact"`` with lower variance; it runs the teacher (no grad) on every batch for its logits —
    and ``"exact"`` otherwise (only ``teacher_logprobs`` in the batch) or with ``length_normalize``
    (which ``rao_blackwell`` does not define).

    ``baseline=True`` (``"askd"`` with the ``exact`` or ``rao_blackwell`` estimator) passes the
    batch's ``prompt_index`` as ``baseline_groups``: each SGO's return is reduced by the
    leave-one-out mean return of the other unclipped SGOs to the same prompt in the same batch
    (unbiased). TGO rows share the ids too; they are ignored.

    ``log_grad_split=True`` makes every optimisation step of :class:`ASKDDistiller` (and every
    training ``compute_loss`` of ``ASKDTrainer``) take the parameter gradients of the TGO part and
    of the SGO part of the loss separately (one forward, two backward passes) and log their norms
    and cosine; see :meth:`ASKDDistiller.epoch` for the keys.

    ``sample_every`` is read by ``ASKDTrainer`` only: the optimizer steps between two rollouts (the
    paper's epoch; default ``iterations``, i.e. one step per pass). ``micro_batch_size`` also chunks
    the no-grad log-prob forwards at sampling time.
    """
    # sampling
    group_size: int = 4                 # responses per prompt and source; 1 = batch-normalised rewards
    max_new_tokens: int = 16
    use_teacher_outputs: bool = True    # TGOs
    use_student_outputs: bool = True    # SGOs
    # rewards -> alpha, kappa
    loss: str = "askd"
    adaptive_skew: bool = True          # α = Φ(β r̂); False: the fixed α below
    beta: float = 1.0                   # β of Eq. 12
    fixed_alpha_tgo: float = 0.5
    fixed_alpha_sgo: float = 0.5
    clip_correct: bool = True           # κ = 0 for SGOs with reward >= correct_threshold (Eq. 13)
    correct_threshold: float = 1.0
    # optimisation
    iterations: int = 2                 # T passes over each epoch's rollouts
    micro_batch_size: Optional[int] = None   # None: the whole rollout in one step
    max_grad_norm: Optional[float] = 1.0
    importance_sampling: bool = True    # old-policy log-probs of SGOs -> w_t = min(q/q_old, is_max)
    is_max: Optional[float] = 5.0
    # loss options (passed to askd_loss / divergence_loss)
    estimator: str = "auto"             # "auto": rao_blackwell when the teacher model is at hand, else exact
    baseline: bool = False              # leave-one-out baseline over the SGOs of a prompt (batch["prompt_index"])
    gamma: float = 0.5                  # discount of the future return: the recipe's 0.5 (docs/integration.md);
                                        # 1.0 is the paper's undiscounted objective, 0 the token-level loss
    length_normalize: bool = False
    temperature: float = 1.0
    ignore_index: int = -100
    collect_lambda: bool = False        # keep the per-token λ of TGOs / SGOs (the paper's Fig. 1(b))
    # diagnostics
    log_grad_split: bool = False        # per step: ‖∇ TGO part‖, ‖∇ SGO part‖, their cosine (one more backward)
    # ASKDTrainer only
    sample_every: Optional[int] = None  # optimizer steps per rollout (the paper's epoch); None: `iterations`

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("group_size", "iterations", "max_new_tokens", "sample_every"):
            value = getattr(self, name)
            if name == "sample_every" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1{' or None' if name == 'sample_every' else ''}, "
                                 f"got {value!r}")
            setattr(self, name, int(value))
        if not (self.use_teacher_outputs or self.use_student_outputs):
            raise ValueError("use at least one of teacher / student outputs")
        if self.loss == "sft" and not self.use_teacher_outputs:
            raise ValueError("loss='sft' trains on teacher outputs")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator == "rao_blackwell" and self.length_normalize:
            raise ValueError("length_normalize is not defined for estimator='rao_blackwell'")
        if self.baseline and (self.loss != "askd" or self.estimator not in ("auto", "exact", "rao_blackwell")):
            raise ValueError("baseline=True needs loss='askd' and estimator 'auto', 'exact' or 'rao_blackwell', "
                             f"got loss={self.loss!r}, estimator={self.estimator!r}")

    def resolved_estimator(self, teacher_available: bool) -> str:
        """The estimator :func:`compute_askd_loss` uses: ``estimator``, with ``"auto"`` resolved to
        ``"rao_blackwell"`` when the teacher model is available (and ``length_normalize`` is off),
        else ``"exact"``."""
        if self.estimator != "auto":
            return self.estimator
        return "rao_blackwell" if teacher_available and not self.length_normalize else "exact"


# --------------------------------------------------------------------------------------------------
# sequences, labels and per-token log-probs
# --------------------------------------------------------------------------------------------------

def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding (what ``generate`` uses): cumsum(mask) − 1, ≥ 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_sequences(prompt_ids: Tensor, prompt_mask: Tensor, sequences: Tensor, *, eos_token_id,
                    pad_token_id: int, ignore_index: int = -100):
    """From ``generate`` output to ``(input_ids, attention_mask, labels)``, all ``[N, P + L]``.

    ``sequences`` is ``[prompt (P columns, as given to generate) | generated tokens]``. Response
    tokens up to and including the first EOS are labels; tokens after it become ``pad_token_id``
    with attention 0 and label ``ignore_index`` (so a model whose pad id equals its EOS id is handled
    too). A response without EOS (cut at ``max_new_tokens``) keeps all its tokens as labels.
    """
    P = prompt_ids.shape[1]
    if sequences.shape[1] < P or not torch.equal(sequences[:, :P], prompt_ids):
        raise ValueError("sequences must start with the prompt ids")
    response = sequences[:, P:]
    eos_ids = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                              device=response.device)
    is_eos = torch.isin(response, eos_ids).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0          # strictly after the first EOS
    keep = ~after_eos
    response = torch.where(keep, response, torch.full_like(response, pad_token_id))
    input_ids = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask.to(keep.dtype), keep], dim=1).long()
    labels = torch.cat([torch.full_like(prompt_ids, ignore_index),
                        torch.where(keep, response, torch.full_like(response, ignore_index))], dim=1)
    return input_ids, attention_mask, labels


def response_lists(input_ids: Tensor, labels: Tensor, attention_mask: Tensor, eos_token_id,
                   ignore_index: int = -100):
    """Token lists for a reward function: (prompts without padding, responses without EOS/padding)."""
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    prompts, responses = [], []
    for ids, lab, mask in zip(input_ids.tolist(), labels.tolist(), attention_mask.tolist()):
        prompts.append([t for t, l, m in zip(ids, lab, mask) if m and l == ignore_index])
        responses.append([l for l in lab if l != ignore_index and l not in eos])
    return prompts, responses


def model_logits(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Optional[Tensor] = None):
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=False).logits


@torch.no_grad()
def sequence_token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                            ignore_index: int = -100, temperature: float = 1.0,
                            micro_batch_size: Optional[int] = None) -> Tensor:
    """``[N, L]`` fp32: column t holds log π(input_ids[t] | input_ids[:t]) at valid labels, else 0."""
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    step = micro_batch_size or labels.shape[0]
    for s in range(0, labels.shape[0], step):
        sl = slice(s, s + step)
        logits = model_logits(model, input_ids[sl], attention_mask[sl])[:, :-1].float() / temperature
        tgt = labels[sl, 1:]
        lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out[sl, 1:] = torch.where(tgt != ignore_index, lp, 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# rollouts
# --------------------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """One epoch's responses (TGOs first, then SGOs), each row ``[prompt | response | padding]``."""
    input_ids: Tensor           # [N, L]
    attention_mask: Tensor      # [N, L]
    labels: Tensor              # [N, L], ignore_index outside the responses (EOS included as label)
    student_generated: Tensor   # [N] bool
    prompt_index: Tensor        # [N] index of the prompt in the epoch's prompt batch
    rewards: Tensor             # [N] fp32
    alpha: Tensor               # [N] fp32
    clip: Tensor                # [N] bool (only SGOs can be True)
    advantage: Tensor           # [N] fp32, the normalised reward r̂ (0 for all-equal groups)
    old_logprobs: Optional[Tensor] = None      # [N, L] student log-probs at sampling time
    teacher_logprobs: Optional[Tensor] = None  # [N, L]

    def __len__(self):
        return self.input_ids.shape[0]

    def batch(self, index: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """A batch dict for :func:`compute_askd_loss` (rows ``index``, default all)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and f.name != "rewards":
                out[f.name] = v if index is None else v[index]
        return out


def _pad_right(x: Tensor, length: int, value) -> Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


def assign_skew(rewards: Tensor, student_generated: Tensor, config: ASKDConfig, *, process_group=None):
    """α, κ (clip) and r̂ for rewards ordered as ``[TGOs | SGOs]``, each prompt-major in groups.

    Rewards are normalised within each source, per group of ``group_size`` (GRPO) or over the
    source's batch when ``group_size == 1`` (REINFORCE++); α = Φ(β r̂) (Eq. 12) unless
    ``adaptive_skew`` is off (then ``fixed_alpha_tgo`` / ``fixed_alpha_sgo``). κ = 0 (clip = True)
    for SGOs whose reward is ≥ ``correct_threshold`` when ``clip_correct``.

    Data parallel: with a ``torch.distributed`` ``process_group`` each source's rewards are
    normalised over the concatenation, in rank order, of that source's rewards on every rank
    (:func:`askd_kernels.skew_from_rewards` with ``process_group``): the α and r̂ of one process
    holding all ranks' prompts in rank order. Every rank of the group must make the call and hold
    rows of the same sources.
    """
    alpha = torch.empty_like(rewards, dtype=torch.float32)
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    group = config.group_size if config.group_size > 1 else None
    for is_sgo in (False, True):
        rows = student_generated == is_sgo
        if not rows.any():
            continue
        r = rewards[rows]
        # r̂ from α at β = 1: Φ⁻¹(Φ(r̂)) (float64), so r̂ shares skew_from_rewards' all-equal rule.
        a1 = skew_from_rewards(r, group_size=group, beta=1.0, process_group=process_group).double()
        adv[rows] = torch.special.ndtri(a1).float()
        if config.adaptive_skew:
            alpha[rows] = skew_from_rewards(r, group_size=group, beta=config.beta, process_group=process_group)
        else:
            alpha[rows] = config.fixed_alpha_sgo if is_sgo else config.fixed_alpha_tgo
    clip = student_generated & (rewards >= config.correct_threshold)
    if not config.clip_correct:
        clip = torch.zeros_like(clip)
    return alpha, clip, adv


# --------------------------------------------------------------------------------------------------
# the loss over a batch dict (also the Trainer's compute_loss)
# --------------------------------------------------------------------------------------------------

def compute_askd_loss(student, batch: Dict[str, Tensor], *, teacher=None, config: Optional[ASKDConfig] = None,
                      num_items=None, return_stats: bool = False):
    """The configured distillation loss of ``student`` on a batch dict.

    ``batch`` holds ``input_ids, attention_mask, labels`` ([B, L], labels unshifted: the loss uses
    ``logits[:, :-1]`` against ``labels[:, 1:]``), ``student_generated`` [B] bool, ``alpha`` [B],
    optional ``clip`` [B] bool, ``old_logprobs`` / ``teacher_logprobs`` [B, L] (as produced by
    :func:`sequence_token_logprobs`), ``advantage`` [B] (for ``loss="grpo"``), ``prompt_index`` [B]
    (for ``baseline=True``), ``position_ids``. The teacher is run once without gradient when the loss
    needs its logits: ``loss="full_vocab"``, the ``rao_blackwell`` estimator (what ``estimator="auto"``
    picks whenever ``teacher`` is given), τ ≠ 1, or no ``teacher_logprobs`` in the batch.
    ``num_items`` overrides the "mean" denominator (default: valid labels; for ``"sft"`` the TGOs').
    Returns the loss, or ``(loss, stats)`` with the per-token stats of :func:`askd_loss` for
    ``"askd"`` and ``"grpo"`` (None for the others).
    """
    parts, stats = _loss_parts(student, batch, teacher, config or ASKDConfig(), num_items, return_stats,
                               split=False)
    return (parts[0], stats) if return_stats else parts[0]


def compute_askd_loss_parts(student, batch: Dict[str, Tensor], *, teacher=None, config: Optional[ASKDConfig] = None,
                            num_items=None, return_stats: bool = False):
    """:func:`compute_askd_loss` split by source: ``(loss_tgo, loss_sgo)`` — the TGO rows' and the SGO
    rows' terms, over the same denominator, from one student forward; their sum is
    :func:`compute_askd_loss`. A part with no rows (or no loss: SGOs under ``"sft"``) is ``None``.
    With ``return_stats``, ``((loss_tgo, loss_sgo), stats)``, the stats as :func:`compute_askd_loss`'s.
    """
    parts, stats = _loss_parts(student, batch, teacher, config or ASKDConfig(), num_items, return_stats,
                               split=True)
    return (parts, stats) if return_stats else parts


def _loss_parts(student, batch, teacher, config: ASKDConfig, num_items, return_stats, *, split):
    """``([loss], stats)``, or ``([loss_tgo, loss_sgo], stats)`` when ``split``."""
    ig = config.ignore_index
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    labels = batch["labels"][:, 1:]
    sgo = batch["student_generated"].bool()
    logits = model_logits(student, input_ids, attention_mask, position_ids)[:, :-1]
    if num_items is None:
        num_items = (labels[~sgo] != ig).sum() if config.loss == "sft" else (labels != ig).sum()
    denom = torch.clamp(torch.as_tensor(num_items, dtype=torch.float32, device=logits.device), min=1.0)
    estimator = config.resolved_estimator(teacher is not None)
    cached = []

    def teacher_logits():
        if teacher is None:
            raise ValueError("this loss needs the teacher model (teacher=...)")
        if not cached:
            with torch.no_grad():
                cached.append(model_logits(teacher, input_ids, attention_mask, position_ids)[:, :-1])
        return cached[0]

    # the row sets of the parts: None = every row (no indexing, no copy of the logits)
    row_sets = [(~sgo).nonzero().squeeze(1), sgo.nonzero().squeeze(1)] if split else [None]
    stats = None
    if return_stats and config.loss in ("askd", "grpo"):
        stats = {}
    parts = []
    for part, rows in zip(("tgo", "sgo") if split else (None,), row_sets):
        if rows is not None and (rows.numel() == 0 or (part == "sgo" and config.loss == "sft")):
            parts.append(None)
            continue

        def pick(x):
            return x if (rows is None or x is None) else x[rows]

        loss_sum, part_stats = _loss_sum(config, estimator, pick(logits), pick(labels), pick(sgo),
                                         lambda: pick(teacher_logits()), {k: pick(v) for k, v in batch.items()},
                                         want_stats=stats is not None)
        parts.append(loss_sum / denom)
        if part_stats is not None:
            for k, v in part_stats.items():
                if rows is None:
                    stats[k] = v
                else:
                    stats.setdefault(k, v.new_zeros(labels.shape))[rows] = v
    return parts, stats


def _loss_sum(config: ASKDConfig, estimator: str, logits, labels, sgo, teacher_logits, batch, want_stats):
    """The summed loss of some rows (``batch`` holds those rows; ``labels`` are already shifted) and
    their per-token stats (None unless ``want_stats``)."""
    ig = config.ignore_index
    if config.loss == "sft":
        tgt = torch.where(sgo[:, None], torch.full_like(labels, ig), labels)     # TGOs only
        return F.cross_entropy(logits.float().transpose(1, 2) / config.temperature, tgt,
                               ignore_index=ig, reduction="sum"), None
    if config.loss == "full_vocab":
        t_logits = teacher_logits()
        loss = logits.new_zeros((), dtype=torch.float32)
        clip = batch.get("clip")
        for is_sgo, kind in ((False, "skl"), (True, "srkl")):
            rows = (sgo == is_sgo).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            loss = loss + divergence_loss(
                logits[rows], t_logits[rows], labels[rows], kind=kind, alpha=batch["alpha"][rows].float(),
                clip=None if (clip is None or not is_sgo) else clip[rows],
                temperature=config.temperature, ignore_index=ig, reduction="sum")
        return loss, None
    # "askd" and "grpo": askd_loss
    tlp = batch.get("teacher_logprobs")
    if estimator == "rao_blackwell" or tlp is None or config.temperature != 1.0:
        teacher_kw = {"teacher_logits": teacher_logits()}
    else:
        teacher_kw = {"teacher_logprobs": tlp[:, 1:]}
    old = batch.get("old_logprobs") if config.importance_sampling else None
    grpo = config.loss == "grpo"
    alpha = batch["alpha"].float()
    if grpo:
        alpha = torch.where(sgo, config.fixed_alpha_sgo, config.fixed_alpha_tgo).float()
    groups = None
    if config.baseline:
        groups = batch.get("prompt_index")
        if groups is None:
            raise ValueError("baseline=True needs batch['prompt_index'] (the prompt of each row)")
    out = askd_loss(
        logits, labels, teacher_kw.get("teacher_logits"), teacher_logprobs=teacher_kw.get("teacher_logprobs"),
        student_generated=sgo, alpha=alpha, clip=None if grpo else batch.get("clip"),
        old_logprobs=None if old is None else old[:, 1:], is_max=config.is_max,
        estimator=estimator, baseline_groups=groups, gamma=config.gamma, length_normalize=config.length_normalize,
        temperature=config.temperature, ignore_index=ig, reduction="none", return_stats=want_stats)
    per_seq, stats = out if want_stats else (out, None)
    if grpo:
        per_seq = per_seq * batch["advantage"].float()
    return per_seq.sum(), stats


# --------------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------------

RewardFn = Callable[[List[List[int]], List[List[int]]], Sequence[float]]


class ASKDDistiller:
    """Algorithm 1 of ASKD around a student, a teacher and an optimizer; one call per epoch.

    ``reward_fn(prompts, responses)`` receives token-id lists — prompts without padding, responses
    without EOS and padding — and returns one float per response. Randomness (sampling, shuffling)
    comes from torch's global RNG: seed it with ``torch.manual_seed`` for a reproducible run. The
    teacher is frozen (``requires_grad_(False)``). ``lambdas`` collects the per-token λ of TGOs and of
    unclipped SGOs when ``config.collect_lambda`` (``loss="askd"`` or ``"grpo"``); ``step_log`` holds one
    dict per optimisation step of the last epoch (:meth:`optimize`).

    ``process_group`` (a ``torch.distributed`` group, default None: one process) makes :meth:`sample`
    normalise the rewards over the prompts of every rank of the group (:func:`assign_skew`); each
    rank then samples its own prompts. ``ASKDTrainer`` sets it under data parallelism.
    """

    def __init__(self, student, teacher, optimizer, reward_fn: RewardFn, config: Optional[ASKDConfig] = None,
                 *, eos_token_id=None, pad_token_id: Optional[int] = None, process_group=None):
        if process_group is not None:
            from ..distributed import _group

            _group(process_group)   # a ProcessGroup, else a TypeError naming process_group
        self.process_group = process_group
        self.student, self.teacher, self.optimizer = student, teacher, optimizer
        self.reward_fn = reward_fn
        self.config = config or ASKDConfig()
        gen = getattr(student, "generation_config", None)
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(gen, "pad_token_id", None)
        if self.eos_token_id is None or self.pad_token_id is None:
            raise ValueError("eos_token_id and pad_token_id are needed (pass them or set generation_config)")
        self.teacher.requires_grad_(False)
        self.lambdas: Dict[str, List[Tensor]] = {"tgo": [], "sgo": []}
        self.step_log: List[Dict[str, float]] = []     # the last epoch's optimisation steps
        self._warned = False

    # -- 1-3: sampling, rewards, bookkeeping ------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor):
        from transformers import GenerationConfig  # optional dependency, imported lazily

        c = self.config
        ids = prompt_ids.repeat_interleave(c.group_size, dim=0)
        mask = prompt_mask.repeat_interleave(c.group_size, dim=0)
        gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=c.max_new_tokens, eos_token_id=self.eos_token_id,
                                   pad_token_id=self.pad_token_id)
        was_training = model.training
        model.eval()
        try:
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        finally:
            model.train(was_training)
        return build_sequences(ids, mask, seqs, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                               ignore_index=c.ignore_index)

    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, prompt_mask: Optional[Tensor] = None) -> Rollouts:
        """Steps 1–3 of Algorithm 1 for a batch of (left-padded) prompts ``[P, L_p]``."""
        c = self.config
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        parts = []
        if c.use_teacher_outputs:
            parts.append((False, self.generate(self.teacher, prompt_ids, prompt_mask)))
        if c.use_student_outputs and c.loss != "sft":
            parts.append((True, self.generate(self.student, prompt_ids, prompt_mask)))
        L = max(p[1][0].shape[1] for p in parts)
        ids = torch.cat([_pad_right(p[1][0], L, self.pad_token_id) for p in parts])
        mask = torch.cat([_pad_right(p[1][1], L, 0) for p in parts])
        labels = torch.cat([_pad_right(p[1][2], L, c.ignore_index) for p in parts])
        n = prompt_ids.shape[0] * c.group_size
        sgo = torch.cat([torch.full((n,), flag, dtype=torch.bool) for flag, _ in parts]).to(ids.device)
        pidx = torch.arange(prompt_ids.shape[0], device=ids.device).repeat_interleave(c.group_size).repeat(len(parts))
        prompts, responses = response_lists(ids, labels, mask, self.eos_token_id, c.ignore_index)
        rewards = torch.as_tensor(list(self.reward_fn(prompts, responses)), dtype=torch.float32, device=ids.device)
        if rewards.shape != (ids.shape[0],):
            raise ValueError(f"reward_fn returned {tuple(rewards.shape)} rewards for {ids.shape[0]} responses")
        alpha, clip, adv = assign_skew(rewards, sgo, c, process_group=self.process_group)
        tlp = self.logprobs(self.teacher, ids, mask, labels)
        old = None
        if c.importance_sampling and sgo.any() and c.loss in ("askd", "grpo"):
            old = self.logprobs(self.student, ids, mask, labels)
        return Rollouts(ids, mask, labels, sgo, pidx, rewards, alpha, clip, adv, old, tlp)

    def logprobs(self, model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """:func:`sequence_token_logprobs` of ``model`` in eval mode (the mode ``generate`` samples in,
        so dropout never enters the stored log-probs), in chunks of ``config.micro_batch_size`` rows."""
        was_training = model.training
        model.eval()
        try:
            return sequence_token_logprobs(model, input_ids, attention_mask, labels,
                                           ignore_index=self.config.ignore_index,
                                           micro_batch_size=self.config.micro_batch_size)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def rollout_stats(self, rollouts: Rollouts) -> Dict[str, float]:
        """What to watch in a rollout, at sampling time: per source (``tgo``, ``sgo``) the mean
        ``reward_*``, ``alpha_*`` and ``length_*`` (label tokens, EOS included); ``clip_frac`` (the
        share of SGOs with κ = 0); and per-token Monte-Carlo estimates of the divergences, from the
        stored teacher log-probs and the sampling student's (``old_logprobs``, or one more no-grad
        student forward when they are not stored): ``fkl_tgo`` = mean of log p − log q over TGO tokens
        (KL(p‖q) per token: TGOs are samples of p), ``skl_tgo`` = mean of log p − log m, ``rkl_sgo`` =
        mean of log q − log p over SGO tokens (KL(q‖p)), ``srkl_sgo`` = mean of log q − log m, with
        m = α q + (1 − α) p at each row's α. Unlike the loss value (a surrogate whose value can be
        negative), these estimate divergences: they fall as the student approaches the teacher.
        """
        r, ig = rollouts, self.config.ignore_index
        out: Dict[str, float] = {}
        sgo = r.student_generated
        valid = r.labels != ig
        lq = r.old_logprobs
        if lq is None:
            lq = self.logprobs(self.student, r.input_ids, r.attention_mask, r.labels)
        lp = r.teacher_logprobs
        if lp is None:
            lp = self.logprobs(self.teacher, r.input_ids, r.attention_mask, r.labels)
        lq, lp = lq.double(), lp.double()
        a = r.alpha.double()[:, None]
        log_m = torch.logaddexp(torch.log(a) + lq, torch.log1p(-a) + lp)     # α = 0 or 1: log 0 = −inf is fine
        for name, rows in (("tgo", ~sgo), ("sgo", sgo)):
            if not rows.any():
                continue
            out[f"reward_{name}"] = r.rewards[rows].mean().item()
            out[f"alpha_{name}"] = r.alpha[rows].mean().item()
            out[f"length_{name}"] = valid[rows].sum(1).double().mean().item()
            tokens = valid & rows[:, None]
            n = tokens.sum().clamp(min=1)
            if name == "tgo":      # samples of p: log p/q and log p/m
                pairs = (("fkl_tgo", lp - lq), ("skl_tgo", lp - log_m))
            else:                  # samples of q: log q/p and log q/m
                pairs = (("rkl_sgo", lq - lp), ("srkl_sgo", lq - log_m))
            for key, d in pairs:
                out[key] = (torch.where(tokens, d, 0.0).sum() / n).item()
        out["clip_frac"] = r.clip[sgo].float().mean().item() if sgo.any() else 0.0
        return out

    # -- 4: optimisation ---------------------------------------------------------------------------
    def optimize(self, rollouts: Rollouts) -> Dict[str, float]:
        """T = ``iterations`` passes over the shuffled rollouts (TGOs and SGOs mixed per micro-batch).

        Appends one dict per optimisation step to :attr:`step_log` (``loss``, ``grad_norm`` and, with
        ``config.log_grad_split``, ``grad_norm_tgo``, ``grad_norm_sgo``, ``grad_cos_tgo_sgo``) and
        returns the means of the steps (see :meth:`epoch` for the keys)."""
        c = self.config
        N = len(rollouts)
        mb = c.micro_batch_size or N
        self.step_log = []
        lam_acc = {}
        want = c.loss in ("askd", "grpo")           # λ statistics: askd_loss returns them at no cost
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.student.train()
        for _ in range(c.iterations):
            order = torch.randperm(N, device=rollouts.input_ids.device)
            for s in range(0, N, mb):
                batch = rollouts.batch(order[s:s + mb])
                self.optimizer.zero_grad(set_to_none=True)
                step = {}
                if c.log_grad_split:
                    (parts, stats) = compute_askd_loss_parts(self.student, batch, teacher=self.teacher, config=c,
                                                             return_stats=True)
                    loss = sum(p for p in parts if p is not None)
                    step.update(split_gradients(parts, params, accumulate=True))
                else:
                    loss, stats = compute_askd_loss(self.student, batch, teacher=self.teacher, config=c,
                                                    return_stats=True)
                    loss.backward()
                if want and stats is not None:
                    accumulate_lambda(batch, stats, lam_acc, c, self.lambdas)
                max_norm = c.max_grad_norm if c.max_grad_norm else float("inf")
                step["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if c.log_grad_split:     # the TGO part's norm as a fraction of the step's (clipping scales both)
                    step["grad_tgo_share"] = (step["grad_norm_tgo"] / step["grad_norm"] if step["grad_norm"] > 0
                                              else float("nan"))
                self.optimizer.step()
                step["loss"] = loss.item()
                self.step_log.append(step)
        out = {"loss_first": self.step_log[0]["loss"], "loss_last": self.step_log[-1]["loss"]}
        out.update({f"{k}_mean" if k == "loss" else k: v for k, v in _mean_steps(self.step_log).items()})
        if c.max_grad_norm:
            out["grad_clip_frac"] = sum(st["grad_norm"] > c.max_grad_norm for st in self.step_log) / len(self.step_log)
        out.update(lambda_summary(lam_acc))
        return out

    def epoch(self, prompt_ids: Tensor, prompt_mask: Optional[Tensor] = None) -> Dict[str, float]:
        """One epoch of Algorithm 1: sample, score, then T optimisation iterations. Returns stats.

        The keys (means over the epoch's optimisation steps where per step; ``docs/integration.md``
        has the table): ``loss_first``, ``loss_last``, ``loss_mean``; ``grad_norm`` (before
        clipping), ``grad_clip_frac``; with ``log_grad_split`` ``grad_norm_tgo``, ``grad_norm_sgo``,
        ``grad_cos_tgo_sgo``, ``grad_ratio_sgo_tgo`` and ``grad_tgo_share``; the rollout's
        :meth:`rollout_stats` (``reward_*``, ``alpha_*``, ``length_*`` per source, ``clip_frac``,
        the divergence estimates ``fkl_tgo``, ``skl_tgo``, ``rkl_sgo``, ``srkl_sgo``);
        ``lam_tgo_mean/std``, ``lam_sgo_mean/std``
        (``"askd"``, ``"grpo"``). Warns once per distiller when the SGO part of the gradient is at
        least 3× the TGO part and their cosine is below 0.2 (the signature of a rollout too small for
        the estimator)."""
        r = self.sample(prompt_ids, prompt_mask)
        rollout = self.rollout_stats(r)            # at sampling time: the policy that sampled
        out = self.optimize(r)
        out.update(rollout)
        if not self._warned and grad_split_alarm(out):
            self._warned = True
            warnings.warn(grad_split_message(out, self.config.resolved_estimator(True)), GradientSplitWarning,
                          stacklevel=2)
        return out


def accumulate_lambda(batch: Dict[str, Tensor], stats: Dict[str, Tensor], acc: Dict, config: ASKDConfig,
                      lambdas: Optional[Dict[str, List[Tensor]]] = None) -> None:
    """Add a step's per-token λ (``stats["lam"]`` of :func:`askd_loss`) to the running (count, sum,
    sum of squares) of ``acc`` per source — TGO tokens and tokens of unclipped SGOs (clipped ones
    take no gradient) — and, with ``config.collect_lambda``, append the values to ``lambdas``."""
    valid = batch["labels"][:, 1:] != config.ignore_index
    sgo = batch["student_generated"].bool()[:, None]
    clip = batch.get("clip", torch.zeros_like(batch["student_generated"])).bool()[:, None]
    lam = stats["lam"].detach()
    for name, mask in (("tgo", valid & ~sgo), ("sgo", valid & sgo & ~clip)):
        x = lam[mask].double()
        old = acc.get(name, (0, 0, 0))
        acc[name] = (old[0] + x.numel(), old[1] + x.sum(), old[2] + (x * x).sum())
        if config.collect_lambda and lambdas is not None:
            lambdas[name].append(x.float().cpu())


def lambda_summary(acc: Dict) -> Dict[str, float]:
    """``lam_{tgo,sgo}_{mean,std}`` from the running sums of :func:`accumulate_lambda`."""
    out = {}
    for name, (n, s1, s2) in acc.items():
        n, s1, s2 = float(n), float(s1), float(s2)
        if n:
            out[f"lam_{name}_mean"] = s1 / n
            out[f"lam_{name}_std"] = math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))
    return out


class GradientSplitWarning(UserWarning):
    """The SGO part of the gradient dominates the TGO part and is nearly orthogonal to it."""


def split_gradients(parts: Sequence[Optional[Tensor]], params: Sequence[Tensor], *, accumulate: bool,
                    retain_graph: bool = False):
    """Norms and cosine of the parameter gradients of ``parts = (loss_tgo, loss_sgo)`` (either may be
    None), one backward pass each; with ``accumulate`` their sum is added to each ``param.grad``;
    ``retain_graph`` keeps the graph for a later backward.
    Returns ``grad_norm_tgo``, ``grad_norm_sgo``, ``grad_cos_tgo_sgo`` (NaN when a part is missing or
    zero) as floats."""
    grads = []
    for i, part in enumerate(parts):
        if part is None or not part.requires_grad:
            grads.append(None)
            continue
        later = any(p is not None and p.requires_grad for p in parts[i + 1:])
        g = torch.autograd.grad(part, params, retain_graph=retain_graph or later, allow_unused=True)
        grads.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
    flat = [None if g is None else torch.cat([x.reshape(-1).float() for x in g]) for g in grads]
    norms = [0.0 if f is None else f.norm().item() for f in flat]
    cos = float("nan")
    if all(f is not None for f in flat) and norms[0] > 0 and norms[1] > 0:
        cos = (flat[0] @ flat[1]).item() / (norms[0] * norms[1])
    if accumulate:
        for j, p in enumerate(params):
            total = None
            for g in grads:
                if g is not None:
                    total = g[j] if total is None else total + g[j]
            if total is not None:
                p.grad = total if p.grad is None else p.grad + total
    return {"grad_norm_tgo": norms[0], "grad_norm_sgo": norms[1], "grad_cos_tgo_sgo": cos}


def _mean_steps(steps: List[Dict[str, float]]) -> Dict[str, float]:
    """Means of the per-step numbers (NaN entries skipped) plus the derived split quantities."""
    out = {}
    for k in steps[0]:
        xs = [st[k] for st in steps if k in st and not math.isnan(st[k])]
        out[k] = sum(xs) / len(xs) if xs else float("nan")
    if "grad_norm_tgo" in out:
        t, s = out["grad_norm_tgo"], out["grad_norm_sgo"]
        out["grad_ratio_sgo_tgo"] = s / t if t > 0 else float("inf") if s > 0 else float("nan")
    return out


def grad_split_alarm(stats: Dict[str, float]) -> bool:
    """True when ``stats`` show the SGO part ≥ 3× the TGO part with cosine < 0.2."""
    ratio, cos = stats.get("grad_ratio_sgo_tgo"), stats.get("grad_cos_tgo_sgo")
    if ratio is None or cos is None or math.isnan(ratio) or math.isnan(cos):
        return False
    return ratio >= GRAD_SPLIT_RATIO and cos < GRAD_SPLIT_COSINE


def grad_split_message(stats: Dict[str, float], estimator: str) -> str:
    advice = [] if estimator == "rao_blackwell" else ["estimator='rao_blackwell' (needs the teacher's logits)"]
    advice += ["more responses per step (prompts x group_size)", "baseline=True", "a smaller learning rate"]
    return (f"ASKD ({estimator}): the SGO part of the gradient is {stats['grad_ratio_sgo_tgo']:.1f}x the TGO part "
            f"and nearly orthogonal to it (cosine {stats['grad_cos_tgo_sgo']:.2f}): the SGO estimate is mostly "
            "noise and, after gradient clipping, crowds out the TGO signal. Try " + ", ".join(advice)
            + "; see docs/integration.md.")


# --------------------------------------------------------------------------------------------------
# transformers.Trainer
# --------------------------------------------------------------------------------------------------

def askd_collate(features: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Stack per-example dicts (as produced by ``Rollouts.batch`` rows) into a batch dict."""
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def rollout_prompts_per_sample(config: ASKDConfig, rows_per_step: int) -> int:
    """Prompts per rollout of :class:`ASKDTrainer`: its ``iterations`` passes over the rollout fill
    exactly ``sample_every`` optimizer steps of ``rows_per_step`` rows (per-device batch ×
    gradient accumulation), so ``prompts × group_size × sources × iterations = sample_every ×
    rows_per_step``. ``ValueError`` naming the arguments when that has no whole solution."""
    every = config.sample_every or config.iterations
    sources = int(config.use_teacher_outputs) + int(config.use_student_outputs and config.loss != "sft")
    rows = every * rows_per_step
    per_prompt = config.iterations * config.group_size * sources
    if rows % per_prompt:
        raise ValueError(
            f"ASKDTrainer: sample_every x per_device_train_batch_size x gradient_accumulation_steps "
            f"(= {every} x {rows_per_step} rows = {rows}) must be a multiple of iterations x group_size x sources "
            f"(= {config.iterations} x {config.group_size} x {sources} = {per_prompt}): each rollout of P prompts "
            f"gives P x group_size x sources rows, seen `iterations` times in `sample_every` steps")
    return rows // per_prompt


class _RolloutBatchSampler:
    """Batches of ``batch`` prompt indices, each yielded ``repeat`` times in a row (one per
    micro-batch drawn from its rollout); reshuffled at every pass over the prompts unless
    ``shuffle`` is off; an incomplete last batch is dropped.

    Data parallel (``world`` processes): every rank draws the same order (the seed does not depend
    on the rank), cuts it into global batches of ``world × batch`` prompts and yields its own
    ``batch``, the ``rank``-th slice; so the prompts of one rollout on ranks 0, 1, … are, in that
    order, those of one process with ``world × batch`` prompts per rollout."""

    def __init__(self, n: int, batch: int, repeat: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.repeat, self.shuffle, self.seed = n, batch, repeat, shuffle, seed
        self.rank, self.world = rank, world
        self.passes = 0

    def __len__(self):
        return (self.n // (self.batch * self.world)) * self.repeat

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.passes)).tolist()
        else:
            order = list(range(self.n))
        self.passes += 1
        size = self.batch * self.world
        for b in range(self.n // size):
            chunk = order[b * size:(b + 1) * size][self.rank * self.batch:(self.rank + 1) * self.batch]
            for _ in range(self.repeat):
                yield chunk


class _Indexed(torch.utils.data.Dataset):
    """``(index, row)`` pairs of a dataset: the rollout is keyed by its prompts' indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


def prompt_collate(features, *, pad_token_id: int) -> Dict[str, Tensor]:
    """Left-pad prompt rows into ``prompt_ids`` / ``prompt_mask`` ``[P, L]`` (what ``generate``
    wants). A row is a dict with ``input_ids`` (a list or 1-D tensor of token ids) and optionally
    ``attention_mask``."""
    rows = []
    for f in features:
        if not isinstance(f, dict) or "input_ids" not in f:
            got = sorted(f) if isinstance(f, dict) else type(f).__name__
            raise TypeError(f"train_dataset: an ASKDTrainer prompt row is a dict with 'input_ids', got {got}")
        ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise TypeError(f"train_dataset: prompt input_ids must be a non-empty 1-D sequence, got shape "
                            f"{tuple(ids.shape)}")
        mask = f.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        rows.append((ids, mask))
    L = max(ids.numel() for ids, _ in rows)
    return {"prompt_ids": torch.stack([F.pad(ids, (L - ids.numel(), 0), value=pad_token_id) for ids, _ in rows]),
            "prompt_mask": torch.stack([F.pad(mask, (L - mask.numel(), 0), value=0) for _, mask in rows])}


def _keyed_prompt_collate(features, *, pad_token_id: int) -> Dict[str, Tensor]:
    """:func:`prompt_collate` of ``(index, row)`` pairs, plus ``prompt_key``: the rows' indices."""
    out = prompt_collate([row for _, row in features], pad_token_id=pad_token_id)
    out["prompt_key"] = torch.tensor([i for i, _ in features])
    return out


def _make_trainer_class():
    import functools
    import sys

    from transformers import Trainer  # optional dependency, imported lazily
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ASKDTrainer(Trainer):
        """``transformers.Trainer`` that runs Algorithm 1: sampling, rewards, α and κ, stored
        log-probs, ``iterations`` passes — with :func:`compute_askd_loss` as its ``compute_loss``.

        **On-policy** (``reward_fn`` given): ``train_dataset`` holds prompts (rows ``{"input_ids":
        [...]}``, unpadded, optionally ``attention_mask``). Every ``askd_config.sample_every``
        optimizer steps (default ``iterations``) — the paper's epoch — the trainer takes the next P
        prompts, samples ``group_size`` TGOs and SGOs per prompt from the *current* teacher and
        student (:meth:`ASKDDistiller.sample`, the same code as the distiller), scores them, and
        trains ``iterations`` shuffled passes over them in micro-batches of
        ``per_device_train_batch_size`` rows, ``gradient_accumulation_steps`` micro-batches per
        step. P follows from ``P × group_size × sources × iterations = sample_every ×
        per_device_train_batch_size × gradient_accumulation_steps`` (a ``ValueError`` says so when
        there is no whole P); one pass over the prompts is one Trainer epoch.

        **Offline** (no ``reward_fn``): ``train_dataset`` holds rollout rows (single rows of
        :meth:`Rollouts.batch`, ``data_collator=askd_collate``, ``remove_unused_columns=False``).

        Both modes normalise each optimizer step's loss by the valid label tokens of all its
        micro-batches (TGO tokens for ``"sft"``), so gradient accumulation gives the same update as
        one big batch; ``compute_loss`` receives that count as ``num_items_in_batch``.

        Logs (at ``logging_steps``): the rollout statistics of :meth:`ASKDDistiller.rollout_stats`
        (means over the rollouts sampled since the previous log; ``rollouts`` counts them all), the
        λ statistics ``lam_{tgo,sgo}_{mean,std}`` (``"askd"``, ``"grpo"``) and, with
        ``log_grad_split``, ``grad_norm_tgo``, ``grad_norm_sgo``, ``grad_cos_tgo_sgo``,
        ``grad_ratio_sgo_tgo`` (means over the ``compute_loss`` calls since the previous log, before
        clipping; under data parallelism those of the logging rank), with
        :class:`GradientSplitWarning` raised once.

        ``progress_bar=None`` shows the Trainer's progress bar only when stderr is a terminal (logs
        are printed as lines otherwise). ``ASKDConfig.max_grad_norm`` is not used here (the
        Trainer's ``max_grad_norm`` is); ``micro_batch_size`` chunks the no-grad log-prob forwards.

        **Data parallel** (``accelerate launch`` / ``torchrun``, ``args.world_size`` = W > 1): on-policy,
        every rank samples P prompts of its own (rollout k takes the next W·P prompts of the shared
        order, rank r the r-th P of them, so the W rollouts are one W·P-prompt rollout cut in rank
        order) and the rewards are normalised over the rollouts of all ranks
        (:func:`assign_skew` with the default process group: exactly the α and r̂ of one process
        holding the W·P prompts); offline, the Trainer's data loader shards the rows. With
        ``args.average_tokens_across_devices`` (the default) ``num_items_in_batch`` is the step's
        count over all ranks (one all-gather per step) and each rank divides its loss sum by
        count / W, so DDP's gradient average is the gradient of the whole W-rank batch's mean — the
        update of one process on the concatenated batch. Without it each rank uses its own count (the
        Trainer's semantics: the average of the per-rank means). The rollout, λ and gradient-split
        statistics in the logs are those of the logging rank (rank 0), not all-reduced.
        """

        loss_is_scaled_for_ga = True    # compute_loss divides by the whole step's token count

        def __init__(self, *args, teacher_model, askd_config: Optional[ASKDConfig] = None,
                     reward_fn: Optional[RewardFn] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
                     progress_bar: Optional[bool] = None, **kwargs):
            super().__init__(*args, **kwargs)
            if askd_config is not None and not isinstance(askd_config, ASKDConfig):
                raise TypeError(f"askd_config must be an ASKDConfig, got {type(askd_config).__name__}")
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.askd_config = askd_config or ASKDConfig()
            self.reward_fn = reward_fn
            self.distiller = None
            if reward_fn is not None:
                if not callable(reward_fn):
                    raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
                group = None
                if self.args.world_size > 1:     # each rank samples its own prompts; α over all ranks
                    import torch.distributed as dist

                    if not (dist.is_available() and dist.is_initialized()):
                        raise ValueError(f"ASKDTrainer: args.world_size is {self.args.world_size} but "
                                         "torch.distributed is not initialised (launch with accelerate or torchrun)")
                    group = dist.group.WORLD
                self.distiller = ASKDDistiller(self.model, self.teacher_model, None, reward_fn, self.askd_config,
                                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                               process_group=group)
                self.prompts_per_rollout = rollout_prompts_per_sample(
                    self.askd_config, self._train_batch_size * self.args.gradient_accumulation_steps)
            self.lambdas: Dict[str, List[Tensor]] = (self.distiller.lambdas if self.distiller is not None
                                                     else {"tgo": [], "sgo": []})
            self._rollout = None
            self._schedule: List[Tensor] = []
            self._cursor = 0
            self._rollout_key = None
            self.rollouts_sampled = 0
            self._rollout_log: List[Dict[str, float]] = []
            self._lam_acc: Dict = {}
            self._askd_steps: List[Dict[str, float]] = []
            self._askd_warned = False
            if progress_bar is None:
                progress_bar = bool(getattr(sys.stderr, "isatty", lambda: False)())
            if not progress_bar:
                for cb in {ProgressCallback, DEFAULT_PROGRESS_CALLBACK}:
                    self.remove_callback(cb)
                if not any(isinstance(cb, PrinterCallback) for cb in self.callback_handler.callbacks):
                    self.add_callback(PrinterCallback)

        # -- on-policy data: prompts in, rollout micro-batches out -----------------------------
        def get_train_dataloader(self):
            if self.distiller is None:
                return super().get_train_dataloader()
            if self.train_dataset is None:
                raise ValueError("ASKDTrainer: training requires a train_dataset (of prompts)")
            n, P, W = len(self.train_dataset), self.prompts_per_rollout, self.args.world_size
            if n < P * W:
                per = "" if W == 1 else f" ({P} per process x {W} processes)"
                raise ValueError(f"train_dataset has {n} prompts; one rollout takes {P * W}{per} "
                                 "(see the ASKDTrainer doc)")
            repeat = (self.askd_config.sample_every or self.askd_config.iterations) * \
                self.args.gradient_accumulation_steps
            sampler = _RolloutBatchSampler(n, P, repeat, self.args.train_sampling_strategy != "sequential",
                                           self.args.seed, rank=self.args.process_index, world=W)
            # its own generator: iterating the loader draws nothing from torch's global RNG
            return torch.utils.data.DataLoader(
                _Indexed(self.train_dataset), batch_sampler=sampler,
                generator=torch.Generator().manual_seed(self.args.seed),
                collate_fn=functools.partial(_keyed_prompt_collate, pad_token_id=self.distiller.pad_token_id))

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples = []
            for _ in range(num_batches):
                try:
                    batch_samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            if self.distiller is not None:
                batch_samples = [self._micro_batch(b) for b in batch_samples]
            return batch_samples, self._count_items(batch_samples, device)

        def _micro_batch(self, prompt_batch):
            key = prompt_batch.get("prompt_key")
            key = None if key is None else tuple(key.tolist())
            if self._rollout is None or key != self._rollout_key or self._cursor >= len(self._schedule):
                self._sample(prompt_batch, key)
            index = self._schedule[self._cursor]
            self._cursor += 1
            return self._rollout.batch(index)

        def _sample(self, prompt_batch, key):
            device = self.args.device
            self.teacher_model.to(device)
            r = self.distiller.sample(prompt_batch["prompt_ids"].to(device), prompt_batch["prompt_mask"].to(device))
            self._rollout_log.append(self.distiller.rollout_stats(r))
            N, mb = len(r), self._train_batch_size
            order = torch.cat([torch.randperm(N, device=r.input_ids.device)
                               for _ in range(self.askd_config.iterations)])
            self._rollout, self._rollout_key, self._cursor = r, key, 0
            self._schedule = list(order.split(mb))
            self.rollouts_sampled += 1

        def _across_ranks(self):
            """Whether the step's token count is summed over the ranks (and the loss scaled by W)."""
            return self.args.world_size > 1 and self.args.average_tokens_across_devices

        def _count_items(self, batch_samples, device):
            """The step's valid label tokens (``labels[:, 1:]``; TGO rows only for ``"sft"``) over all
            its micro-batches and, with ``average_tokens_across_devices`` (the default) under data
            parallelism, over all ranks: one all-gather of a scalar per step, as the Trainer's own count."""
            if not batch_samples or "labels" not in batch_samples[0]:
                return None
            ig, total = self.askd_config.ignore_index, 0
            for b in batch_samples:
                valid = b["labels"][:, 1:] != ig
                if self.askd_config.loss == "sft":
                    valid = valid & ~b["student_generated"].bool()[:, None]
                total = total + valid.sum()
            total = torch.as_tensor(total, device=device)
            if self._across_ranks():
                total = self.accelerator.gather(total).sum()
            return total

        # -- the loss ----------------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            c = self.askd_config
            teacher = self.teacher_model.to(inputs["input_ids"].device)
            if num_items_in_batch is not None and self._across_ranks():
                # the global count N: each rank's loss is its sum over N / W, so that the gradient
                # averaging over W ranks gives the gradient of the whole batch's sum over N (the
                # Trainer's own compute_loss multiplies by W for the same reason)
                n = torch.as_tensor(num_items_in_batch, device=inputs["input_ids"].device)
                num_items_in_batch = (n.to(torch.float64) / self.args.world_size).to(torch.float32)
            training = model.training and torch.is_grad_enabled()
            want_stats = training and c.loss in ("askd", "grpo")
            if c.log_grad_split and training:
                parts, stats = compute_askd_loss_parts(model, inputs, teacher=teacher, config=c,
                                                       num_items=num_items_in_batch, return_stats=True)
                params = [p for p in model.parameters() if p.requires_grad]
                loss = sum(p for p in parts if p is not None)
                # the graph is kept for the Trainer's own backward of the sum
                self._askd_steps.append(split_gradients(parts, params, accumulate=False, retain_graph=True))
            else:
                loss, stats = compute_askd_loss(model, inputs, teacher=teacher, config=c, num_items=num_items_in_batch,
                                                return_stats=True)
            if want_stats and stats is not None:
                accumulate_lambda(inputs, stats, self._lam_acc, c, self.lambdas)
            return (loss, None) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            logs = dict(logs)
            if self._rollout_log:
                logs.update(_mean_steps(self._rollout_log))
                logs["rollouts"] = self.rollouts_sampled
                self._rollout_log = []
            if self._lam_acc:
                logs.update(lambda_summary(self._lam_acc))
                self._lam_acc = {}
            if self._askd_steps:
                logs.update(_mean_steps(self._askd_steps))
                self._askd_steps = []
                if not self._askd_warned and grad_split_alarm(logs):
                    self._askd_warned = True
                    warnings.warn(grad_split_message(logs, self.askd_config.resolved_estimator(True)),
                                  GradientSplitWarning, stacklevel=2)
            return super().log(logs, *args, **kwargs)

    return ASKDTrainer


def __getattr__(name):
    if name == "ASKDTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ASKDTrainer is left out of __all__ so that `import *` stays free of transformers.
__all__ = ["ASKDConfig", "ASKDDistiller", "GradientSplitWarning", "Rollouts", "accumulate_lambda", "assign_skew",
           "askd_collate", "build_sequences", "compute_askd_loss", "compute_askd_loss_parts", "lambda_summary",
           "position_ids_from_mask", "prompt_collate", "response_lists", "rollout_prompts_per_sample",
           "sequence_token_logprobs", "split_gradients"]
