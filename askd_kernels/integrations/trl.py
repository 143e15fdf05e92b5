"""TRL drop-in: the generalized JSD of TRL's distillation trainers through :func:`askd_kernels.divergence_loss`.

TRL's ``GKDTrainer`` (and ``GOLDTrainer``, ``IWOPDTrainer``, which share the hook) computes its loss
with the static method ``generalized_jsd_loss(student_logits, teacher_logits, labels, beta,
temperature, reduction, ..., num_items_in_batch)``, which materialises about ten ``[B, T, V]``
tensors (log-softmaxes, the stacked mixture, two ``kl_div`` results, their sum) and keeps several
for the backward. :func:`generalized_jsd_loss` here has the same signature and values, computed by
``divergence_loss(kind="jsd", beta=...)``: nothing of size tokens × vocabulary in the forward, only
the gradient in the backward.

* ``use_askd_kernels(GKDTrainer)`` returns a subclass whose ``generalized_jsd_loss`` is routed here;
  ``use_askd_kernels(trainer)`` does the same to one trainer instance. ``ASKDGKDTrainer`` is
  ``use_askd_kernels(trl.experimental.gkd.GKDTrainer)``.
* Calls the kernel cannot serve — probabilities instead of logits (GOLD's ``logits_are_probs=True``),
  a top-k support (IW-OPD's ``top_k > 0``), any other non-default option — go to the trainer's own
  implementation unchanged; ``routed_calls`` / ``fallback_calls`` on the routed function count both.
* TRL's newer ``DistillationTrainer`` has no such hook: it projects hidden states through the
  ``lm_head`` in chunks with its own kernel (already memory-bounded), inside private methods; it is
  left alone.

Conventions (TRL's, kept): ``beta`` is the teacher's weight in the mixture M = β p + (1 − β) q;
β = 0 is KL(p‖q), β = 1 is KL(q‖p); labels −100 are ignored. Reductions: ``"batchmean"`` with labels
is the sum over valid tokens / their number (this library's ``"mean"``), without labels the sum / the
size of the first dimension; ``"sum"``; ``"mean"`` is TRL's element mean (the sum / (valid tokens ×
vocabulary)); ``num_items_in_batch`` overrides them all with sum / num_items_in_batch. ``"none"``
returns TRL's per-element values (``[n_valid, V]`` with labels, the logits' shape without) — that
tensor is itself tokens × vocabulary, computed with plain torch ops; ``"per_token"`` (not in TRL)
returns this library's per-token values (0 at ignored positions), memory-bounded. The result is
fp32 whatever the logits' dtype (TRL's is the logits' dtype).

TRL itself is not imported unless a TRL class is asked for (``ASKDGKDTrainer``).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from ..divergence import divergence_loss

REDUCTIONS = ("batchmean", "sum", "mean", "none", "per_token")
# Options of TRL's variants that the kernel serves only at these values (else: the original runs).
_NEUTRAL = {"logits_are_probs": False, "top_k": 0}
_OURS = ("student_logits", "teacher_logits", "labels", "beta", "temperature", "reduction", "num_items_in_batch")


def _as_float(name: str, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value.detach().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _per_element(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float) -> Tensor:
    """TRL's per-element generalized JSD terms (the ``reduction="none"`` tensor before masking)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1).detach()
    if beta == 0.0:
        return log_p.exp() * (log_p - log_q)
    if beta == 1.0:
        return log_q.exp() * (log_q - log_p)
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    return beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch=None) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, computed by ``divergence_loss(kind="jsd")``.

    ``student_logits`` / ``teacher_logits``: ``[..., V]`` (``[B, T, V]`` is used as is, any
    strides; other shapes are viewed as one row of tokens); ``labels``: the leading shape, −100 =
    ignored, None = every position counts. See the module doc for the reductions.
    """
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if student_logits.ndim < 2:
        raise ValueError(f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must agree on every dimension but the vocabulary")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != student_logits.shape[:-1]):
        raise ValueError(f"labels must be a tensor of shape {tuple(student_logits.shape[:-1])}, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    beta = _as_float("beta", beta)
    temperature = _as_float("temperature", temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (the teacher's weight in the mixture), got {beta}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")

    lead = student_logits.shape[:-1]
    if reduction == "none" and num_items_in_batch is None:   # TRL's per-element tensor
        jsd = _per_element(student_logits, teacher_logits, beta, temperature)
        return jsd if labels is None else jsd[labels != -100]

    if student_logits.ndim == 3:
        s, t = student_logits, teacher_logits
    else:                          # [N, V] (and any other leading shape): one row of tokens
        s = student_logits.reshape(1, -1, student_logits.shape[-1])
        t = teacher_logits.reshape(1, -1, teacher_logits.shape[-1])
    lab = (torch.zeros(s.shape[:2], dtype=torch.long, device=s.device) if labels is None
           else labels.reshape(s.shape[:2]))
    kw = dict(kind="jsd", beta=beta, temperature=temperature, ignore_index=-100)
    if reduction == "per_token" and num_items_in_batch is None:
        return divergence_loss(s, t, lab, reduction="none", **kw).reshape(lead)
    total = divergence_loss(s, t, lab, reduction="sum", **kw)
    if num_items_in_batch is not None:    # TRL: sum / the global count, whatever the reduction
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        if labels is None:
            return total / max(lead[0], 1)
        return total / (labels != -100).sum().clamp(min=1)
    # "mean": TRL's mean over the kept elements (valid tokens x vocabulary); empty -> NaN, as TRL
    count = (labels != -100).sum() if labels is not None else torch.tensor(lead.numel(), device=total.device)
    return total / (count * student_logits.shape[-1])


def _route(original):
    """``original`` (a TRL ``generalized_jsd_loss``) with every call the kernel can serve sent to
    :func:`generalized_jsd_loss`; the others go to ``original``."""
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(original)
    def routed(*args, **kwargs):
        if signature is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None
            if bound is not None:
                bound.apply_defaults()
                extra = {k: v for k, v in bound.arguments.items() if k not in _OURS}
                if extra.get("top_k", 0) == 0:
                    extra.pop("add_tail", None)         # IW-OPD: the tail of a top-k support; none without one
                if all(k in _NEUTRAL and v == _NEUTRAL[k] for k, v in extra.items()):
                    routed.routed_calls += 1
                    return generalized_jsd_loss(**{k: v for k, v in bound.arguments.items() if k in _OURS})
        routed.fallback_calls += 1
        return original(*args, **kwargs)

    routed.routed_calls = 0
    routed.fallback_calls = 0
    routed.askd_original = original
    return routed


def use_askd_kernels(trainer):
    """Route a TRL trainer's ``generalized_jsd_loss`` through :func:`generalized_jsd_loss`.

    ``trainer`` is a trainer class (a subclass named ``ASKD<Name>`` is returned; TRL's class is not
    modified) or a trainer instance (patched in place and returned). ``TypeError`` when it has no
    ``generalized_jsd_loss`` hook (e.g. TRL's ``DistillationTrainer``, whose chunked loss over
    hidden states has none)."""
    hook = getattr(trainer, "generalized_jsd_loss", None)
    if hook is None:
        name = trainer.__name__ if isinstance(trainer, type) else type(trainer).__name__
        raise TypeError(f"trainer: {name} has no generalized_jsd_loss to route (TRL's GKDTrainer, GOLDTrainer and "
                        "IWOPDTrainer have one; DistillationTrainer computes its chunked loss without such a hook)")
    hook = getattr(hook, "askd_original", hook)
    if isinstance(trainer, type):
        return type(f"ASKD{trainer.__name__}", (trainer,), {
            "generalized_jsd_loss": staticmethod(_route(hook)),
            "__doc__": f"{trainer.__name__} whose generalized_jsd_loss runs askd_kernels.divergence_loss(kind='jsd').",
            "__module__": __name__})
    trainer.generalized_jsd_loss = _route(hook)      # an instance attribute: called unbound, like the static method
    return trainer


def __getattr__(name):
    if name == "ASKDGKDTrainer":
        try:                                            # optional dependency, imported lazily
            from trl.experimental.gkd import GKDTrainer  # TRL >= 0.2x: GKD lives in trl.experimental
        except ImportError:
            from trl import GKDTrainer

        cls = use_askd_kernels(GKDTrainer)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["generalized_jsd_loss", "use_askd_kernels"]
