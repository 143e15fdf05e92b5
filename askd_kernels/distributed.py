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
