"""Timing, copy bandwidth and peak-memory measurement, on CUDA and on CPU."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from typing import Callable, Sequence

import torch

QUANTILES = (0.2, 0.5, 0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator failing; also when wrapped (e.g. by torch.compile)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def _quantiles(samples: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (numpy's default) of a non-empty sample."""
    xs = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    rep_ms: float = 1000.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> list[float]:
    """[p20, p50, p80] in milliseconds of ``fn()``, with the ``.grad`` of ``grad_to_none`` reset first.

    CUDA: ``triton.testing.do_bench`` (it flushes L2 between runs). CPU: wall clock after one
    warm-up call, repeated until ``rep_ms`` has elapsed (at least ``min_reps`` times).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return list(
            do_bench(fn, warmup=max(25, int(rep_ms / 10)), rep=int(rep_ms),
                     grad_to_none=list(grad_to_none), quantiles=list(QUANTILES))
        )

    def once() -> float:
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up
    samples: list[float] = []
    while len(samples) < max_reps and (len(samples) < min_reps or sum(samples) < rep_ms):
        samples.append(once())
    return _quantiles(samples, QUANTILES)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, rep_ms: float = 500.0) -> float:
    """Device-to-device copy bandwidth, GB/s (1e9), counting bytes read + bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    p50 = time_ms(lambda: dst.copy_(src), device, rep_ms=rep_ms)[1]
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    free_memory(device)
    return moved / (p50 * 1e-3) / 1e9


@contextlib.contextmanager
def _stderr_silenced():
    """Point file descriptor 2 at /dev/null (C++ logging bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_allocations(fn: Callable[[], object]):
    """Run ``fn`` under the profiler; return (result, peak, net) CPU bytes allocated during the call.

    Every allocation and free of the c10 CPU allocator is an event of the profiler's event tree;
    their running sum in time order is the memory held above what was there before the call.
    Returns peak = net = None if that private profiler API is not there.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():  # kineto prints a line at start and at stop
        prof.start()
    try:
        result = fn()
    finally:
        with _stderr_silenced():
            prof.stop()
    try:
        from torch._C._profiler import _EventType

        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except (ImportError, AttributeError):
        return result, None, None
    if not events:
        return result, None, None
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return result, peak, running


def peak_memory(
    forward: Callable[[], torch.Tensor], device: torch.device
) -> tuple[int | None, int | None]:
    """(forward peak, forward+backward peak), bytes above what was allocated before the call.

    Inputs are allocated before and so not counted; the gradient written by backward is counted
    (it is memory the step needs). CUDA: the caching allocator's peak statistics. CPU: the
    profiler's allocation events (see ``cpu_allocations``), or None when they are unavailable.
    """
    if device.type == "cuda":
        free_memory(device)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = forward()
        synchronize(device)
        fwd_peak = torch.cuda.max_memory_allocated(device) - base
        loss.backward()
        synchronize(device)
        total_peak = torch.cuda.max_memory_allocated(device) - base
        return fwd_peak, total_peak

    loss, fwd_peak, fwd_held = cpu_allocations(forward)
    _, bwd_peak, _ = cpu_allocations(loss.backward)
    if fwd_peak is None or bwd_peak is None:
        return fwd_peak, None
    return fwd_peak, max(fwd_peak, fwd_held + bwd_peak)
