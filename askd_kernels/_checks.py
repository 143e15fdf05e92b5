"""Argument checks shared by the public ops: every bad input fails here, before any kernel runs,
with a ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or value) that
names the argument.

Checks that read tensor *values* would need a device→host sync, so they are done only for CPU
tensors in eager mode (not while ``torch.compile`` traces, where they would break the graph). Where
they are skipped the behaviour is documented instead (docs/contract.md §7.3): values of ``alpha``
outside [0, 1] give NaN for those sequences, labels outside ``[0, V_s)`` that are not
``ignore_index`` give a NaN loss (neither reads out of bounds), and a ``num_items`` tensor ≤ 0 is
divided by as given (±inf or NaN), never clamped.
"""
import math
from numbers import Real

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def can_read_values(t: Tensor) -> bool:
    """True when checking ``t``'s values costs no device sync and no graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def tensor(name, value, *, ndim=None, shape=None, floating=None, integer=False, boolean=False):
    """Check one tensor argument and return it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in floating:
        names = ", ".join(str(d).replace("torch.", "") for d in floating)
        raise TypeError(f"{name} must have a floating dtype in ({names}), got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if boolean and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def sequence_tensor(name, value):
    """A non-empty ``[B, T, X]`` floating tensor (logits or hidden states); returns ``(B, T, X)``."""
    tensor(name, value, ndim=3, floating=LOGIT_DTYPES)
    B, T, X = value.shape
    if B == 0 or T == 0 or X == 0:
        raise ValueError(f"{name} must be non-empty, got shape {(B, T, X)}")
    return B, T, X


def teacher_logits(value, tokens):
    """``teacher_logits``: a floating tensor of the student's shape but for the vocabulary,
    ``[*tokens, V_t > 0]`` (``tokens`` = the labels' shape: ``(B, T)``, or ``(N,)`` for flat input)."""
    tensor("teacher_logits", value, floating=LOGIT_DTYPES)
    tokens = tuple(tokens)
    if value.dim() != len(tokens) + 1 or tuple(value.shape[:-1]) != tokens or value.shape[-1] == 0:
        raise ValueError(f"teacher_logits must have shape [{', '.join(map(str, tokens))}, V_t > 0] (the "
                         f"student's but for the vocabulary), got {tuple(value.shape)}")
    return value


def same_device(device, *, reference="student_logits", **tensors):
    """Every non-None tensor is on ``device``, the device of the argument named ``reference``."""
    for name, value in tensors.items():
        if value is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but {reference} is on {device}")


def scalar_tensor(name, value, *, integer=False):
    """A 0-d tensor given where a number is expected, as that python number (``float``, or ``int`` for
    ``integer``). Reading it is one ``.item()``: a device sync for a CUDA tensor, a graph break under
    ``torch.compile`` (pass a python number there)."""
    if value.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex() or (integer and value.is_floating_point()):
        kind = "an integer" if integer else "a real number"
        raise TypeError(f"{name} must be {kind} or a 0-d {'integer' if integer else 'real'} tensor, "
                        f"got a {value.dtype} tensor")
    return int(value.item()) if integer else float(value.item())


def number(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Check a real number — a python number or a 0-d real tensor — lies in the interval and return it
    as a float."""
    if isinstance(value, Tensor):
        value = scalar_tensor(name, value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad = math.isnan(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def per_sequence_alpha(alpha, batch, device):
    """``alpha`` as an fp32 [B] tensor; a python float or a 0-d tensor applies to every sequence (the
    0-d tensor is broadcast on its device: no sync)."""
    if isinstance(alpha, Tensor):
        if alpha.dim() == 0:
            alpha = alpha.expand(batch)
        tensor("alpha", alpha, ndim=1, shape=(batch,))
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating tensor, got {alpha.dtype}")
        same_device(device, alpha=alpha)
        if can_read_values(alpha) and not bool(((alpha >= 0) & (alpha <= 1)).all()):
            raise ValueError("alpha must lie in [0, 1] for every sequence")
        return alpha.detach().to(torch.float32).contiguous()
    return torch.full((batch,), number("alpha", alpha, low=0.0, high=1.0), dtype=torch.float32, device=device)


def per_sequence_flag(name, flag, batch, device):
    """A [B] bool tensor, or a python bool or 0-d bool tensor broadcast to all sequences."""
    if isinstance(flag, bool):
        return torch.full((batch,), flag, dtype=torch.bool, device=device)
    if isinstance(flag, Tensor) and flag.dim() == 0 and flag.dtype == torch.bool:
        flag = flag.expand(batch)
    tensor(name, flag, ndim=1, shape=(batch,), boolean=True)
    same_device(device, **{name: flag})
    return flag


def reduction_and_num_items(reduction, num_items, device):
    """``reduction`` and the ``"mean"`` denominator ``num_items``: None (count the valid tokens), a
    finite python number > 0 (returned as a float), or a one-element real tensor on ``device``
    (returned as an fp32 scalar tensor; its value is checked — finite and > 0 — only where it can be
    read without a sync, see :func:`can_read_values`)."""
    choice("reduction", reduction, REDUCTIONS)
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"num_items must be a real number or a real scalar tensor, got {num_items.dtype}")
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar tensor, got shape {tuple(num_items.shape)}")
        same_device(device, num_items=num_items)
        if can_read_values(num_items):
            value = float(num_items.reshape(()))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"num_items must be finite and > 0, got a tensor holding {value}")
        return num_items.reshape(()).float()
    value = number("num_items", num_items, low=0.0, low_open=True)
    if not math.isfinite(value):
        raise ValueError(f"num_items must be finite and > 0, got {value}")
    return value


def index_labels(labels: Tensor) -> Tensor:
    """``labels`` (any integer dtype, already checked) as the contiguous int64 tensor every kernel
    takes. Widening first makes every comparison with ``ignore_index`` exact: int8/uint8/int16 labels
    would otherwise crash ``gather`` on the torch path, and a narrow dtype compared with a python int
    wraps it (uint8 labels ``!= -100`` is False for the label 156; int32 labels ``!= 2**40`` is
    False for the label 0)."""
    return labels.to(torch.int64).contiguous()


def labels_in_vocab(labels, ignore_index, vocab, vocabulary="the student vocabulary"):
    """Labels must be ``ignore_index`` or in [0, vocab): checked on CPU only (a sync on CUDA)."""
    if not can_read_values(labels) or labels.numel() == 0:
        return
    labels = index_labels(labels)  # compare exactly, whatever the labels' dtype
    valid = labels != ignore_index
    if bool(((labels < 0) & valid).any()) or bool(((labels >= vocab) & valid).any()):
        raise ValueError(f"labels must be ignore_index ({ignore_index}) or in [0, {vocab}) "
                         f"({vocabulary})")


def temperature(value):
    """τ: a finite real number > 0, returned as a float."""
    value = number("temperature", value, low=0.0, low_open=True)
    if not math.isfinite(value):
        raise ValueError(f"temperature must be finite, got {value}")
    return value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def integer(name, value):
    """A python int (not a bool) that fits in int64, e.g. ``ignore_index`` (the custom ops and the
    kernels take it as int64; labels are widened to int64 before they are compared with it, so it
    need not fit the labels' own dtype: a value outside that range simply matches no label). A 0-d
    integer tensor is read as its value."""
    if isinstance(value, Tensor):
        value = scalar_tensor(name, value, integer=True)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63 - 1]), got {value}")
    return value


def apply_reduction(values, labels, ignore_index, reduction, num_items):
    """Reduce per-sequence or per-token ``values`` as the public ops document: ``"none"`` returns them,
    ``"sum"`` sums, ``"mean"`` divides the sum by ``num_items`` (from :func:`reduction_and_num_items`)
    exactly as given, or else by the number of valid labels, a device tensor (no sync) clamped to
    ≥ 1 so that an all-ignored batch gives 0 (the clamp is for that default count only: a given
    ``num_items`` of 0.5 halves nothing away). Plain differentiable torch ops, so upstream gradients
    flow back."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if num_items is None:
        n = (index_labels(labels) != ignore_index).sum()  # widened: a narrow dtype would wrap ignore_index
        return values.sum() / torch.clamp(torch.as_tensor(n, dtype=torch.float32, device=values.device), min=1.0)
    return values.sum() / torch.as_tensor(num_items, dtype=torch.float32, device=values.device)


def not_swapped(labels, teacher_logits):
    """A ``TypeError`` naming the likely mix-up when ``labels`` look like logits (floating) and
    ``teacher_logits`` like labels (integer): the two families order them differently."""
    if (isinstance(labels, Tensor) and isinstance(teacher_logits, Tensor) and labels.is_floating_point()
            and not (teacher_logits.is_floating_point() or teacher_logits.is_complex()
                     or teacher_logits.dtype == torch.bool)):
        raise TypeError(
            f"labels has the floating dtype {labels.dtype} and teacher_logits the integer dtype "
            f"{teacher_logits.dtype}: they look swapped. askd_loss takes (student_logits, labels, "
            f"teacher_logits) but divergence_loss takes (student_logits, teacher_logits, labels); pass "
            f"them by keyword to avoid the mix-up")
