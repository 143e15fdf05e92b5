"""What the benchmark grid measures: the ops, their inputs, their providers and their roofline.

An ``Op`` is one public loss of ``askd_kernels`` (``askd_loss``; ``divergence_loss`` for one ``kind``;
``askd_loss_from_hidden``). For a ``Shape`` and dtype it builds a ``Case`` (the input tensors and the
leaves that get a gradient) and, per provider, a loss function ``Case -> scalar loss``:

* ``ours``    — the public ``askd_kernels`` function (Triton on CUDA, the chunked PyTorch path on CPU); for
  ``askd_loss_from_hidden`` the teacher's side is ``token_logprobs`` of its hidden states and head;
* ``eager``   — the straightforward PyTorch loss of ``bench/baselines.py``;
* ``compile`` — ``torch.compile`` of that same function (``dynamic=True``: one compilation per op
  serves every shape of the grid; the vocabulary is a reduction length, so inductor emits looped
  reductions for it either way);
* ``liger``   — Liger-Kernel where it has the same loss (fkl, rkl, jsd, tvd: its kernels take
  log-probabilities or probabilities, so the fp32 log-softmaxes are materialised first, as its users
  do); an optional import, CUDA only.

A provider that cannot run an op here (Liger-Kernel: not installed, not on CUDA, no such loss) raises
``Unavailable`` with the reason, which the grid records. ``askd_kernels`` itself is a hard import: if
it fails, the benchmark fails.

The roofline (``Op.bytes_moved``, the benchmark's only traffic model) is the minimum memory traffic
of the op per mode, with e the bytes of one logit, N tokens, V the vocabulary (H the hidden size):

==================== ================ ================ ================
op                   forward          backward         full
==================== ================ ================ ================
askd_loss            2·N·V·e          2·N·V·e          4·N·V·e
divergence_loss      2·N·V·e          3·N·V·e          5·N·V·e
from_hidden          e·(N+V)·(H_s+H_t) 2·e·(N+V)·H_s   the sum
==================== ================ ================ ================

forward: student and teacher logits read once. backward: askd_loss reads the student logits again and
writes the gradient (its per-token factor comes from the forward); a divergence's gradient depends on
both distributions at every column, so the teacher is read again too. Per-token scalars (labels,
log-sum-exps, λ) are a few bytes per token and not counted. from_hidden moves the hidden states and
the weights (reads) and their gradients (writes); it is compute-bound, so its records also carry the
minimum FLOPs (forward 2·N·V·(H_s+H_t), backward 4·N·V·H_s for the two gradients).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

import askd_kernels as ak

from . import baselines

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("ours", "eager", "compile", "liger")
KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")
JSD_BETA = 0.5


class Unavailable(Exception):
    """The provider cannot run this op here; the message is the reason recorded with the result."""


@dataclass(frozen=True)
class Model:
    name: str  # what the plots and tables call it
    vocab: int
    hidden: int


# Shapes of the last layer of a few common students. A Qwen2 teacher (e.g. Qwen2-7B) has 152064
# rows; the grid uses the student's vocabulary for both, the case every provider supports.
MODELS = {
    "qwen2": Model("Qwen2-1.5B", vocab=151936, hidden=1536),
    "llama3": Model("Llama-3-8B", vocab=128256, hidden=4096),
    "gemma2": Model("Gemma-2-2B", vocab=256000, hidden=2304),
    # toy vocabularies for the tests
    "toy256": Model("toy-256", vocab=256, hidden=32),
    "toy512": Model("toy-512", vocab=512, hidden=32),
}


@dataclass(frozen=True)
class Shape:
    model: str  # a key of MODELS, or "custom"
    batch: int
    seq: int
    vocab: int
    hidden: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def label(self) -> str:
        return f"{self.model} B={self.batch} T={self.seq} V={self.vocab}"


@dataclass
class Case:
    tensors: dict[str, torch.Tensor]
    leaves: list[torch.Tensor]  # inputs that get a gradient; leaves[0]'s gradient is cross-checked
    has_ignored: bool = False  # some labels are ignore_index (known without a device sync)


LossFn = Callable[[Case], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# inputs


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _per_sequence(batch: int, device: torch.device, gen):
    """The mixed TGO/SGO flags (odd sequences are SGOs) and α in [0.1, 0.9]."""
    student_generated = torch.arange(batch, device=device) % 2 == 1
    alpha = torch.rand(batch, generator=gen, device=device) * 0.8 + 0.1
    return student_generated, alpha


def logits_case(shape: Shape, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                ignore_frac: float = 0.0) -> Case:
    """Random logits (σ = 2) for student and teacher; ``ignore_frac`` of each sequence's head masked."""
    gen = _generator(device, seed)
    dims = (shape.batch, shape.seq, shape.vocab)
    student = torch.randn(dims, generator=gen, device=device, dtype=dtype).mul_(2.0)
    teacher = torch.randn(dims, generator=gen, device=device, dtype=dtype).mul_(2.0)
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen, device=device)
    ignored = round(ignore_frac * shape.seq)
    labels[:, :ignored] = -100
    sgo, alpha = _per_sequence(shape.batch, device, gen)
    student.requires_grad_()
    return Case(dict(student=student, teacher=teacher, labels=labels, student_generated=sgo, alpha=alpha),
                [student], has_ignored=ignored > 0)


