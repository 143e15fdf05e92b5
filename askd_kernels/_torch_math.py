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
  from bf16/fp16 fused into that one pass.
* :func:`log_softmax_into` — a block's log-probabilities and its (max, log-sum) pair through torch's
  fused log-softmax kernel; :func:`log_prob_at` — the same with ``log softmax(z/τ)[y]`` gathered;
  :func:`log_softmax_at` — log-probabilities from a given pair; :func:`softmax_into` — the
  probabilities of a given pair (the block's own or a longer row's) through the fused softmax
  kernel. The askd stages use these; the fused kernels' exp is about three times as fast as
  ``torch.exp``.
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


def shifted_fp32(rows: torch.Tensor, m: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``(rows − m)/τ`` in fp32 for a chunk of rows and their raw maxima ``m`` [rows]: the argument of
    the softmax, shifted before it is scaled (see :func:`askd_kernels._triton_math.row_logsumexp`)."""
    return shift_into(torch.empty(rows.shape, dtype=torch.float32, device=rows.device), rows, m, inv_tau)


def log_softmax_at(rows, m, s, inv_tau):
    """``log softmax(rows/τ)`` of a chunk from its (max, log-sum) pair ``m``, ``s`` [rows]."""
    return shifted_fp32(rows, m, inv_tau).sub_(s.unsqueeze(-1))


def log_softmax_into(out: torch.Tensor, rows: torch.Tensor, inv_tau: float, m: torch.Tensor = None,
                     neg_s: torch.Tensor = None) -> torch.Tensor:
    """``out`` (fp32, the block's shape, contiguous) overwritten by the block's log-probabilities
    ``(rows − m)/τ − s`` and returned; the (max, log-sum) pair is written into ``m`` and ``neg_s``
    (fp32 [rows] each, e.g. slices of the whole call's vectors) as ``m`` and ``−s`` where given.

    One call of torch's fused log-softmax kernel does the shift, the exponentials, their sum and the
    log-probabilities (its vectorised exp costs about a third of ``torch.exp``'s; both are far
    inside fp32's accuracy for a probability). The kernel forms each entry as ``(x − max) − log Σ``,
    so the row's largest log-probability is exactly ``−log Σ``: ``−s`` is read back as the row
    maximum of ``out``, and the log-probabilities equal those of :func:`log_softmax_at` from the
    pair, bit for bit. Passes over the block: the conversion into ``out`` (none for contiguous fp32
    logits, which the kernel reads in place), the max (where ``m`` is asked for), the kernel, the
    max of the result (where ``neg_s`` is). For τ ≠ 1 the block is shifted by its max and then
    scaled (two passes in ``out``) before the kernel, whose own shift is then by 0: ``(z − m)/τ``
    cannot overflow for tiny τ the way ``z/τ`` can. A NaN, a +inf or a row that is −inf everywhere
    gives a NaN row and ``s`` = NaN."""
    src = rows if rows.dtype == torch.float32 and rows.is_contiguous() else out.copy_(rows)
    if m is not None:
        torch.amax(src, -1, out=m)
    if inv_tau != 1.0:
        src = shift_into(out, src, src.amax(-1) if m is None else m, inv_tau)
    torch._log_softmax(src, -1, False, out=out)
    if neg_s is not None:
        torch.amax(out, -1, out=neg_s)
    return out


def log_prob_at(rows, labels, inv_tau):
    """``(log softmax(rows/τ)[label], (m, s), log softmax(rows/τ))`` for a block: the log-probability
    of each row's label (−inf for labels outside [0, width)), the row's (max, log-sum) pair
    ``[rows, 2]`` of :func:`askd_kernels._triton_math.row_logsumexp`, never folded into one number,
    and the block's log-probabilities (a new fp32 block), from :func:`log_softmax_into` (its passes);
    the label's entry is gathered from them."""
    x = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    m, neg_s = (torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device) for _ in range(2))
    log_softmax_into(x, rows, inv_tau, m, neg_s)
    inside = (labels >= 0) & (labels < x.shape[-1])
    x_at = x.gather(-1, torch.where(inside, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, x_at, float("-inf")), torch.stack([m, 0.0 - neg_s], dim=-1), x  # s = +0, not −0


def softmax_into(out: torch.Tensor, rows: torch.Tensor, m: torch.Tensor, inv_tau: float):
    """``(p, r)`` with ``exp((rows − m)/τ − s) = e^{−s}·p/r`` for the block's rows and any log-sum
    ``s``: the probabilities of a block from a (max, log-sum) pair (``m`` fp32 [rows, 1]) through
    torch's fused softmax kernel (its vectorised exp costs about a third of ``torch.exp``'s)
    instead of a shift, a subtraction and an exp. ``p`` is a view of ``out`` (fp32, contiguous),
    which is overwritten; ``r`` [rows, 1] is the kernel's normalisation relative to ``m``.

    The kernel normalises over the columns it is given, but the pair need not be the block's own:
    the vocabulary-parallel path passes every shard the whole row's pair, whose ``m`` may exceed the
    shard's maximum and whose ``s`` sums over every shard. So ``r`` puts the kernel's normalisation
    back to the given pair, exactly in the math: with ``x = (rows − m)/τ`` (≤ 0), the kernel's output
    is ``p = exp(x − x_max)/Σ``, and ``exp(x − s) = e^{−s}·p/r`` with ``r = e^{−x_max}/Σ``.

    * ``out`` one column wider than ``rows`` (the low-precision gradient's block buffer): the extra
      column holds ``m`` itself (τ = 1: the kernel shifts by ``m``; the block is only converted) or
      0 (τ ≠ 1: the block is shifted and scaled first), the largest entry of the row, so the kernel
      shifts by exactly the pair's max (x_max = 0) and the extra column's output is ``r = 1/Σ``
      itself. The extra column adds 1 to Σ, so with 0 ≤ s ≤ log(vocabulary) the factor
      ``c = e^{−s}/r`` lies in (0, 2]: never 0 or infinite, even where the block's own columns hold
      a negligible share of the row; a shard row that is −inf everywhere gives p = 0, as exp does.
      Passes: the conversion (τ ≠ 1: a shift and a scale), the kernel.
    * ``out`` of the block's width (fp32 logits, written into the gradient's own rows, which takes
      no buffer): ``x_max`` and ``1/Σ`` are read back as the row maxima of the kernel's input and
      output. Passes: the max, the kernel (reading contiguous fp32 logits in place at τ = 1; else
      after a shift and a scale in ``out``), the max of the result. ``r`` may overflow to +inf here
      (a shard far below the row's max: its probabilities underflow to 0); such rows, and rows
      that are −inf everywhere in the block (the kernel's 0/0), are set to p = 0 with ``r`` = +inf.

    A NaN, a +inf or a NaN ``m`` gives a NaN row, as ``exp((z − m)/τ − s)`` does."""
    width = rows.shape[1]
    if out.shape[1] == width + 1:
        p, r = out[:, :width], out[:, width:]
        if inv_tau == 1.0:
            p.copy_(rows)
            r.copy_(m)
        else:
            shift_into(p, rows, m.squeeze(1), inv_tau)
            r.zero_()
        torch._softmax(out, -1, False, out=out)
        return p, r
    if inv_tau == 1.0:
        src = rows if rows.dtype == torch.float32 and rows.is_contiguous() else out.copy_(rows)
        x_max = torch.amax(src, -1, keepdim=True).sub_(m)
    else:
        src = shift_into(out, rows, m.squeeze(1), inv_tau)
        x_max = torch.amax(src, -1, keepdim=True)
    torch._softmax(src, -1, False, out=out)
    r = torch.amax(out, -1, keepdim=True).mul_(x_max.neg_().exp_())  # x_max now holds e^{−x_max}
    empty = x_max == float("inf")  # x_max < −88: every exp((z − m)/τ − s) of the block underflows to 0
    # (or the block is −inf everywhere, m finite: the kernel's 0/0)
    if empty.any():
        out.masked_fill_(empty, 0.0)
        r.masked_fill_(empty, float("inf"))
    return out, r


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
# One function per kind, ``f(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False)``,
# that overwrites its block buffers instead of allocating temporaries: x = log q, y = log p (fp32
# [rows, V]); q, p the probabilities, or None for e^x, e^y computed here (into ``spare`` buffers of the
# block's shape where x or y is still needed, else in place; allocated when ``spare`` runs out);
# ``la``/``lb`` [rows, 1] the log weights of q and p in the mixture m. Without ``grad`` it returns the
# columns' ``(f-terms, a)`` — the row sums of the forward, and of :func:`divergence_terms` — with
# a_v = q_v·∂f/∂q_v; with ``grad = (S, scale)`` ([rows, 1] each: the row sums Σ_u a_u and g/τ) it
# returns the gradient rows ``(a_v − q_v·S)·scale`` (∂f/∂z_v by the softmax Jacobian) and skips the
# f-terms. Every buffer passed in (x, y, q, p, the spares) may be overwritten. Per element, the
# operations are those of the formulas below in the same order, so that the results do not depend on
# the buffers (bitwise the same as the same formula written with temporaries).
#
# ``exp2=True`` takes every e^t as 2^(t·log2 e) (:func:`exp_`), about 3× faster than ``torch.exp``
# here, within 2e-6 relative (the divergence CPU path); the default keeps ``torch.exp``
# (:func:`divergence_terms`, whose results are unchanged).
#
# Guards: 0·log 0 = 0 where a probability is 0 from a −inf logit, an underflow or a block's padding.
# By default they are bool masks tested "== 0", never "> 0", so that a NaN probability stays NaN.
# ``finite=True`` is for a block whose (max, log-sum) pairs and log weights are all finite (the
# divergence CPU path checks that per block, see :mod:`askd_kernels.divergence.cpu`): there every
# log-probability is finite or −inf (no NaN logit: its row's max would be NaN) and every probability
# finite, so a guarded product is NaN only as the 0·(±inf) or 0·((−inf) − (−inf)) its guard would
# zero, and is otherwise ±0 where the guard applies. The guard is then ``nan_to_num_`` (NaN → 0, ±inf
# kept): one cheap pass instead of a bool mask (an ``== 0`` into a bool tensor costs about an exp) and
# a ``masked_fill_``, with the same results, ±0 aside. (One guarded product need not be ±0: skl's a_v
# where q underflowed to 0 with x finite can be a denormal, which the mask zeroes and
# ``nan_to_num_`` keeps.)

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln 2 = 1/log2(e)
_INF = float("inf")


def exp_(t: torch.Tensor) -> torch.Tensor:
    """e^t in place, as 2^(t·log2 e): torch's vectorised ``exp2`` and a multiply take about a third of
    the time of its ``exp`` (measured 31 against 89 µs per 151936 fp32 elements, one AVX-512 core),
    at a relative error ≤ 2e-6 (the rounding of t·log2 e: |t|·2^-24 in the exponent, as the rounding
    of t itself costs a naive fp32 evaluation). e^{−inf} = 0 and NaN stays NaN. Unlike ``exp``'s, its
    vectorised loop and scalar tail can differ in the last bit: for results that do not depend on
    how rows are blocked, loop over rows of the same width (see :func:`askd_kernels.divergence.cpu._buffers`)."""
    return t.mul_(LOG2E).exp2_()


def exp_into(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:func:`exp_` of ``t`` written into ``out`` (``t`` is left unchanged)."""
    return torch.mul(t, LOG2E, out=out).exp2_()


def _exp_(t, exp2):
    return exp_(t) if exp2 else t.exp_()


def _exp_into(out, t, exp2):
    return exp_into(out, t) if exp2 else torch.exp(t, out=out)


def _zero_mask(t, finite):
    """The bool mask ``t == 0`` of a guard, or None on a ``finite`` block (see above)."""
    return None if finite else t == 0


def _guard_(t, mask):
    """``t`` with its guarded entries zeroed in place: ``masked_fill_(mask, 0)``, or where ``mask`` is
    None (a ``finite`` block) ``nan_to_num_`` with the infinities kept."""
    return t.nan_to_num_(0.0, _INF, -_INF) if mask is None else t.masked_fill_(mask, 0.0)


def _spare(spare, like):
    """The next spare buffer of ``spare`` (a list, consumed), or a new one shaped like ``like``."""
    return spare.pop() if spare else torch.empty_like(like)


def _gradient(a, q, grad):
    """``(a − q·S)·scale`` in place (into ``a``; ``q`` is overwritten)."""
    total, scale = grad
    return a.sub_(q.mul_(total)).mul_(scale)


def fkl_terms_(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False):
    """fkl, KL(p‖q): f_v = p (y − x), 0 where p = 0; a_v = −p.

    Gradient rows: (−p − q·S)·scale written as (q·(−S) − p)·scale — the same value, zeros of the
    same sign — with no f-terms, no a_v and no temporaries: q and p are e^x and e^y in place.
    Without ``grad`` q is not used."""
    if grad is not None:
        total, scale = grad
        return _exp_(x, exp2).mul_(-total).sub_(_exp_(y, exp2)).mul_(scale)
    d = torch.sub(y, x, out=x)
    p = _exp_(y, exp2) if p is None else p
    return _guard_(d.mul_(p), _zero_mask(p, finite)), p.neg_()


def rkl_terms_(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False):
    """rkl, KL(q‖p): f_v = a_v = q (x − y), 0 where q = 0 (the constant 1 of ∂f/∂q_v is dropped:
    adding c·q_v to every a_v leaves the gradient unchanged). p is not used."""
    d = torch.sub(x, y, out=y)
    q = _exp_(x, exp2) if q is None else q
    a = _guard_(d.mul_(q), _zero_mask(q, finite))
    return _gradient(a, q, grad) if grad is not None else (a, a)


def tvd_terms_(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False):
    """tvd, ½ Σ|p − q|: f_v = ½ |q − p|; a_v = ½ q·sign(q − p) + 0·(q − p) — the subgradient 0 at
    ties; sign(NaN) is 0, so the 0·(q − p) term carries a NaN probability into a_v (on a ``finite``
    block no probability is NaN and the term, ±0, is skipped). x and y are used only for q, p (e^x,
    e^y in place); one spare buffer holds the signs. No guard."""
    q = _exp_(x, exp2) if q is None else q
    p = _exp_(y, exp2) if p is None else p
    d = torch.sub(q, p, out=p)
    a = torch.sign(d, out=_spare(spare, d)).mul_(q).mul_(0.5)  # ±q·½ is ½q·(±1), bit for bit
    if grad is not None:
        return _gradient(a if finite else a.add_(d.mul_(0.0)), q, grad)
    if not finite:
        a.add_(torch.mul(d, 0.0, out=q))
    return d.abs_().mul_(0.5), a


def _probabilities(x, y, q, p, spare, exp2):
    """``(q, p)``: the given ones, or e^x, e^y into spare buffers (x, y are kept)."""
    q = _exp_into(_spare(spare, x), x, exp2) if q is None else q
    p = _exp_into(_spare(spare, y), y, exp2) if p is None else p
    return q, p


def skl_terms_(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False):
    """skl, KL(p‖m) with m = α q + (1−α) p (la = log α, lb = log(1−α)): log m = logaddexp(la + x,
    lb + y) (:func:`log_mixture`: exact at α ∈ {0, 1}, never log(p + q));
    f_v = p (y − log m), 0 where p = 0; a_v = −p·α q/m with α q/m = exp(la + x − log m), 0 where
    p = 0 or q = 0. q is used only for its guard. Two spare buffers when q, p are not given.

    Gradient rows: a_v as −exp(y + (la + x − log m)), the same p·α q/m with one exp instead of p's
    and the ratio's (exactly −p at α = 1, where la + x − log m = 0: fkl's rows bit for bit); p is
    computed only for the bool-mask guard. Two spare buffers (q, then lb + y and log m)."""
    if grad is not None:
        q = _exp_into(_spare(spare, x), x, exp2) if q is None else q
        work = _spare(spare, y)
        guard = None if finite else (q == 0) | ((_exp_into(work, y, exp2) if p is None else p) == 0)
        lx = x.add_(la)
        log_m = torch.logaddexp(lx, torch.add(y, lb, out=work), out=work)
        a = _guard_(_exp_(y.add_(lx.sub_(log_m)), exp2).neg_(), guard)
        return _gradient(a, q, grad)
    q, p = _probabilities(x, y, q, p, spare, exp2)
    p_zero = _zero_mask(p, finite)
    guard = None if finite else p_zero | (q == 0)
    lx = x.add_(la)  # y is needed for the f-terms; q only for its guard
    log_m = torch.logaddexp(lx, torch.add(y, lb, out=q), out=q)
    a = _guard_(_exp_(lx.sub_(log_m), exp2).mul_(p).neg_(), guard)
    return _guard_(y.sub_(log_m).mul_(p), p_zero), a


def srkl_terms_(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False):
    """srkl, KL(q‖m) with m = α q + (1−α) p: with log m as for skl and d = x − log m,
    f_v = q d, 0 where q = 0; a_v = q (d + (1−α) p/m), 0 where q = 0 — the full q·∂f/∂q including
    the dependence of m on q, 1 − α q/m written as (1−α) p/m = exp(lb + y − log m) (0 where p = 0)
    so that α = 1 gives exactly 0. p is used only for its guard (its buffer then holds log m). Two
    spare buffers when q, p are not given. (On a ``finite`` block a p that underflowed to 0 with y
    finite does not zero (1−α) p/m: it is the true ratio, where q = 0 a_v is 0 all the same; p, when
    not given, is then not computed: its spare buffer only holds log m.)"""
    q = _exp_into(_spare(spare, x), x, exp2) if q is None else q
    if p is None:
        p = _spare(spare, y)
        if not finite:
            _exp_into(p, y, exp2)
    p_zero, q_zero = _zero_mask(p, finite), _zero_mask(q, finite)
    log_m = torch.logaddexp(torch.add(x, la, out=p), y.add_(lb), out=p)
    skew = _exp_(y.sub_(log_m), exp2)  # ≤ 1; NaN only where y = log m = −inf, so where q = 0 too
    if p_zero is not None:  # on a finite block such a NaN is zeroed by a_v's guard
        skew.masked_fill_(p_zero, 0.0)
    d = x.sub_(log_m)
    value = None if grad is not None else _guard_(torch.mul(q, d, out=log_m), q_zero)
    a = _guard_(d.add_(skew).mul_(q), q_zero)
    return _gradient(a, q, grad) if grad is not None else (value, a)


def jsd_terms_(x, y, q, p, la, lb, spare=(), grad=None, *, exp2=False, finite=False):
    """jsd, β KL(p‖M) + (1−β) KL(q‖M) with M = (1−β) q + β p (la = log(1−β), lb = log β, 0 < β < 1):
    log M = logaddexp(la + x, lb + y); a_v = (1−β) q (x − log M), 0 where q = 0;
    f_v = β p (y − log M) (0 where p = 0) + a_v. Spare buffers: two, and one more when q is not
    given (p, when not given, is computed once q's buffer is free)."""
    q_given = q is not None
    q = q if q_given else _exp_into(_spare(spare, x), x, exp2)
    q_zero = _zero_mask(q, finite)
    lx = torch.add(x, la, out=_spare(spare, x))
    if grad is not None:  # y is needed only as lb + y, q for the gradient
        log_m = torch.logaddexp(lx, y.add_(lb), out=y)
        student = _guard_(x.sub_(log_m).mul_(torch.mul(q, la.exp(), out=lx)), q_zero)
        return _gradient(student, q, grad)
    log_m = torch.logaddexp(lx, torch.add(y, lb, out=_spare(spare, y)), out=lx)
    student = _guard_(x.sub_(log_m).mul_(q.mul_(la.exp())), q_zero)
    if p is None:  # q's buffer is free now
        p = _exp_into(torch.empty_like(y) if q_given else q, y, exp2)
    p_zero = _zero_mask(p, finite)  # before the scaling by β
    value = _guard_(y.sub_(log_m).mul_(p.mul_(lb.exp())), p_zero)
    return value.add_(student), student


DIVERGENCE_TERMS = {"fkl": fkl_terms_, "rkl": rkl_terms_, "skl": skl_terms_, "srkl": srkl_terms_,
                    "jsd": jsd_terms_, "tvd": tvd_terms_}
# The spare block buffers each kind's function uses: ``(q and p given, not given)``.
DIVERGENCE_SPARES = {"fkl": (0, 0), "rkl": (0, 0), "tvd": (1, 1), "skl": (0, 2), "srkl": (0, 2), "jsd": (2, 3)}
# ``(log-probabilities, q, p)``: which of them each kind's forward uses when they are given.
DIVERGENCE_INPUTS = {"fkl": (True, False, True), "rkl": (True, True, False), "tvd": (False, True, True),
                     "skl": (True, True, True), "srkl": (True, True, True), "jsd": (True, True, True)}
# Which buffer holds the gradient rows a kind's function returns (with ``grad``), as an index into
# ``[x, y, *spare]`` (the spares are taken from the end): the backward passes the gradient's own
# row there, so that it needs no copy (fp32 logits, blocks of one row).
DIVERGENCE_GRAD_BUFFER = {"fkl": 0, "rkl": 1, "tvd": 2, "skl": 0, "srkl": 0, "jsd": 0}
