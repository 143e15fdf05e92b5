"""Bytes the Triton kernels move, counted by instrumenting the Triton interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.load``/``tl.store`` goes through the interpreter's builder with
the element addresses and the mask. :func:`count_traffic` records the addresses of every element
actually accessed (mask true) while a block runs; :meth:`Traffic.loaded` / :meth:`Traffic.stored` then
count the bytes that fall inside a given tensor's memory. So the count is exactly what the kernels
ask of global memory: a row read twice counts twice, a masked tail and a skipped (ignored) row count
nothing. It is the kernels' designed traffic — an upper bound of a GPU run's HBM traffic, whose
caches may serve a second pass over a row.

    with count_traffic() as traffic:
        loss = ak.divergence_loss(z, w, labels, kind="jsd")
        loss.backward()
    traffic.loaded(z), traffic.loaded(w), traffic.stored(z.grad)    # bytes
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


class Traffic:
    """The element addresses (and item sizes) of every load and store of a run."""

    def __init__(self):
        self._loads: list[tuple[np.ndarray, int]] = []
        self._stores: list[tuple[np.ndarray, int]] = []

    @staticmethod
    def _record(table, ptrs, mask, itemsize):
        table.append((np.asarray(ptrs).reshape(-1)[np.asarray(mask, dtype=bool).reshape(-1)], itemsize))

    @staticmethod
    def _inside(table, tensor: torch.Tensor) -> int:
        lo = tensor.data_ptr()
        hi = lo + tensor.numel() * tensor.element_size()
        return sum(int(((a >= lo) & (a < hi)).sum()) * size for a, size in table)

    def loaded(self, tensor: torch.Tensor) -> int:
        """Bytes loaded from ``tensor``'s memory."""
        return self._inside(self._loads, tensor)

    def stored(self, tensor: torch.Tensor) -> int:
        """Bytes stored into ``tensor``'s memory."""
        return self._inside(self._stores, tensor)


@contextlib.contextmanager
def count_traffic():
    """Record every element the interpreted Triton kernels load or store while the block runs.
    Needs ``TRITON_INTERPRET=1`` at import time and the Triton backend (``ASKD_KERNELS_BACKEND=triton``)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    traffic = Traffic()
    load, store = builder.create_masked_load, builder.create_masked_store

    def counted_load(self, ptrs, mask, other, cache_policy, is_volatile):
        ret = load(self, ptrs, mask, other, cache_policy, is_volatile)
        traffic._record(traffic._loads, ptrs.data, mask.data, ret.data.dtype.itemsize)
        return ret

    def counted_store(self, ptrs, value, mask, cache_policy):
        traffic._record(traffic._stores, ptrs.data, mask.data, value.data.dtype.itemsize)
        return store(self, ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
