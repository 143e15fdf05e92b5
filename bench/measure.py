"""Timing, copy bandwidth and peak-memory measurement, on CUDA and on CPU.

* ``time_ms`` — p20/p50/p80 of one callable: ``triton.testing.do_bench`` on CUDA (L2 flushed between
  runs), wall clock after a warm-up on CPU; ``copy_bandwidth_gbps`` uses it for the roofline.
* ``time_modes`` — forward, backward and forward+backward of a loss. CUDA: forward and full through
  ``do_bench``; backward in a loop of its own (each rep runs an untimed forward, flushes L2 the way
  ``do_bench`` does, and times ``loss.backward()`` between CUDA events), since ``do_bench`` cannot
  run an untimed set-up per rep and ``retain_graph=True`` is refused by ``torch.compile``'s donated
  buffers. CPU: one loop timing the forward and the backward of each rep by wall clock (full = their
  sum), the cheapest honest measurement on a small shared CPU.
* ``peak_memory_modes`` — peak extra memory of the forward, of the backward and of both.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import time
from typing import Callable, Sequence

import torch

QUANTILES = (0.2, 0.5, 0.8)


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when there is one, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: --device cuda but torch.cuda.is_available() is False")
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, collect: bool = True) -> None:
    """Return freed CUDA blocks to the device; ``collect`` first runs the garbage collector (0.2-0.3 s
    with torch imported: after failures, whose tracebacks hold tensors in reference cycles)."""
    if collect:
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


def time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 1000.0, min_reps: int = 5,
            max_reps: int = 1000) -> list[float]:
    """[p20, p50, p80] in milliseconds of ``fn()`` (the copy-bandwidth probe).

    CUDA: ``triton.testing.do_bench`` (it flushes L2 between runs). CPU: wall clock after one
    warm-up call, repeated until ``rep_ms`` has elapsed (at least ``min_reps`` times).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=max(25, int(rep_ms / 10)), rep=int(rep_ms), quantiles=list(QUANTILES)))

    def once() -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up
    samples: list[float] = []
    while len(samples) < max_reps and (len(samples) < min_reps or sum(samples) < rep_ms):
        samples.append(once())
    return _quantiles(samples, QUANTILES)


MODES = ("forward", "backward", "full")


def _clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def _cuda_backward_ms(forward: Callable[[], torch.Tensor], device: torch.device,
                      leaves: Sequence[torch.Tensor], rep_ms: float, min_reps: int,
                      max_reps: int, full_ms: float | None) -> list[float]:
    """Backward only, on CUDA: per rep an untimed forward, an L2 flush, then events around backward."""
    cache = torch.empty(256 << 20, dtype=torch.int8, device=device)  # as do_bench: 256 MB > L2
    estimate = full_ms if full_ms and full_ms > 0 else 1.0
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _clear_grads(leaves)
        loss = forward()
        cache.zero_()
        starts[i].record()
        loss.backward()
        ends[i].record()
        del loss
    torch.cuda.synchronize(device)
    _clear_grads(leaves)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)], QUANTILES)


def time_modes(
    forward: Callable[[], torch.Tensor],
    device: torch.device,
    *,
    leaves: Sequence[torch.Tensor],
    modes: Sequence[str] = MODES,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 1000,
) -> tuple[dict[str, list[float]], int | None]:
    """({mode: [p20, p50, p80] ms}, reps) of ``forward()`` (a scalar loss), its backward and both;
    reps is None on CUDA, where ``do_bench`` chooses them.

    ``leaves`` are the inputs whose ``.grad`` is reset before every rep (each backward allocates its
    gradient afresh, as the first one of a training step does). The caller has already run one
    forward+backward (the warm-up, and any compilation).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; known: {MODES}")
    out: dict[str, list[float]] = {}
    if device.type == "cuda":
        from triton.testing import do_bench

        def full() -> None:
            forward().backward()

        # One timed step, so that a slow step still gets >= 5 timed reps (do_bench would give it 1).
        _clear_grads(leaves)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        full()
        end.record()
        torch.cuda.synchronize(device)
        rep_ms = max(rep_ms, 5 * start.elapsed_time(end))
        bench = dict(warmup=max(10, int(rep_ms / 4)), rep=int(rep_ms), grad_to_none=list(leaves),
                     quantiles=list(QUANTILES))
        if "forward" in modes:
            out["forward"] = list(do_bench(forward, **bench))
        if "full" in modes or "backward" in modes:
            full_q = list(do_bench(full, **bench))
            if "full" in modes:
                out["full"] = full_q
            if "backward" in modes:
                out["backward"] = _cuda_backward_ms(forward, device, leaves, rep_ms, max(min_reps, 5), max_reps,
                                                    full_q[1])
        _clear_grads(leaves)
        return out, None  # do_bench chooses its repetitions

    samples: dict[str, list[float]] = {m: [] for m in MODES}
    while len(samples["full"]) < max_reps and (len(samples["full"]) < min_reps
                                               or sum(samples["full"]) < rep_ms):
        _clear_grads(leaves)
        start = time.perf_counter()
        loss = forward()
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        del loss
        samples["forward"].append((middle - start) * 1e3)
        samples["backward"].append((end - middle) * 1e3)
        samples["full"].append((end - start) * 1e3)
    _clear_grads(leaves)
    return {m: _quantiles(samples[m], QUANTILES) for m in modes}, len(samples["full"])


def copy_bandwidth_gbps(device: torch.device, nbytes: int, rep_ms: float = 500.0) -> float:
    """Device-to-device copy bandwidth, GB/s (1e9), counting bytes read + bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    p50 = time_ms(functools.partial(dst.copy_, src), device, rep_ms=rep_ms)[1]
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    free_memory(device, collect=False)
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


