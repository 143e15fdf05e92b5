"""Data parallel with ``torch.distributed``: the ``"mean"`` denominator over all ranks.

``askd_loss`` and ``divergence_loss`` with ``reduction="mean"`` divide the summed loss by the number
of valid tokens (labels ≠ ``ignore_index``) *of the local batch*. Under data parallelism (DDP, FSDP,
``torchrun``, ``accelerate``) the ranks hold different numbers of valid tokens, and DDP averages the
gradients over the ranks, so the local mean gives a gradient that is not that of the whole batch.
The whole batch's ``"mean"`` is ``Σ_ranks sum_r / N`` with ``N`` the global count; DDP computes
``(1/W) Σ_r ∇loss_r`` over ``W`` ranks, so each rank must use ``loss_r = sum_r / (N / W)``:

.. code-block:: python

    from askd_kernels.distributed import ddp_num_items

    n = ddp_num_items(labels)                          # N / W, one all_reduce
    loss = askd_loss(logits, labels, teacher_logits, num_items=n)   # reduction="mean"
    loss.backward()                                    # DDP's average = the whole batch's gradient

The reported ``loss`` of one rank is then its share times ``W``; after
``total = loss.detach().clone(); dist.all_reduce(total)``, ``total / W`` is the whole batch's mean loss.
Tested with ``gloo`` on CPU in ``tests/test_distributed.py``; ``docs/integration.md`` has the details.
"""
import weakref
from typing import Sequence, Union

import torch
from torch import Tensor

from . import _checks


def _group(process_group):
    """The group to reduce over, or None for a single process (``torch.distributed`` absent or not
    initialised and no group given)."""
    import torch.distributed as dist

    if process_group is None:
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    return process_group


def _local_count(labels, ignore_index) -> Tensor:
    batches = [labels] if isinstance(labels, Tensor) else labels
    if not isinstance(batches, (list, tuple)) or not batches:
        raise TypeError(f"labels must be a torch.Tensor or a non-empty list/tuple of them, "
                        f"got {type(labels).__name__}")
    ignore_index = _checks.integer("ignore_index", ignore_index)
    count = None
    for i, b in enumerate(batches):
        _checks.tensor("labels" if b is labels else f"labels[{i}]", b, integer=True)
        c = (_checks.index_labels(b) != ignore_index).sum()  # widened, as the losses count
        count = c if count is None else count + c.to(count.device)
    return count


def global_num_items(labels: Union[Tensor, Sequence[Tensor]], *, ignore_index: int = -100,
                     process_group=None) -> Tensor:
    """The number of valid tokens (``labels != ignore_index``) summed over all ranks of
    ``process_group``: an int64 scalar tensor on the (first) labels' device, the same on every rank,
    clamped to ≥ 1 as the losses' default count is (an all-ignored global batch then gives a loss of 0).

    ``labels`` is one rank's labels, any shape (``[B, T]`` or flat ``[N]``, as the losses take
    them), or a list of them — e.g. the micro-batches of one optimiser step under gradient
    accumulation, whose counts are added before the reduction. One ``all_reduce`` (sum) over
    ``process_group``; no host sync (the result stays a device tensor). ``process_group=None`` is
    the default group when ``torch.distributed`` is initialised, and otherwise no communication at all
    (one process: the local count). Every rank of the group must make the call.
    """
    group = _group(process_group)
    count = _local_count(labels, ignore_index)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return torch.clamp(count, min=1)


def ddp_num_items(labels: Union[Tensor, Sequence[Tensor]], *, ignore_index: int = -100,
                  process_group=None) -> Tensor:
    """``num_items`` for ``askd_loss`` / ``divergence_loss`` (``reduction="mean"``) under DDP-style
    gradient averaging: :func:`global_num_items` divided by the world size ``W`` of ``process_group``,
    an fp32 scalar tensor (``num_items`` takes a tensor and divides by it exactly as given, so a
    fractional ``N / W`` is fine). Each rank's loss is then ``sum_r · W / N`` and DDP's average of the
    gradients over the ``W`` ranks is the gradient of ``Σ_r sum_r / N``, the single-process ``"mean"``
    on the whole batch (up to fp32 rounding of the summation order).

    With gradient accumulation (``no_sync`` on all but the last micro-batch, gradients summed over
    micro-batches), pass the list of the step's micro-batch labels and use the result for every
    micro-batch of the step, without dividing the loss by the number of micro-batches. With a
    trainer that already averages over ranks differently (or sums), use :func:`global_num_items`
    and scale as that trainer needs.
    """
    group = _group(process_group)
    count = global_num_items(labels, ignore_index=ignore_index, process_group=group)
    if group is None:
        return count.to(torch.float32)
    import torch.distributed as dist

    return (count.to(torch.float64) / dist.get_world_size(group)).to(torch.float32)


