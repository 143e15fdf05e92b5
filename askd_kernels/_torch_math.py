"""The building blocks of the CPU paths, in PyTorch: the same math as :mod:`._triton_math`, with the
same signatures where a block exists in both.

* Blocks of rows (:func:`chunk_rows`, :func:`row_blocks`, :func:`rows_view`) — the one blocking rule
  of the CPU paths: rows are streamed ``chunk_rows(V)`` at a time, a block small enough that it and
  its fp32 working copies stay in the core's cache while every pass over it runs (see
  :data:`CHUNK_ELEMENTS`). Blocks are slices of the logits (views, never gathered copies); runs of
  ignored rows are skipped.
* :func:`for_blocks` — runs a function on every block, spread dynamically over ``torch.get_num_threads()``
  worker threads (see its docstring for why threads and not one op per pass over all rows).
* :func:`shift_into` — ``(z − m)/τ`` of a block written in fp32 into a reused buffer, the conversion
  from bf16/fp16 fused into that one pass; :func:`log_sum_into` — the block's log-sums from it; with
  the row maxima they form the (max, log-sum) pair of :func:`askd_kernels._triton_math.row_logsumexp`.
* :func:`log_prob_at` — ``log softmax(z/τ)[y]`` and the (max, log-sum) pair of a chunk of rows;
  :func:`log_softmax_at` — log-probabilities from that pair.
* :func:`log_mixture` — ``log(α·e^0 + (1−α)·e^x)`` written as ``logaddexp(log α, log(1−α) + x)``.
* :func:`divergence_terms` — per-column terms of the full-vocabulary divergences.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def _l2_bytes(default: int = 1 << 20) -> int:
    """The per-core L2 cache in bytes, from sysfs (Linux); ``default`` where it cannot be read."""
    try:
        root = "/sys/devices/system/cpu/cpu0/cache"
        for index in sorted(os.listdir(root)):
            with open(os.path.join(root, index, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(root, index, "size")) as f:
                text = f.read().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KMB")) * unit
    except (OSError, ValueError):
        pass
    return default


L2_BYTES = _l2_bytes()
# fp32 elements of one block of rows (tests lower it to force several blocks on tiny shapes): as
# many fp32 elements as one core's L2 holds bytes / 4, i.e. a block's fp32 working buffer is the
# size of that core's L2. Each worker thread of :func:`for_blocks` streams its own blocks: the
# block's logits are read from memory once, converted into the buffer, and the further passes over
# it (exp, sums, the gradient) hit L2/L3 instead of memory. Smaller blocks pay torch's per-op
# overhead (~10 ops per block) more often; larger ones spill the buffers (a divergence holds ~10
# of them) out of the caches. Measured on the 1 MiB-L2, 32 MiB-L3 machine of bench/results/cpu
# (askd_loss row stats + gradient, 4096 × 32000 bf16, two workers, best of 3 on a loaded
# machine): 64 Ki elements 0.70 + 0.54 s, 256 Ki 0.28 + 0.25 s, 1 Mi 0.20 + 0.21 s; the previous
# rule (4 Mi elements, 16 MiB per temporary, every op split over the threads) 2.5 + 1.8 s.
# 1 MiB of L2 gives 256 Ki elements: 8 rows of V = 32000, 1 row of V = 151936 (rows are never split).
CHUNK_ELEMENTS = max(1 << 14, L2_BYTES // 4)


def chunk_rows(n_cols: int) -> int:
    """Rows per block for rows of ``n_cols`` entries: ``CHUNK_ELEMENTS // n_cols``, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


