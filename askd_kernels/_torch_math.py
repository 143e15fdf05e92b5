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
* :data:`DIVERGENCE_TERMS` — the full-vocabulary divergences' per-column terms and gradient rows, one
  in-place function per kind (the only place each kind's formulas are written);
  :func:`divergence_terms` — the same terms on copies of its inputs.
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
    are those of :func:`askd_kernels._triton_math.divergence_terms`; they are written once, in the
    in-place :data:`DIVERGENCE_TERMS` functions, which this runs on copies (the inputs are left
    unchanged). ``q``/``p``: the probabilities when the caller already has them (e^x, e^y), else
    computed here."""
    q = x.exp() if q is None else q
    p = y.exp() if p is None else p.clone()
    v, a = DIVERGENCE_TERMS[kind](x.clone(), y.clone(), q.clone(), p, la, lb)
    return v, a, q


# ---- the per-kind terms in place ------------------------------------------------------------------
#
# One function per kind, ``f(x, y, q, p, la, lb, spare=(), grad=None)``, that overwrites its block
# buffers instead of allocating temporaries: x = log q, y = log p (fp32 [rows, V]); q, p the
# probabilities, or None for e^x, e^y computed here (into ``spare`` buffers of the block's shape
# where x or y is still needed, else in place; allocated when ``spare`` runs out); ``la``/``lb``
# [rows, 1] the log weights of q and p in the mixture m. Without ``grad`` it returns the columns'
# ``(f-terms, a)`` — the row sums of the forward, and of :func:`divergence_terms` — with a_v = q_v·∂f/∂q_v;
# with ``grad = (S, scale)`` ([rows, 1] each: the row sums Σ_u a_u and g/τ) it returns the gradient
# rows ``(a_v − q_v·S)·scale`` (∂f/∂z_v by the softmax Jacobian) and skips the f-terms. Every buffer
# passed in (x, y, q, p, the spares) may be overwritten. Per element, the operations are those of the
# formulas below in the same order, so that the results do not depend on the buffers (bitwise the
# same as the same formula written with temporaries). Guards are bool masks tested "== 0", never
# "> 0", so that a NaN probability stays NaN: 0·log 0 = 0 where a probability is 0 from a −inf logit,
# an underflow or a block's padding.

def _spare(spare, like):
    """The next spare buffer of ``spare`` (a list, consumed), or a new one shaped like ``like``."""
    return spare.pop() if spare else torch.empty_like(like)


def _gradient(a, q, grad):
    """``(a − q·S)·scale`` in place (into ``a``; ``q`` is overwritten)."""
    total, scale = grad
    return a.sub_(q.mul_(total)).mul_(scale)


def fkl_terms_(x, y, q, p, la, lb, spare=(), grad=None):
    """fkl, KL(p‖q): f_v = p (y − x), 0 where p = 0; a_v = −p.

    Gradient rows: (−p − q·S)·scale written as (q·(−S) − p)·scale — the same value, zeros of the
    same sign — with no f-terms, no a_v and no temporaries: q and p are e^x and e^y in place.
    Without ``grad`` q is not used."""
    if grad is not None:
        total, scale = grad
        return x.exp_().mul_(-total).sub_(y.exp_()).mul_(scale)
    d = torch.sub(y, x, out=x)
    p = y.exp_() if p is None else p
    return d.mul_(p).masked_fill_(p == 0, 0.0), p.neg_()


def rkl_terms_(x, y, q, p, la, lb, spare=(), grad=None):
    """rkl, KL(q‖p): f_v = a_v = q (x − y), 0 where q = 0 (the constant 1 of ∂f/∂q_v is dropped:
    adding c·q_v to every a_v leaves the gradient unchanged). p is not used."""
    d = torch.sub(x, y, out=y)
    q = x.exp_() if q is None else q
    a = d.mul_(q).masked_fill_(q == 0, 0.0)
    return _gradient(a, q, grad) if grad is not None else (a, a)


def tvd_terms_(x, y, q, p, la, lb, spare=(), grad=None):
    """tvd, ½ Σ|p − q|: f_v = ½ |q − p|; a_v = ½ q·sign(q − p) + 0·(q − p) — the subgradient 0 at
    ties; sign(NaN) is 0, so the 0·(q − p) term carries a NaN probability into a_v. x and y are
    used only for q, p (e^x, e^y in place); one spare buffer holds the signs."""
    q = x.exp_() if q is None else q
    p = y.exp_() if p is None else p
    d = torch.sub(q, p, out=p)
    a = torch.sign(d, out=_spare(spare, d)).mul_(q).mul_(0.5)  # ±q·½ is ½q·(±1), bit for bit
    if grad is not None:
        return _gradient(a.add_(d.mul_(0.0)), q, grad)
    a.add_(torch.mul(d, 0.0, out=q))
    return d.abs_().mul_(0.5), a


def _probabilities(x, y, q, p, spare):
    """``(q, p)``: the given ones, or e^x, e^y into spare buffers (x, y are kept)."""
    q = torch.exp(x, out=_spare(spare, x)) if q is None else q
    p = torch.exp(y, out=_spare(spare, y)) if p is None else p
    return q, p


def skl_terms_(x, y, q, p, la, lb, spare=(), grad=None):
    """skl, KL(p‖m) with m = α q + (1−α) p (la = log α, lb = log(1−α)): log m = logaddexp(la + x,
    lb + y) (:func:`log_mixture`: exact at α ∈ {0, 1}, never log(p + q));
    f_v = p (y − log m), 0 where p = 0; a_v = −p·α q/m with α q/m = exp(la + x − log m), 0 where
    p = 0 or q = 0. q is used only for its guard. Two spare buffers when q, p are not given."""
    q, p = _probabilities(x, y, q, p, spare)
    p_zero = p == 0
    guard = p_zero | (q == 0)
    lx = x.add_(la)
    if grad is not None:  # y is needed only as lb + y; q for the gradient
        log_m = torch.logaddexp(lx, y.add_(lb), out=y)
    else:  # y is needed for the f-terms; q only for its guard
        log_m = torch.logaddexp(lx, torch.add(y, lb, out=q), out=q)
    a = lx.sub_(log_m).exp_().mul_(p).neg_().masked_fill_(guard, 0.0)
    if grad is not None:
        return _gradient(a, q, grad)
    return y.sub_(log_m).mul_(p).masked_fill_(p_zero, 0.0), a


def srkl_terms_(x, y, q, p, la, lb, spare=(), grad=None):
    """srkl, KL(q‖m) with m = α q + (1−α) p: with log m as for skl and d = x − log m,
    f_v = q d, 0 where q = 0; a_v = q (d + (1−α) p/m), 0 where q = 0 — the full q·∂f/∂q including
    the dependence of m on q, 1 − α q/m written as (1−α) p/m = exp(lb + y − log m) (0 where p = 0)
    so that α = 1 gives exactly 0. p is used only for its guard (its buffer then holds log m). Two
    spare buffers when q, p are not given."""
    q, p = _probabilities(x, y, q, p, spare)
    p_zero, q_zero = p == 0, q == 0
    log_m = torch.logaddexp(torch.add(x, la, out=p), y.add_(lb), out=p)
    skew = y.sub_(log_m).exp_().masked_fill_(p_zero, 0.0)
    d = x.sub_(log_m)
    value = None if grad is not None else torch.mul(q, d, out=log_m).masked_fill_(q_zero, 0.0)
    a = d.add_(skew).mul_(q).masked_fill_(q_zero, 0.0)
    return _gradient(a, q, grad) if grad is not None else (value, a)


def jsd_terms_(x, y, q, p, la, lb, spare=(), grad=None):
    """jsd, β KL(p‖M) + (1−β) KL(q‖M) with M = (1−β) q + β p (la = log(1−β), lb = log β, 0 < β < 1):
    log M = logaddexp(la + x, lb + y); a_v = (1−β) q (x − log M), 0 where q = 0;
    f_v = β p (y − log M) (0 where p = 0) + a_v. Spare buffers: two, and one more when q is not
    given (p, when not given, is computed once q's buffer is free)."""
    q_given = q is not None
    q = q if q_given else torch.exp(x, out=_spare(spare, x))
    q_zero = q == 0
    lx = torch.add(x, la, out=_spare(spare, x))
    if grad is not None:  # y is needed only as lb + y, q for the gradient
        log_m = torch.logaddexp(lx, y.add_(lb), out=y)
        student = x.sub_(log_m).mul_(torch.mul(q, la.exp(), out=lx)).masked_fill_(q_zero, 0.0)
        return _gradient(student, q, grad)
    log_m = torch.logaddexp(lx, torch.add(y, lb, out=_spare(spare, y)), out=lx)
    student = x.sub_(log_m).mul_(q.mul_(la.exp())).masked_fill_(q_zero, 0.0)
    if p is None:  # q's buffer is free now
        p = torch.exp(y, out=torch.empty_like(y) if q_given else q)
    p_zero = p == 0  # before the scaling by β
    value = y.sub_(log_m).mul_(p.mul_(lb.exp())).masked_fill_(p_zero, 0.0)
    return value.add_(student), student


DIVERGENCE_TERMS = {"fkl": fkl_terms_, "rkl": rkl_terms_, "skl": skl_terms_, "srkl": srkl_terms_,
                    "jsd": jsd_terms_, "tvd": tvd_terms_}
# The spare block buffers each kind's function uses: ``(q and p given, not given)``.
DIVERGENCE_SPARES = {"fkl": (0, 0), "rkl": (0, 0), "tvd": (1, 1), "skl": (0, 2), "srkl": (0, 2), "jsd": (2, 3)}
# ``(log-probabilities, q, p)``: which of them each kind's forward uses when they are given.
DIVERGENCE_INPUTS = {"fkl": (True, False, True), "rkl": (True, True, False), "tvd": (False, True, True),
                     "skl": (True, True, True), "srkl": (True, True, True), "jsd": (True, True, True)}