def peak_memory_modes(forward: Callable[[], torch.Tensor], device: torch.device) -> dict[str, int | None]:
    """Peak extra bytes of one step: ``{"forward", "backward", "full"}``.

    forward: the peak above what was allocated before the call (inputs are not counted; what the
    forward saves for backward is). backward: the peak during ``loss.backward()`` above what was
    allocated when it started (the gradient it writes is counted). full: the peak of the whole step
    above the start, ``max(forward, held after forward + backward)``. CUDA: the caching allocator's
    peak statistics. CPU: the profiler's allocation events (see ``cpu_allocations``); None where
    they are unavailable.
    """
    if device.type == "cuda":
        free_memory(device, collect=False)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = forward()
        synchronize(device)
        fwd_peak = torch.cuda.max_memory_allocated(device) - base
        before_bwd = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss.backward()
        synchronize(device)
        bwd_peak = torch.cuda.max_memory_allocated(device) - before_bwd
        return {"forward": fwd_peak, "backward": bwd_peak,
                "full": max(fwd_peak, before_bwd - base + bwd_peak)}

    loss, fwd_peak, fwd_held = cpu_allocations(forward)
    _, bwd_peak, _ = cpu_allocations(loss.backward)
    full = None if fwd_peak is None or bwd_peak is None else max(fwd_peak, fwd_held + bwd_peak)
    return {"forward": fwd_peak, "backward": bwd_peak, "full": full}



# ----------------------------------------------------------------------------------------------
# whole processes (CPU): one fresh interpreter per measurement


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def process_child(spec: dict) -> dict:
    """The measurement inside one fresh process (``python -m bench process --child``): set the
    threads, build the op's inputs, then ``spec["steps"]`` forward+backward steps. Returns the first
    step's time (compilation and first-touch included), the median of the later steps (the steady
    state), the loss, the resident memory after the inputs were built and the process's peak
    resident memory (``VmHWM``: everything the process ever held, torch itself and the inputs
    included)."""
    from .ops import DTYPES, OPS, Shape

    torch.set_num_threads(spec["threads"])
    op = OPS[spec["op"]]
    dev = torch.device("cpu")
    shape = Shape(spec.get("model", "custom"), spec["batch"], spec["tokens"] // spec["batch"], spec["vocab"],
                  spec.get("hidden", 1024))
    case = op.make_case(shape, DTYPES[spec["dtype"]], dev, seed=spec.get("seed", 0),
                        ignore_frac=spec.get("ignore_frac", 0.0))
    loss_fn = op.loss_fn(spec["provider"], dev)
    rss_inputs = _status_kib("VmRSS")
    times, loss = [], None
    for _ in range(spec["steps"]):
        for leaf in case.leaves:
            leaf.grad = None
        start = time.perf_counter()
        out = loss_fn(case)
        out.backward()
        times.append(time.perf_counter() - start)
        loss = float(out.detach().float())
        del out
    later = sorted(times[1:]) or times
    return {"first_step_s": times[0], "steady_step_s": later[len(later) // 2], "steps": len(times),
            "loss": loss, "rss_inputs_kib": rss_inputs, "peak_rss_kib": _status_kib("VmHWM"),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def run_process(spec: dict, timeout_s: float = 1800.0) -> dict:
    """Run :func:`process_child` in a fresh ``python -m bench process --child`` and time the whole
    process (interpreter start, imports, inputs, every step, exit) by wall clock from here. A
    failure (non-zero exit, out of memory, timeout) is a record with ``status`` and ``error``."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "bench", "process", "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "error": f"over {timeout_s:.0f} s", "process_s": None}
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        oom = done.returncode in (-9, 137) or "can't allocate memory" in done.stderr
        return {**spec, "status": "OOM" if oom else "failed", "error": done.stderr.strip()[-300:], "process_s": wall}
    return {**spec, "status": "ok", "error": None, "process_s": wall, **json.loads(lines[-1])}