def hidden_case(shape: Shape, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                ignore_frac: float = 0.0) -> Case:
    """Random hidden states (σ = 1) and lm-head weights (σ = 2/√H, so logits have σ ≈ 2)."""
    gen = _generator(device, seed)
    B, T, V, H = shape.batch, shape.seq, shape.vocab, shape.hidden
    scale = 2.0 / math.sqrt(H)
    h_s = torch.randn((B, T, H), generator=gen, device=device, dtype=dtype)
    w_s = torch.randn((V, H), generator=gen, device=device, dtype=dtype).mul_(scale)
    h_t = torch.randn((B, T, H), generator=gen, device=device, dtype=dtype)
    w_t = torch.randn((V, H), generator=gen, device=device, dtype=dtype).mul_(scale)
    labels = torch.randint(0, V, (B, T), generator=gen, device=device)
    ignored = round(ignore_frac * T)
    labels[:, :ignored] = -100
    sgo, alpha = _per_sequence(B, device, gen)
    h_s.requires_grad_()
    w_s.requires_grad_()
    return Case(dict(student_hidden=h_s, student_weight=w_s, teacher_hidden=h_t, teacher_weight=w_t,
                     labels=labels, student_generated=sgo, alpha=alpha), [h_s, w_s], has_ignored=ignored > 0)


# ----------------------------------------------------------------------------------------------
# providers

_COMPILED: dict[str, Callable] = {}