def rows_view(x: torch.Tensor):
    """``(rows, period)`` for a ``[B, T, V]`` tensor: ``rows(a, b)`` is the ``[b − a, V]`` view of its
    flat rows ``a:b``. When the strides do not let the B·T rows be viewed as one matrix (e.g.
    ``logits[:, :-1]``), ``period`` is ``T`` and blocks must not cross a sequence (see
    :func:`row_blocks`); otherwise it is None. Never a copy."""
    B, T, V = x.shape
    try:
        flat = x.view(B * T, V)
        return (lambda a, b: flat[a:b]), None
    except RuntimeError:
        return (lambda a, b: x[a // T, a % T:a % T + (b - a)]), T


def row_blocks(active, n: int, n_cols: int, period=None):
    """The blocks of rows to process: a list of ``(start, stop, mask)``.

    Rows ``0:n`` are cut into consecutive blocks of :func:`chunk_rows` rows (never across a multiple
    of ``period`` when it is given). ``active`` (bool [n], or None for all) selects the rows that
    need work. A block with no active row is dropped; one with only active rows comes with mask
    None; one with at least half of its rows active is kept whole (trimmed to its first and last
    active rows) with ``mask`` = its active rows, so that a few ignored positions cost no extra
    passes (the caller discards their results); a sparser block is split into its runs of
    consecutive active rows. Every block is a slice: no row is ever gathered into a copy.
    """
    step = chunk_rows(n_cols)
    flags = None if active is None else active.tolist()
    blocks = []
    edges = range(0, n, period or max(n, 1))
    for first in edges:
        last = min(n, first + (period or n))
        for a in range(first, last, step):
            b = min(last, a + step)
            if flags is None:
                blocks.append((a, b, None))
                continue
            part = flags[a:b]
            count = sum(part)
            if count == 0:
                continue
            if count == b - a:
                blocks.append((a, b, None))
                continue
            lo = part.index(True)
            hi = len(part) - part[::-1].index(True)
            if 2 * count >= hi - lo:
                blocks.append((a + lo, a + hi, None if count == hi - lo else active[a + lo:a + hi]))
                continue
            run = None
            for i, on in enumerate(part + [False]):
                if on and run is None:
                    run = i
                elif not on and run is not None:
                    blocks.append((a + run, a + i, None))
                    run = None
    return blocks


_POOL = {"pool": None, "size": 0, "pid": None}
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """The ``size`` worker threads of :func:`for_blocks`: made on first use, again when torch's thread
    count changes, and in a forked child (whose copy of the pool has no threads).

    Each worker runs its ops on one thread: ``torch.set_num_threads(1)`` in a worker sets that
    thread's own OpenMP/MKL thread count (without it every op of every worker would start an
    OpenMP team of its own: 2 × 2 threads on 2 cores). That call also sets torch's default for
    threads started later, so once every worker has made it, the calling thread sets ``size``
    back: torch's setting is unchanged for everything else."""
    with _POOL_LOCK:
        if _POOL["size"] != size or _POOL["pid"] != os.getpid():
            if _POOL["pool"] is not None and _POOL["pid"] == os.getpid():
                _POOL["pool"].shutdown(wait=False)
            started = threading.Barrier(size)
            pool = ThreadPoolExecutor(size, thread_name_prefix="askd-kernels-cpu",
                                      initializer=torch.set_num_threads, initargs=(1,))
            for future in [pool.submit(started.wait) for _ in range(size)]:  # every worker initialised
                future.result()
            torch.set_num_threads(size)
            _POOL.update(pool=pool, size=size, pid=os.getpid())
        return _POOL["pool"]


def for_blocks(blocks, body, make_state=lambda: None) -> None:
    """``body(start, stop, mask, state)`` for every block of :func:`row_blocks`, with ``state =
    make_state()`` made once per thread (its block buffers).

    With ``torch.get_num_threads()`` = 1 (or a single block) the blocks run in order in the calling
    thread. Otherwise that many worker threads (:func:`_pool`) take the blocks one at a time from a
    shared list, each running its ops on one thread: the threads work on different blocks instead
    of splitting every op, so there is no OpenMP barrier per op, and a worker whose core is busy
    with another process simply takes fewer blocks. On a shared machine that matters: a small op
    split over two OpenMP threads waits at the barrier for a descheduled thread (measured at
    5–20 ms per op with the other core busy, against 40 µs on one core). torch releases the GIL
    inside every op, so the workers' ops run in parallel. Each block writes only its own rows of the outputs, so the results do not
    depend on the scheduling. Gradient mode is off in the workers (they are below autograd).

    Under the profiler the blocks run in the calling thread: the profiler attributes allocations to
    the thread that enabled it, so this keeps every allocation of the call visible to the
    memory tests and benchmarks (``bench.measure.cpu_allocations``). With n workers the working
    memory is n sets of block buffers instead of one."""
    threads = torch.get_num_threads()
    if threads <= 1 or len(blocks) <= 1 or torch._C._autograd._profiler_enabled():
        state = make_state()
        for a, b, mask in blocks:
            body(a, b, mask, state)
        return
    queue = iter(blocks)  # list iterators hand out each item once, under the GIL

    def worker():
        with torch.no_grad():
            state = make_state()
            for a, b, mask in queue:
                body(a, b, mask, state)

    futures = [_pool(threads).submit(worker) for _ in range(min(threads, len(blocks)))]
    for future in futures:
        future.result()


def shift_into(out: torch.Tensor, rows: torch.Tensor, m: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``out[:] = (rows − m)/τ`` in fp32, in one pass that also converts the logits' dtype, for a
    block of rows and their raw maxima ``m`` (fp32 [rows]): the argument of the softmax, shifted
    before it is scaled (see :func:`askd_kernels._triton_math.row_logsumexp`)."""
    torch.sub(rows, m.unsqueeze(-1), out=out)
    return out if inv_tau == 1.0 else out.mul_(inv_tau)


def log_sum_into(shifted: torch.Tensor, work: torch.Tensor = None) -> torch.Tensor:
    """``s = log Σ_v exp(shifted_v)`` per row [rows] of a block of shifted rows: the log-sum of the
    (max, log-sum) pair. The exponentials go into ``work`` (a buffer of the block's shape) when
    given, else into ``shifted`` itself, which is then overwritten."""
    e = torch.exp(shifted, out=work) if work is not None else shifted.exp_()
    return e.sum(-1).log_()


def shifted_fp32(rows: torch.Tensor, m: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``(rows − m)/τ`` in fp32 for a chunk of rows and their raw maxima ``m`` [rows]: the argument of
    the softmax, shifted before it is scaled (see :func:`askd_kernels._triton_math.row_logsumexp`)."""
    return shift_into(torch.empty(rows.shape, dtype=torch.float32, device=rows.device), rows, m, inv_tau)


def row_max(rows: torch.Tensor) -> torch.Tensor:
    """The raw maximum of each row in fp32 (NaN if the row holds a NaN)."""
    return rows.amax(-1).float()


def log_softmax_at(rows, m, s, inv_tau):
    """``log softmax(rows/τ)`` of a chunk from its (max, log-sum) pair ``m``, ``s`` [rows]."""
    return shifted_fp32(rows, m, inv_tau).sub_(s.unsqueeze(-1))


def log_prob_at(rows, labels, inv_tau, work=None):
    """``(log softmax(rows/τ)[label], (m, s))`` for a block: the log-probability of each row's label
    (−inf for labels outside [0, width)) and the row's (max, log-sum) pair ``[rows, 2]`` of
    :func:`askd_kernels._triton_math.row_logsumexp`, never folded into one number. ``work`` is an
    fp32 buffer of at least the block's rows (reused across blocks); without it one is allocated.
    Passes over the block: the max (in the logits' dtype), the shift with its conversion, the exp,
    the sum; the label's entry is read before the exp overwrites it."""
    m = row_max(rows)
    x = work[:rows.shape[0], :rows.shape[1]] if work is not None else None
    x = shift_into(x if x is not None else torch.empty(rows.shape, dtype=torch.float32, device=rows.device),
                   rows, m, inv_tau)
    inside = (labels >= 0) & (labels < x.shape[-1])
    x_at = x.gather(-1, torch.where(inside, labels, 0).unsqueeze(-1)).squeeze(-1)
    s = log_sum_into(x)
    return torch.where(inside, x_at - s, float("-inf")), torch.stack([m, s], dim=-1)


def log_mixture(log_a, log_1ma, x):
    """``log(e^{log_a} + e^{log_1ma + x})``; see :func:`askd_kernels._triton_math.log_mixture`.
    ``torch.logaddexp`` is exact when one side is −inf, so α ∈ {0, 1} are exact; NaN propagates."""
    return torch.logaddexp(log_a, log_1ma + x)


def divergence_terms(x, y, la, lb, kind: str, q=None, p=None):
    """``(f-terms, a, q)`` of a chunk for the divergence ``kind``; x = log q, y = log p, ``la``/``lb``
    the log weights of q and p in the mixture (broadcast against x). The formulas and their guards
    are those of :func:`askd_kernels._triton_math.divergence_terms`. ``q``/``p``: the probabilities
    when the caller already has them (e^x, e^y; may be overwritten), else computed here."""
    q = x.exp() if q is None else q
    p = y.exp() if p is None else p
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # 0·log 0 = 0 guards test "== 0", never "> 0", so that a NaN probability stays NaN.
    if kind == "fkl":
        return torch.where(p == 0, zero, p * (y - x)), -p, q
    if kind == "rkl":
        a = torch.where(q == 0, zero, q * (x - y))
        return a, a, q
    if kind == "tvd":  # sign(NaN) is 0: the 0·(q − p) term carries a NaN into the subgradient
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p) + 0.0 * (q - p), q
    log_m = log_mixture(la + x, lb, y)
    if kind == "skl":
        value = torch.where(p == 0, zero, p * (y - log_m))
        return value, torch.where((p == 0) | (q == 0), zero, -p * torch.exp(la + x - log_m)), q
    if kind == "srkl":
        d = x - log_m
        skew = torch.where(p == 0, zero, torch.exp(lb + y - log_m))  # (1−α) p/m
        return torch.where(q == 0, zero, q * d), torch.where(q == 0, zero, q * (d + skew)), q
    # jsd, 0 < β < 1: w_q = 1 − β = e^{la}, w_p = β = e^{lb}
    student = torch.where(q == 0, zero, la.exp() * q * (x - log_m))
    return torch.where(p == 0, zero, lb.exp() * p * (y - log_m)) + student, student, q
