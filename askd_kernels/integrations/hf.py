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
   each a step of :func:`compute_askd_loss`.

Sequence layout (one row per response): ``[left-padded prompt | response | right padding]``.
``labels[b, t]`` is the token at ``t`` for response tokens, up to and including the EOS that ends
the response, and ``ignore_index`` for prompt, left padding and everything after that EOS (which is
replaced by ``pad_token_id`` and masked out of attention). The loss aligns ``logits[:, :-1]`` with
``labels[:, 1:]``; stored per-token log-probs have the shape of ``labels`` and hold, at column t,
``log π(input_ids[t] | input_ids[:t])`` (0 where the label is ignored).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..askd import askd_loss
from ..divergence import divergence_loss
from ..skew import skew_from_rewards

LOSSES = ("askd", "full_vocab", "grpo", "sft")


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
    estimator: str = "exact"
    gamma: float = 1.0
    length_normalize: bool = False
    temperature: float = 1.0
    ignore_index: int = -100
    collect_lambda: bool = False        # keep the per-token λ of TGOs / SGOs (the paper's Fig. 1(b))

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.group_size < 1 or self.iterations < 1 or self.max_new_tokens < 1:
            raise ValueError("group_size, iterations and max_new_tokens must be >= 1")
        if not (self.use_teacher_outputs or self.use_student_outputs):
            raise ValueError("use at least one of teacher / student outputs")
        if self.loss == "sft" and not self.use_teacher_outputs:
            raise ValueError("loss='sft' trains on teacher outputs")


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