def _compiled(key: str, fn: Callable) -> Callable:
    """One ``torch.compile`` wrapper per baseline for the whole process (its cache lives on ``fn``)."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


def _liger_functional(device: torch.device):
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger_kernel is not installed (optional: pip install liger-kernel)")
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels run on CUDA only")
    try:
        from liger_kernel.transformers import functional
    except Exception as error:  # noqa: BLE001 - any import failure is the reason to record
        raise Unavailable(f"liger_kernel does not import: {type(error).__name__}: {error}") from None
    return functional


def _flat_log_probs(x: Case):
    """fp32 log q, log p as [N, V] (what Liger's distillation losses take) and the flat labels."""
    vocab = x.tensors["student"].shape[-1]
    log_q = torch.log_softmax(x.tensors["student"].float(), dim=-1).view(-1, vocab)
    log_p = torch.log_softmax(x.tensors["teacher"].float(), dim=-1).view(-1, vocab)
    return log_q, log_p, x.tensors["labels"].reshape(-1)


def _liger_loss(kind: str, device: torch.device) -> LossFn:
    if kind not in ("fkl", "rkl", "jsd", "tvd"):
        raise Unavailable(f"Liger-Kernel has no {kind} loss")
    F = _liger_functional(device)

    if kind == "fkl":  # its KL-divergence loss; no ignore_index, so ignored rows are dropped first
        def loss(x: Case) -> torch.Tensor:
            log_q, log_p, labels = _flat_log_probs(x)
            if x.has_ignored:
                keep = labels != -100
                log_q, log_p = log_q[keep], log_p[keep]
            return F.liger_kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    elif kind in ("rkl", "jsd"):  # its generalised JSD: β = 1 is reverse KL, as in docs/contract.md §6
        beta = 1.0 if kind == "rkl" else JSD_BETA

        def loss(x: Case) -> torch.Tensor:
            log_q, log_p, labels = _flat_log_probs(x)
            return F.liger_jsd(log_q, log_p, labels, beta=beta, ignore_index=-100)
    else:  # tvd on probabilities; the gradient goes to its first argument
        def loss(x: Case) -> torch.Tensor:
            log_q, log_p, labels = _flat_log_probs(x)
            return F.liger_tvd(log_q.exp(), log_p.exp(), labels, reduction="batchmean", ignore_index=-100)

    return loss


# ----------------------------------------------------------------------------------------------
# ops


@dataclass(frozen=True)
class Op:
    id: str  # "askd_loss", "divergence_loss:fkl", "askd_loss_from_hidden"
    function: str  # the askd_kernels function
    kind: str | None = None

    @property
    def family(self) -> str:
        return "hidden" if self.function == "askd_loss_from_hidden" else "logits"

    def make_case(self, shape: Shape, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                  ignore_frac: float = 0.0) -> Case:
        build = hidden_case if self.family == "hidden" else logits_case
        return build(shape, dtype, device, seed=seed, ignore_frac=ignore_frac)

    def loss_fn(self, provider: str, device: torch.device) -> LossFn:
        """The provider's loss function for this op; raises ``Unavailable`` with the reason."""
        if provider not in PROVIDERS:
            raise ValueError(f"provider: unknown {provider!r}; known: {PROVIDERS}")
        if self.function == "askd_loss":
            return self._askd(provider)
        if self.function == "divergence_loss":
            return self._divergence(provider, device)
        return self._from_hidden(provider)

    # -- askd_loss
    def _askd(self, provider: str) -> LossFn:
        if provider == "liger":
            raise Unavailable("Liger-Kernel has no ASKD loss")
        if provider == "ours":
            def loss(x: Case) -> torch.Tensor:
                t = x.tensors
                return ak.askd_loss(t["student"], t["labels"], t["teacher"], student_generated=t["student_generated"],
                                    alpha=t["alpha"], reduction="mean")

            return loss
        base = baselines.askd_loss_torch if provider == "eager" else _compiled(self.id, baselines.askd_loss_torch)

        def loss(x: Case) -> torch.Tensor:
            t = x.tensors
            return base(t["student"], t["labels"], t["teacher"], student_generated=t["student_generated"],
                        alpha=t["alpha"])

        return loss

    # -- divergence_loss(kind)
    def _divergence(self, provider: str, device: torch.device) -> LossFn:
        kind = self.kind
        if provider == "liger":
            return _liger_loss(kind, device)
        if provider == "ours":
            def loss(x: Case) -> torch.Tensor:
                t = x.tensors
                alpha = t["alpha"] if kind in ("skl", "srkl") else None
                return ak.divergence_loss(t["student"], t["teacher"], t["labels"], kind=kind, alpha=alpha,
                                          beta=JSD_BETA, reduction="mean")

            return loss
        base = baselines.DIVERGENCES[kind]
        if provider == "compile":
            base = _compiled(self.id, base)

        def loss(x: Case) -> torch.Tensor:
            t = x.tensors
            alpha = t["alpha"] if kind in ("skl", "srkl") else None
            return base(t["student"], t["teacher"], t["labels"], alpha=alpha, beta=JSD_BETA)

        return loss

    # -- askd_loss_from_hidden
    def _from_hidden(self, provider: str) -> LossFn:
        if provider == "liger":
            raise Unavailable("Liger-Kernel has no ASKD loss (its fused-linear losses are JSD/KL/CE)")
        if provider == "ours":
            return _ours_from_hidden()
        fn = baselines.askd_loss_from_hidden_torch
        base = fn if provider == "eager" else _compiled(self.id, fn)

        def loss(x: Case) -> torch.Tensor:
            t = x.tensors
            return base(t["student_hidden"], t["student_weight"], t["labels"], t["teacher_hidden"],
                        t["teacher_weight"], student_generated=t["student_generated"], alpha=t["alpha"])

        return loss

    # -- roofline
    def bytes_moved(self, shape: Shape, elt: int, mode: str) -> int:
        N, V, H = shape.tokens, shape.vocab, shape.hidden
        if self.family == "hidden":
            forward = elt * (N + V) * (H + H)  # student and teacher hidden states and weights
            backward = 2 * elt * (N + V) * H  # student's read again, its two gradients written
        else:
            forward = 2 * N * V * elt
            backward = (2 if self.function == "askd_loss" else 3) * N * V * elt
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]

    def flops(self, shape: Shape, mode: str) -> int | None:
        if self.family != "hidden":
            return None
        N, V, H = shape.tokens, shape.vocab, shape.hidden
        forward, backward = 2 * N * V * (H + H), 4 * N * V * H
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def _ours_from_hidden() -> LossFn:
    """The teacher's token log-probs from its hidden states and head (``token_logprobs``, no
    gradient), then ``askd_loss_from_hidden`` on the student's: no tokens × vocab logits anywhere."""
    def loss(x: Case) -> torch.Tensor:
        t = x.tensors
        with torch.no_grad():
            teacher_logprobs = ak.token_logprobs(t["teacher_hidden"], t["teacher_weight"], t["labels"])
        return ak.askd_loss_from_hidden(t["student_hidden"], t["student_weight"], t["labels"],
                                        teacher_logprobs=teacher_logprobs, student_generated=t["student_generated"],
                                        alpha=t["alpha"], reduction="mean")

    return loss


OPS: dict[str, Op] = {"askd_loss": Op("askd_loss", "askd_loss")}
OPS.update({f"divergence_loss:{k}": Op(f"divergence_loss:{k}", "divergence_loss", k) for k in KINDS})
OPS["askd_loss_from_hidden"] = Op("askd_loss_from_hidden", "askd_loss_from_hidden")

ALIASES = {"askd": ["askd_loss"], "divergence": [f"divergence_loss:{k}" for k in KINDS],
           "divergence_loss": [f"divergence_loss:{k}" for k in KINDS],
           "from_hidden": ["askd_loss_from_hidden"], "hidden": ["askd_loss_from_hidden"],
           **{k: [f"divergence_loss:{k}"] for k in KINDS}}


def resolve_ops(names) -> list[Op]:
    """Op ids or aliases (askd, fkl … tvd, divergence, from_hidden) -> ops, in registry order."""
    wanted: set[str] = set()
    for name in names:
        ids = [name] if name in OPS else ALIASES.get(name)
        if ids is None:
            raise ValueError(f"ops: unknown {name!r}; known: {sorted(OPS)} or {sorted(ALIASES)}")
        wanted.update(ids)
    return [op for op_id, op in OPS.items() if op_id in wanted]