# ---- vocabulary parallel: the shared pieces of every family's sharded path ------------------------
#
# With ``process_group=`` given to a loss, each rank of the group holds a contiguous slice of the
# vocabulary columns of the logits (rank r: columns [start_r, start_r + width_r), in rank order,
# widths may differ). A row's log-sum-exp is then combined from the per-shard (max, log-sum) pairs,
# the label's logit comes from the one shard that holds it, and a per-row sum over the vocabulary is
# the sum of the shards' partial sums. These helpers are that plain-torch combination; the per-shard
# statistics come from each family's kernels (or CPU path).

# group → {local width: (start, total)}: the layout of a sharded vocabulary. Keyed by the group object
# (weakly), not its name: a name such as the default group's "0" comes back after
# destroy_process_group and a new init_process_group, possibly with another layout.
_SHARDS = weakref.WeakKeyDictionary()


def vocab_group(process_group):
    """``process_group`` checked for a vocabulary-parallel call: a ``ProcessGroup`` of an initialised
    ``torch.distributed`` (a ``TypeError`` naming the argument otherwise). ``None`` is returned as is
    (no sharding: the single-device path)."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    return process_group


def vocab_shard(width: int, group) -> tuple:
    """``(start, total)``: this rank's first vocabulary column and the whole vocabulary's size, for a
    local shard of ``width`` columns. The widths are exchanged over ``group`` (one ``all_gather`` of
    one integer and a host read) the first time a (group, width) pair is seen, and remembered: the
    sharding of an lm_head does not change between steps."""
    import torch.distributed as dist

    known = _SHARDS.setdefault(group, {})
    if int(width) not in known:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = torch.tensor([width], dtype=torch.int64)
        if dist.get_backend(group) == "nccl":
            mine = mine.cuda()
        widths = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(widths, mine, group=group)
        widths = [int(w) for w in widths]
        if min(widths) < 1:
            raise ValueError(f"every rank of process_group needs at least one vocabulary column, got widths {widths}")
        known[int(width)] = (sum(widths[:rank]), sum(widths))
    return known[int(width)]


def local_labels(labels: Tensor, start: int, width: int, ignore_index: int) -> Tensor:
    """Global labels turned into the shard's columns: ``label − start`` where the label lies in the
    shard, ``width`` (no column) where it lies in another shard, and −1 at ignored positions — so the
    per-shard kernels run with ``ignore_index=−1``, whatever the caller's ``ignore_index`` is (a global
    ``ignore_index`` may equal another label's local column)."""
    local = labels - start
    inside = (local >= 0) & (local < width)
    return torch.where(labels == ignore_index, -1, torch.where(inside, local, width)).to(labels.dtype)


def gather_rows(x: Tensor, group) -> Tensor:
    """``[P, *x.shape]``: ``x`` of every rank of ``group`` in rank order (one ``all_gather``)."""
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """The sum of ``x`` over ``group`` (one ``all_reduce``), as a new tensor (``x`` is not written)."""
    import torch.distributed as dist

    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def combine_pairs(pairs: Tensor, inv_tau: float) -> Tensor:
    """The whole row's ``(max, log-sum)`` pair from the shards' pairs ``[P, n, 2]`` (each
    ``m_r = max z``, ``s_r = log Σ exp((z − m_r)/τ)`` over shard r): ``M = max_r m_r``,
    ``S = log Σ_r exp(s_r + (m_r − M)/τ)``, so that ``log softmax(z/τ)_v = (z_v − M)/τ − S``.

    A shard whose row is all −inf (a masked part of the vocabulary: m_r = −inf) contributes nothing;
    a NaN in any shard gives NaN."""
    m, s = pairs[..., 0], pairs[..., 1]
    top = m.amax(0)
    shifted = torch.where(m == float("-inf"), float("-inf"), s + (m - top) * inv_tau)
    return torch.stack([top, torch.logsumexp(shifted, 0)], -1)
