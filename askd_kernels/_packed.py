"""Packed rows: several sequences in one row (padding-free training), or flat ``[N, V]`` inputs.

Where sequences begin is given either by ``cu_seqlens`` (the cumulative lengths ``[0, n_1, n_1 + n_2,
…, N]`` over the tokens in row-major order, as flash-attention's varlen functions take them) or by
``position_ids`` (a new sequence starts wherever the position id is 0 and at the start of every row,
which is how ``transformers`` derives ``cu_seqlens`` from the ``position_ids`` of
``DataCollatorWithFlattening``: the loss then sees the sequences the model attended over).

Only what is per sequence needs the sequence layout: per-token work (the row statistics, the
gradient, every divergence term) runs on the tokens where they lie, viewed as ``[N, 1, V]`` — every
token its own row, with the per-sequence α, κ and flags gathered per token — and only ASKD's
coefficient stage (suffix scans over a sequence) runs on a ``[S, L]`` layout (S sequences, L the
longest) built from the per-token fp32 statistics with the index maps of :class:`Layout`. Nothing of
size tokens × vocabulary is copied.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks as check


class Layout(NamedTuple):
    """Index maps between the N tokens (row-major) and the ``[S, L]`` sequence layout."""
    num_seqs: int          # S
    max_len: int           # L
    seq_of_token: Tensor   # int64 [N]: the sequence of each token
    slot: Tensor           # int64 [N]: its place seq·L + position in the flattened [S, L] layout
    gather: Tensor         # int64 [S, L]: the token at each place, N (one past the last) where none

    def to_sequences(self, per_token: Tensor, fill) -> Tensor:
        """``[N]`` per-token values → ``[S, L]``, ``fill`` where a sequence has ended."""
        padded = torch.cat([per_token.reshape(-1), per_token.new_full((1,), fill)])
        return padded[self.gather]

    def to_tokens(self, per_place: Tensor) -> Tensor:
        """``[S, L]`` → ``[N]``: the value of each token's place."""
        return per_place.reshape(-1)[self.slot]


def token_shapes(name, logits, labels_name, labels, *, flat_ok):
    """``logits`` ``[B, T, V]`` with ``labels`` ``[B, T]``, or (if ``flat_ok``) ``[N, V]`` with ``[N]``.
    Returns ``V``; raises the usual errors naming the argument."""
    check.tensor(name, logits, floating=check.LOGIT_DTYPES)
    if logits.dim() not in ((2, 3) if flat_ok else (3,)):
        want = "[B, T, V] or flat [N, V]" if flat_ok else "[B, T, V]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(logits.shape)}")
    if 0 in logits.shape:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(logits.shape)}")
    check.tensor(labels_name, labels, integer=True)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{labels_name} must have shape {tuple(logits.shape[:-1])} to match {name} of shape "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    return logits.shape[-1]


def per_token_view(x: Optional[Tensor], n: int) -> Optional[Tensor]:
    """``[..., V]`` logits as ``[N, 1, V]``: every token its own length-1 row (a view whenever the
    strides allow one, always for a single row or flat input)."""
    return None if x is None else x.reshape(n, 1, x.shape[-1])


def layout(labels: Tensor, device, *, cu_seqlens=None, position_ids=None, max_seqlen=None) -> Layout:
    """The :class:`Layout` of the tokens of ``labels`` (``[B, T]`` or ``[N]``), after checking the
    boundary arguments. The sizes S and L must be python ints: S is ``len(cu_seqlens) − 1`` and L is
    ``max_seqlen`` when given, so ``cu_seqlens`` with ``max_seqlen`` costs no device sync; otherwise
    one sync reads them (and the checks of the values ride along with it)."""
    n = labels.numel()
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("pass at most one of cu_seqlens and position_ids")
    if position_ids is not None:
        flat_row = labels.dim() == 1 and tuple(position_ids.shape) == (1, n)
        check.tensor("position_ids", position_ids, integer=True,
                     shape=None if flat_row else labels.shape)
        check.same_device(device, position_ids=position_ids)
        starts = (position_ids.reshape(labels.shape) == 0)
        starts = torch.cat([torch.ones_like(starts[..., :1]), starts[..., 1:]], dim=-1).reshape(-1)
        cu = torch.cat([starts.nonzero().squeeze(1), torch.tensor([n], device=device)])  # one sync on CUDA
        name = "position_ids"
    else:
        check.tensor("cu_seqlens", cu_seqlens, ndim=1, integer=True)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must hold at least [0, N], got shape {tuple(cu_seqlens.shape)}")
        check.same_device(device, cu_seqlens=cu_seqlens)
        cu = cu_seqlens.to(torch.int64)
        name = "cu_seqlens"
    lengths = cu[1:] - cu[:-1]
    if max_seqlen is not None:
        max_len = check.integer("max_seqlen", max_seqlen)
        if max_len < 1:
            raise ValueError(f"max_seqlen must be >= 1, got {max_len}")
    read = max_seqlen is None or check.can_read_values(cu)
    if read:  # one read of four numbers
        first, last, shortest, longest = torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
        if name == "cu_seqlens" and (first != 0 or last != n or shortest < 0):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the number of tokens "
                             f"({n}), got {cu_seqlens.tolist() if cu.numel() <= 12 else 'other values'}")
        if max_seqlen is None:
            max_len = longest
        elif longest > max_len:
            raise ValueError(f"max_seqlen ({max_len}) is shorter than the longest sequence ({longest})")
    num_seqs = cu.numel() - 1
    token = torch.arange(n, device=device)
    seq_of_token = torch.searchsorted(cu[1:].contiguous(), token, right=True)
    slot = seq_of_token * max_len + (token - cu[seq_of_token])
    place = torch.arange(max_len, device=device)
    gather = torch.where(place < lengths.unsqueeze(1), cu[:-1].unsqueeze(1) + place, n)
    return Layout(num_seqs, max_len, seq_of_token, slot, gather)