def assign_skew(rewards: Tensor, student_generated: Tensor, config: ASKDConfig):
    """α, κ (clip) and r̂ for rewards ordered as ``[TGOs | SGOs]``, each prompt-major in groups.

    Rewards are normalised within each source, per group of ``group_size`` (GRPO) or over the
    source's batch when ``group_size == 1`` (REINFORCE++); α = Φ(β r̂) (Eq. 12) unless
    ``adaptive_skew`` is off (then ``fixed_alpha_tgo`` / ``fixed_alpha_sgo``). κ = 0 (clip = True)
    for SGOs whose reward is ≥ ``correct_threshold`` when ``clip_correct``.
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
        a1 = skew_from_rewards(r, group_size=group, beta=1.0).double()
        adv[rows] = torch.special.ndtri(a1).float()
        if config.adaptive_skew:
            alpha[rows] = skew_from_rewards(r, group_size=group, beta=config.beta)
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
    :func:`sequence_token_logprobs`), ``advantage`` [B] (for ``loss="grpo"``), ``position_ids``.
    Without ``teacher_logprobs`` (or for ``loss="full_vocab"``, or τ ≠ 1) the teacher is run once
    without gradient. ``num_items`` overrides the "mean" denominator (default: valid labels).
    Returns the loss, or ``(loss, stats)`` with the per-token stats of :func:`askd_loss` for ``"askd"``.
    """
    config = config or ASKDConfig()
    ig = config.ignore_index
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    labels = batch["labels"][:, 1:]
    sgo = batch["student_generated"].bool()
    logits = model_logits(student, input_ids, attention_mask, position_ids)[:, :-1]
    n_valid = (labels != ig).sum() if num_items is None else num_items
    denom = torch.clamp(torch.as_tensor(n_valid, dtype=torch.float32, device=logits.device), min=1.0)

    def teacher_logits():
        if teacher is None:
            raise ValueError("this loss needs the teacher model (teacher=...)")
        with torch.no_grad():
            return model_logits(teacher, input_ids, attention_mask, position_ids)[:, :-1]

    stats = None
    if config.loss == "sft":
        tgt = torch.where(sgo[:, None], torch.full_like(labels, ig), labels)     # TGOs only
        if num_items is None:
            denom = torch.clamp((tgt != ig).sum().float(), min=1.0)
        loss = F.cross_entropy(logits.float().transpose(1, 2) / config.temperature, tgt,
                               ignore_index=ig, reduction="sum") / denom
    elif config.loss == "full_vocab":
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
        loss = loss / denom
    else:
        tlp = batch.get("teacher_logprobs")
        teacher_kw = ({"teacher_logprobs": tlp[:, 1:]} if tlp is not None and config.temperature == 1.0
                      else {"teacher_logits": teacher_logits()})
        old = batch.get("old_logprobs") if config.importance_sampling else None
        grpo = config.loss == "grpo"
        alpha = batch["alpha"].float()
        if grpo:
            alpha = torch.where(sgo, config.fixed_alpha_sgo, config.fixed_alpha_tgo).float()
        out = askd_loss(
            logits, labels, teacher_kw.get("teacher_logits"), teacher_logprobs=teacher_kw.get("teacher_logprobs"),
            student_generated=sgo, alpha=alpha, clip=None if grpo else batch.get("clip"),
            old_logprobs=None if old is None else old[:, 1:], is_max=config.is_max,
            estimator=config.estimator, gamma=config.gamma, length_normalize=config.length_normalize,
            temperature=config.temperature, ignore_index=ig, reduction="none", return_stats=return_stats)
        per_seq, stats = out if return_stats else (out, None)
        if grpo:
            per_seq = per_seq * batch["advantage"].float()
        loss = per_seq.sum() / denom
    return (loss, stats) if return_stats else loss


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
    unclipped SGOs when ``config.collect_lambda`` (``loss="askd"`` only).
    """

    def __init__(self, student, teacher, optimizer, reward_fn: RewardFn, config: Optional[ASKDConfig] = None,
                 *, eos_token_id=None, pad_token_id: Optional[int] = None):
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
        alpha, clip, adv = assign_skew(rewards, sgo, c)
        mb = c.micro_batch_size
        tlp = sequence_token_logprobs(self.teacher, ids, mask, labels, ignore_index=c.ignore_index, micro_batch_size=mb)
        old = None
        if c.importance_sampling and sgo.any() and c.loss in ("askd", "grpo"):
            old = sequence_token_logprobs(self.student, ids, mask, labels, ignore_index=c.ignore_index,
                                          micro_batch_size=mb)
        return Rollouts(ids, mask, labels, sgo, pidx, rewards, alpha, clip, adv, old, tlp)

    # -- 4: optimisation ---------------------------------------------------------------------------
    def optimize(self, rollouts: Rollouts) -> Dict[str, float]:
        """T = ``iterations`` passes over the shuffled rollouts (TGOs and SGOs mixed per micro-batch)."""
        c = self.config
        N = len(rollouts)
        mb = c.micro_batch_size or N
        losses = []
        self.student.train()
        for _ in range(c.iterations):
            order = torch.randperm(N, device=rollouts.input_ids.device)
            for s in range(0, N, mb):
                batch = rollouts.batch(order[s:s + mb])
                want = c.collect_lambda and c.loss == "askd"
                out = compute_askd_loss(self.student, batch, teacher=self.teacher, config=c, return_stats=want)
                loss = out[0] if want else out
                if want:
                    self._keep_lambda(batch, out[1])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.max_grad_norm)
                self.optimizer.step()
                losses.append(loss.item())
        return {"loss_first": losses[0], "loss_last": losses[-1], "loss_mean": sum(losses) / len(losses)}

    def _keep_lambda(self, batch, stats):
        valid = batch["labels"][:, 1:] != self.config.ignore_index
        sgo = batch["student_generated"].bool()[:, None]
        clip = batch.get("clip", torch.zeros_like(batch["student_generated"])).bool()[:, None]
        lam = stats["lam"]
        self.lambdas["tgo"].append(lam[valid & ~sgo].detach().cpu())
        self.lambdas["sgo"].append(lam[valid & sgo & ~clip].detach().cpu())  # clipped SGOs get no gradient

    def epoch(self, prompt_ids: Tensor, prompt_mask: Optional[Tensor] = None) -> Dict[str, float]:
        """One epoch of Algorithm 1: sample, score, then T optimisation iterations. Returns stats."""
        r = self.sample(prompt_ids, prompt_mask)
        out = self.optimize(r)
        sgo = r.student_generated
        for name, rows in (("tgo", ~sgo), ("sgo", sgo)):
            if rows.any():
                out[f"reward_{name}"] = r.rewards[rows].mean().item()
                out[f"alpha_{name}"] = r.alpha[rows].mean().item()
                out[f"length_{name}"] = (r.labels[rows] != self.config.ignore_index).sum(1).float().mean().item()
        out["clip_frac"] = r.clip[sgo].float().mean().item() if sgo.any() else 0.0
        return out


# --------------------------------------------------------------------------------------------------
# transformers.Trainer
# --------------------------------------------------------------------------------------------------

def askd_collate(features: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Stack per-example dicts (as produced by ``Rollouts.batch`` rows) into a batch dict."""
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def _make_trainer_class():
    from transformers import Trainer  # optional dependency, imported lazily

    class ASKDTrainer(Trainer):
        """``transformers.Trainer`` whose ``compute_loss`` is :func:`compute_askd_loss`.

        ``ASKDTrainer(model=student, teacher_model=teacher, askd_config=ASKDConfig(...), args=...,
        train_dataset=..., data_collator=askd_collate)``; the dataset yields dicts with the keys of
        :meth:`Rollouts.batch` (use ``remove_unused_columns=False`` in the arguments). Sampling is not
        the Trainer's job: build the dataset from :meth:`ASKDDistiller.sample`.
        """

        def __init__(self, *args, teacher_model, askd_config: Optional[ASKDConfig] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.askd_config = askd_config or ASKDConfig()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = compute_askd_loss(model, inputs, teacher=self.teacher_model.to(inputs["input_ids"].device),
                                     config=self.askd_config)
            return (loss, None) if return_outputs else loss

    return ASKDTrainer


def __getattr__(name):
    if name == "ASKDTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ASKDTrainer is left out of __all__ so that `import *` stays free of transformers.
__all__ = ["ASKDConfig", "ASKDDistiller", "Rollouts", "assign_skew", "askd_collate",
           "build_sequences", "compute_askd_loss", "position_ids_from_mask", "response_lists",
           "sequence_token_logprobs"]
