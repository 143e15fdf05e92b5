"""The benchmark: named grids of cells, and the one pipeline that runs them — measure, derive, write.

A ``Grid`` names what to measure (ops × providers × modes × shapes × dtypes), how long to spend on it,
and, for a headline entry, the targets its numbers are held to. ``GRIDS``:

* ``gpu`` — the main job on CUDA, every op; on a machine without CUDA it runs ``cpu`` instead;
* ``askd-core`` — the headline case: forward+backward of ``askd_loss`` over 16384 tokens (B=8,
  T=2048) at Qwen2-1.5B's vocabulary in bf16 against eager and torch.compile, with its targets; on a
  machine without CUDA it runs ``askd-core-cpu``, the same case scaled down;
* ``cpu-large`` — the CPU-realistic sizes (4096 and 16384 tokens × 32000, 1024 × 151936; bf16 and
  fp32) in-process; ``python -m bench process`` runs the same sizes as whole processes
  (:func:`run_process_grid`), which is how the committed CPU comparisons are measured;
* ``tiny`` — toy shapes for the tests.

``plan_grid`` turns a grid and the command line's overrides into a ``Plan`` (the cells); ``run_grid``
runs it, one group of cells (an op × shape × dtype: every provider and mode) at a time:

1. measure — ``measure_group``: the inputs built once, then per provider ``measure_provider``: a first
   call (compilation, warm-up; the loss and a sample of the gradient kept), the timings of
   ``measure.time_modes`` and the peaks of ``measure.peak_memory_modes``;
2. derive — ``derive``: GB/s and % of the copy bandwidth from the op's traffic model
   (``ops.Op.bytes_moved``), TFLOP/s, speed-ups between providers, memory per token and against eager,
   and the differences from eager (a gross one turns the status into ``mismatch``);
3. write — ``results.append_records`` of the group to every output (the results folder's CSV,
   ``--out``), so a run that is cut short keeps what it measured.

A provider's failure is a result, never the end of the run: out-of-memory is status ``OOM``, a
provider that cannot run here ``unavailable`` (with the reason), anything else ``failed`` (with the
error); cells past the time budget are ``skipped``. ``target_lines`` holds records to their targets.
"""
from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import results as results_io
from .measure import (MODES, copy_bandwidth_gbps, free_memory, is_oom, peak_memory_modes, resolve_device, synchronize,
                      time_modes)
from .ops import DTYPES, MODELS, OPS, PROVIDERS, Op, Shape, Unavailable, resolve_ops

GRAD_SAMPLE_ROWS = 64  # rows of the first leaf's gradient kept to compare providers with eager


@dataclass(frozen=True)
class Target:
    """A bound on one column of ours' records of one op and mode (every shape and dtype of the run)."""
    label: str
    column: str  # a column of results.FIELDS
    mode: str
    bound: float
    at_least: bool = True  # False: at most
    unit: str = ""
    op: str = "askd_loss"


# The headline case's targets, set for CUDA.
ASKD_CORE_TARGETS = (
    Target("% of copy bandwidth", "pct_of_copy", "full", 80.0, unit="%"),  # of the copy measured in the run
    Target("speed-up vs eager", "speedup_vs_eager", "full", 3.5, unit="x"),
    Target("speed-up vs compile", "speedup_vs_compile", "full", 1.25, unit="x"),
    Target("extra bytes per token", "peak_bytes_per_token", "forward", 64.0, at_least=False),
)


@dataclass(frozen=True)
class Grid:
    """A named set of cells. ``shapes`` are (model, tokens) pairs, tokens = batch × seq (a model is a
    key of ``ops.MODELS`` or ``V<vocab>``); ``op_shapes`` overrides them per op function; ``hidden``
    overrides the models' hidden size; ``on_cpu`` names the grid run instead where there is no CUDA."""
    name: str
    description: str
    providers: tuple[str, ...]
    dtypes: tuple[str, ...]
    batch: int
    shapes: tuple[tuple[str, int], ...]
    ops: tuple[str, ...] = tuple(OPS)  # op ids or aliases
    op_shapes: dict = field(default_factory=dict)
    hidden: int | None = None
    rep_ms: float = 100.0
    budget_s: float | None = None
    modes: tuple[str, ...] = MODES
    threads: int | None = None  # CPU threads for the run (None: torch's default)
    targets: tuple[Target, ...] = ()
    on_cpu: str | None = None


GRIDS = {
    # ~5 minutes of measurement on an H100 (plus one torch.compile per op); gpu_run.sh passes a
    # budget so that the whole device call stays within 10 minutes.
    "gpu": Grid(
        "gpu", "tokens 1k-32k at Qwen2's vocabulary, and the three vocabularies at 16k tokens; bf16",
        providers=("ours", "eager", "compile", "liger"), dtypes=("bf16",), batch=8,
        shapes=(("qwen2", 1024), ("qwen2", 4096), ("qwen2", 16384), ("llama3", 16384), ("gemma2", 16384),
                ("qwen2", 32768)),
        rep_ms=100.0, on_cpu="cpu"),
    # `python -m bench` on a CPU: the CPU path against the eager reference in < 3 minutes on 2 cores.
    # Real vocabularies, few tokens; askd_loss (cheaper per element) gets more tokens; hidden size
    # 256 for from_hidden (a CPU-sized head). One thread: on a shared machine, two OpenMP threads
    # stall at every op's barrier whenever another process holds a core (7-20x slower, bimodal).
    "cpu": Grid(
        "cpu", "the real vocabularies with a few tokens; fp32; one thread",
        providers=("ours", "eager"), dtypes=("fp32",), batch=2,
        shapes=(("qwen2", 4), ("qwen2", 16), ("llama3", 16), ("gemma2", 16), ("qwen2", 64)),
        op_shapes={"askd_loss": (("qwen2", 16), ("qwen2", 64), ("llama3", 64), ("gemma2", 64), ("qwen2", 256))},
        hidden=256, rep_ms=20.0, budget_s=150.0, threads=1),
    # The CPU-realistic sizes in-process (the same as `python -m bench process`, which times whole
    # processes): 4096 and 16384 tokens at V = 32000 and 1024 tokens at Qwen2's vocabulary, bf16 and
    # fp32, against eager and torch.compile; torch's threads (set --threads 1 or 2). 16384 × 32000
    # fp32 logits are 2 GB each: eager needs ~12 GB there.
    "cpu-large": Grid(
        "cpu-large", "CPU-realistic sizes: 4096/16384 tokens x V=32000 and 1024 x 151936; bf16, fp32",
        providers=("ours", "eager", "compile"), dtypes=("bf16", "fp32"), batch=8,
        shapes=(("V32000", 4096), ("qwen2", 1024), ("V32000", 16384)), hidden=1024, rep_ms=2000.0),
    # The headline case (estimator exact, mixed TGO/SGO batch, reduction mean), needs a GPU.
    "askd-core": Grid(
        "askd-core", "the headline case: askd_loss, B=8 T=2048 (N=16384) at Qwen2-1.5B's vocabulary, bf16",
        ops=("askd_loss",), providers=("ours", "eager", "compile"), dtypes=("bf16",), batch=8,
        shapes=(("qwen2", 16384),), rep_ms=500.0, targets=ASKD_CORE_TARGETS, on_cpu="askd-core-cpu"),
    # Its stand-in on a CPU: every provider, torch.compile included, in well under a minute on 2 cores.
    "askd-core-cpu": Grid(
        "askd-core-cpu", "the headline case scaled to a CPU: askd_loss, B=2 T=128, V=8192, fp32; one thread",
        ops=("askd_loss",), providers=("ours", "eager", "compile"), dtypes=("fp32",), batch=2,
        shapes=(("V8192", 256),), rep_ms=200.0, threads=1, targets=ASKD_CORE_TARGETS),
    # the tests' grid: seconds
    "tiny": Grid(
        "tiny", "toy vocabularies (tests)", providers=("ours", "eager"), dtypes=("fp32",), batch=2,
        shapes=(("toy256", 8), ("toy256", 16), ("toy512", 8)), rep_ms=2.0, threads=1),
}


def resolve_grid(name: str, device: torch.device) -> Grid:
    """``auto`` is ``gpu``; a grid with an ``on_cpu`` stand-in runs that one where there is no CUDA."""
    grid = GRIDS.get("gpu" if name == "auto" else name)
    if grid is None:
        raise ValueError(f"grid: unknown {name!r}; known: {sorted(GRIDS)}")
    if device.type != "cuda" and grid.on_cpu:
        grid = GRIDS[grid.on_cpu]
    return grid


def grid_shapes(grid: Grid, op: Op, *, batch: int | None = None, models=None, tokens=None, vocabs=None) -> list[Shape]:
    """The op's shapes: the grid's, or the cross product of the models (or custom vocabularies) and
    token counts given."""
    b = batch or grid.batch
    if models or tokens or vocabs:
        counts = tokens or sorted({n for _, n in grid.shapes})
        pairs = [(m, n) for m in (models or []) for n in counts]
        pairs += [(f"V{v}", n) for v in (vocabs or []) for n in counts]
        if not pairs:  # only tokens given: the grid's models
            pairs = [(m, n) for m in dict.fromkeys(m for m, _ in grid.shapes) for n in tokens]
    else:
        pairs = list(grid.op_shapes.get(op.function, grid.shapes))
    shapes = []
    for model, n in pairs:
        if model.startswith("V") and model[1:].isdigit():
            vocab, hidden = int(model[1:]), 1024
        elif model in MODELS:
            vocab, hidden = MODELS[model].vocab, MODELS[model].hidden
        else:
            raise ValueError(f"models: unknown {model!r}; known: {sorted(MODELS)} or V<vocab>")
        if n <= 0 or n % b:
            raise ValueError(f"tokens: {n} must be a positive multiple of batch={b}")
        shapes.append(Shape(model, b, n // b, vocab, grid.hidden or hidden))
    return shapes


@dataclass
class Plan:
    grid: Grid
    device: torch.device
    ops: list[Op]
    shapes: dict[str, list[Shape]]  # op id -> shapes
    providers: list[str]
    modes: list[str]
    dtypes: list[str]

    def cells(self) -> int:
        return sum(len(self.shapes[op.id]) for op in self.ops) * len(self.dtypes) * len(self.providers)

    def order(self) -> list[tuple[Op, str, Shape]]:
        """(op, dtype, shape) in rounds: every op's smallest shape, then every op's next, ... (shapes
        sorted by tokens x vocabulary), so torch.compile compiles each op early and a time budget
        cuts the largest shapes."""
        out = []
        for dtype in self.dtypes:
            for i in range(max((len(self.shapes[op.id]) for op in self.ops), default=0)):
                out += [(op, dtype, self.shapes[op.id][i]) for op in self.ops if i < len(self.shapes[op.id])]
        return out

    def describe(self) -> str:
        lines = [f"grid {self.grid.name} on {self.device.type}: {self.grid.description}",
                 f"  providers {','.join(self.providers)} | modes {','.join(self.modes)} | dtypes "
                 f"{','.join(self.dtypes)} | {self.cells()} cells (op x shape x dtype x provider)"]
        for op in self.ops:
            shapes = ", ".join(f"{s.model}:{s.tokens}" for s in self.shapes[op.id])
            lines.append(f"  {op.id}: {shapes} (batch {self.shapes[op.id][0].batch})")
        for t in self.grid.targets:
            bound = f"{'>=' if t.at_least else '<='} {t.bound:g}{t.unit}"
            lines.append(f"  target: {t.op} ours {t.mode}, {t.label} {bound}")
        return "\n".join(lines)


def _known(what: str, values: list[str], known) -> list[str]:
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"{what}: unknown {unknown}; known: {list(known)}")
    return values


def plan_grid(grid: str | Grid = "auto", *, device: str = "auto", ops=None, providers=None, modes=None,
              dtypes=None, batch=None, models=None, tokens=None, vocabs=None) -> Plan:
    """The cells of ``grid`` (a name of ``GRIDS``, or ``auto``) on ``device``, with any of its axes overridden."""
    dev = resolve_device(device)
    if isinstance(grid, str):
        grid = resolve_grid(grid, dev)
    chosen = resolve_ops(ops or grid.ops)
    shapes = {op.id: sorted(grid_shapes(grid, op, batch=batch, models=models, tokens=tokens, vocabs=vocabs),
                            key=lambda s: (s.tokens * s.vocab, s.tokens))
              for op in chosen}
    return Plan(grid, dev, chosen, shapes, providers=_known("providers", list(providers or grid.providers), PROVIDERS),
                modes=_known("modes", list(modes or grid.modes), MODES),
                dtypes=_known("dtypes", list(dtypes or grid.dtypes), DTYPES))


# ----------------------------------------------------------------------------------------------
# the run: measure -> derive -> write, one group of cells at a time


def run_grid(plan: Plan, *, rep_ms: float | None = None, budget_s: float | None = None, seed: int = 0,
             ignore_frac: float = 0.0, outputs=(), progress: bool = True, threads: int | None = None,
             log: Callable[[str], None] | None = print) -> list[dict]:
    """Measure every cell of ``plan``; append each group's records to every path of ``outputs``
    (CSV or JSON lines, see ``results.append_records``) as soon as it is measured; return them all.

    ``budget_s`` bounds the measuring time (default: the grid's; None or 0: no bound): the cells run
    in rounds (see ``Plan.order``), and those that would start past the budget are recorded as
    ``skipped``, so a short budget loses the largest shapes of every op rather than whole ops.
    ``threads``: CPU threads (default: the grid's), restored afterwards.
    """
    rep_ms = plan.grid.rep_ms if rep_ms is None else rep_ms
    if rep_ms <= 0:
        raise ValueError(f"rep_ms: {rep_ms} must be positive")
    if not 0.0 <= ignore_frac < 1.0:
        raise ValueError(f"ignore_frac: {ignore_frac} must be in [0, 1)")
    budget_s = plan.grid.budget_s if budget_s is None else budget_s
    threads = plan.grid.threads if threads is None else threads
    saved_threads = torch.get_num_threads()
    if plan.device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    run = None
    try:
        run = _start(plan, rep_ms=rep_ms, seed=seed, ignore_frac=ignore_frac, progress=progress, log=log)
        deadline = run.start + budget_s if budget_s and budget_s > 0 else None
        if deadline:
            run.say(f"  time budget {budget_s:.0f} s: cells past it are recorded as skipped")
        records: list[dict] = []
        for op, dtype, shape in plan.order():
            past_budget = deadline is not None and time.perf_counter() > deadline
            group, samples = measure_group(run, op, dtype, shape, skip=past_budget)  # 1. measure
            derive(group, samples)  # 2. derive
            for path in outputs:  # 3. write
                results_io.append_records(path, group)
            records.extend(group)
    finally:
        if run is not None:
            run.bar.close()
        torch.set_num_threads(saved_threads)
    run.say(f"measured {len(records)} records in {time.perf_counter() - run.start:.0f} s")
    return records


@dataclass
class _Run:
    """What every group of one run shares."""
    plan: Plan
    rep_ms: float
    seed: int
    ignore_frac: float
    common: dict  # the columns every record of the run carries: run id, grid, environment, copy bandwidth
    bar: _Progress
    say: Callable[[str], None]
    start: float  # time.perf_counter() at the start


def _start(plan: Plan, *, rep_ms: float, seed: int, ignore_frac: float, progress: bool, log) -> _Run:
    """The run's id, environment and copy bandwidth (the roofline's reference), announced through ``log``."""
    say = log or (lambda _s: None)
    if "compile" in plan.providers:
        from torch._dynamo import config

        # one compiled graph per op (dynamic shapes), but leave room for recompiles (dtypes, specialisations)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(64, getattr(config, name)))
    dev = plan.device
    env = results_io.environment(dev)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    start = time.perf_counter()
    copy_gbps = copy_bandwidth_gbps(dev, (1 << 30) if dev.type == "cuda" else (64 << 20), rep_ms=max(rep_ms, 50.0))
    say(plan.describe())
    say(f"  device {env['device_name']} ({env['threads']} threads) | torch {env['torch']} | triton "
        f"{env['triton']} | commit {env['git_commit']} | copy bandwidth {copy_gbps:.1f} GB/s | run {run_id}")
    common = dict(run_id=run_id, grid=plan.grid.name, ignore_frac=ignore_frac, copy_gbps=copy_gbps, **env)
    return _Run(plan, rep_ms, seed, ignore_frac, common, _Progress(plan.cells(), say, progress), say, start)


class _Progress:
    """tqdm on a terminal; one line per cell otherwise (logs of non-interactive runs)."""

    def __init__(self, total: int, log: Callable[[str], None] | None, enabled: bool):
        self.total, self.done, self.log = total, 0, log
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text, refresh=True)

    def advance(self, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.log is not None:
            self.log(f"[{self.done}/{self.total}] {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# 1. measure


def _error_text(stage: str, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{stage}: {type(error).__name__}: {lines[0][:200] if lines else ''}"


def measure_group(run: _Run, op: Op, dtype: str, shape: Shape, *, skip: bool = False) -> tuple[list[dict], dict]:
    """One record per provider × mode of one op, shape and dtype, with the measured columns (and the
    traffic model's bytes and FLOPs), and each provider's gradient sample. The inputs are built once;
    a group that starts runs every provider, so that speed-ups compare providers of the same run."""
    plan, dev = run.plan, run.plan.device
    torch_dtype = DTYPES[dtype]
    where = f"{op.id} {shape.model} N={shape.tokens} V={shape.vocab} {dtype}"
    case, failure = None, ("skipped", "time budget exhausted") if skip else None
    if failure is None:
        try:
            run.bar.describe(f"{where}: inputs")
            case = op.make_case(shape, torch_dtype, dev, seed=run.seed, ignore_frac=run.ignore_frac)
        except Exception as error:  # noqa: BLE001
            failure = ("OOM" if is_oom(error) else "failed", _error_text("inputs", error))
            error = None
            free_memory(dev, collect=True)
    measured, samples = {}, {}
    for provider in plan.providers:
        if failure is not None:
            measured[provider], samples[provider] = {"status": failure[0], "error": failure[1]}, None
        else:
            run.bar.describe(f"{where}: {provider}")
            measured[provider], samples[provider] = measure_provider(op, provider, case, dev, modes=plan.modes,
                                                                     rep_ms=run.rep_ms)
        rec = measured[provider]
        p50 = rec.get("time", {}).get("full", [None] * 3)[1]
        run.bar.advance(f"{where} {provider}: {rec['status']}" + (f" full p50 {p50:.3f} ms" if p50 else "")
                        + (f" ({rec['error']})" if rec.get("error") and rec["status"] != "ok" else ""))
    del case
    free_memory(dev, collect=False)

    elt = torch.empty((), dtype=torch_dtype).element_size()
    base = dict(run.common, op=op.function, kind=op.kind or "", model=shape.model, batch=shape.batch, seq=shape.seq,
                tokens=shape.tokens, vocab=shape.vocab, hidden=shape.hidden if op.family == "hidden" else None,
                dtype=dtype)
    group = []
    for provider, rec in measured.items():
        for mode in plan.modes:
            row = {**dict.fromkeys(results_io.FIELDS), **base}
            row.update(provider=provider, mode=mode, status=rec["status"], error=rec.get("error"),
                       first_call_s=rec.get("first_call_s"), loss=rec.get("loss"), reps=rec.get("reps"),
                       bytes_moved=op.bytes_moved(shape, elt, mode), flops=op.flops(shape, mode),
                       peak_bytes=rec.get("peak", {}).get(mode))
            row["time_ms_p20"], row["time_ms_p50"], row["time_ms_p80"] = rec.get("time", {}).get(mode, (None,) * 3)
            group.append(row)
    return group, samples


def _grad_sample(leaf: torch.Tensor) -> torch.Tensor | None:
    if leaf.grad is None:
        return None
    grad = leaf.grad.reshape(-1, leaf.shape[-1])
    rows = torch.linspace(0, grad.shape[0] - 1, min(GRAD_SAMPLE_ROWS, grad.shape[0]), device=grad.device).long()
    return grad[rows].float().cpu()


def measure_provider(op: Op, provider: str, case, device: torch.device, *, modes=MODES, rep_ms: float = 100.0,
                     min_reps: int = 3) -> tuple[dict, torch.Tensor | None]:
    """Status, first-call time, loss, timings and peaks of one provider; never raises (but for
    KeyboardInterrupt). Returns ({status, error, first_call_s, loss, time: {mode: [p20, p50, p80]},
    reps, peak: {mode: bytes}}, sample of the first leaf's gradient)."""
    rec: dict = {"status": "ok", "error": None, "time": {}, "peak": {}}
    sample = None
    stage = "set-up"
    leaves = case.leaves

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    try:
        loss_fn = op.loss_fn(provider, device)

        def forward() -> torch.Tensor:
            return loss_fn(case)

        stage = "first call"
        clear()
        start = time.perf_counter()
        loss = forward()
        loss.backward()
        synchronize(device)
        rec["first_call_s"] = time.perf_counter() - start
        rec["loss"] = float(loss.detach().float().item())
        sample = _grad_sample(leaves[0])
        del loss
        clear()

        stage = "timing"
        rec["time"], rec["reps"] = time_modes(forward, device, leaves=leaves, modes=modes, rep_ms=rep_ms,
                                              min_reps=min_reps)
        stage = "memory"
        clear()
        rec["peak"] = peak_memory_modes(forward, device)
    except Unavailable as error:
        rec.update(status="unavailable", error=str(error))
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        rec["status"] = "OOM" if is_oom(error) else "failed"
        rec["error"] = _error_text(stage, error)
        error = None  # drop the traceback (and the tensors its frames hold) before freeing memory
    finally:
        clear()
        free_memory(device, collect=rec["status"] not in ("ok", "unavailable"))
    return rec, sample


# ----------------------------------------------------------------------------------------------
# 2. derive


def _mismatch(rec: dict) -> str | None:
    """A gross disagreement with eager (a wrong formula or convention, not rounding)."""
    tol = 1e-3 if rec["dtype"] == "fp32" else 3e-2
    if rec.get("loss_reldiff_vs_eager") is not None and rec["loss_reldiff_vs_eager"] > tol:
        return f"loss differs from eager by {rec['loss_reldiff_vs_eager']:.2e} (relative)"
    if rec.get("grad_reldiff_vs_eager") is not None and rec["grad_reldiff_vs_eager"] > 10 * tol:
        return f"gradient differs from eager by {rec['grad_reldiff_vs_eager']:.2e} (relative to its max)"
    return None


def derive(group: list[dict], samples: dict) -> None:
    """Fill in, in place, the derived columns of one group (one op, shape and dtype): GB/s and % of the
    run's copy bandwidth, TFLOP/s, speed-ups against every provider of the same mode, per-token memory
    and the memory ratio to eager, and the differences from eager (``samples``: provider -> gradient
    sample); a gross difference is status ``mismatch``."""
    by_mode: dict[str, dict[str, dict]] = {}
    for r in group:
        by_mode.setdefault(r["mode"], {})[r["provider"]] = r
    eager_grad = samples.get("eager")
    for r in group:
        p50 = r.get("time_ms_p50")
        peers = by_mode[r["mode"]]
        eager = peers.get("eager", {})
        if p50:
            r["gbps"] = r["bytes_moved"] / (p50 * 1e-3) / 1e9
            if r.get("copy_gbps"):
                r["pct_of_copy"] = 100.0 * r["gbps"] / r["copy_gbps"]
            if r.get("flops"):
                r["tflops"] = r["flops"] / (p50 * 1e-3) / 1e12
            for other in PROVIDERS:
                other_p50 = peers.get(other, {}).get("time_ms_p50")
                if other_p50:
                    r[f"speedup_vs_{other}"] = other_p50 / p50  # > 1: this provider is faster
        if r.get("peak_bytes") is not None:
            r["peak_bytes_per_token"] = r["peak_bytes"] / r["tokens"]
            if eager.get("peak_bytes"):
                r["mem_ratio_vs_eager"] = r["peak_bytes"] / eager["peak_bytes"]
        if r.get("loss") is not None and eager.get("loss") is not None:
            # relative, but a loss near 0 is compared on the scale 0.01
            r["loss_reldiff_vs_eager"] = abs(r["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-2)
        grad = samples.get(r["provider"])
        if grad is not None and eager_grad is not None and grad.shape == eager_grad.shape:
            scale = eager_grad.abs().max().item() or 1.0
            r["grad_reldiff_vs_eager"] = (grad - eager_grad).abs().max().item() / scale
        if r["status"] == "ok":
            problem = _mismatch(r)
            if problem:
                r["status"], r["error"] = "mismatch", problem


def target_lines(records: list[dict], targets: tuple[Target, ...]) -> list[str]:
    """One line per target and shape/dtype of ``records``: ours' value, the bound, ok or MISS."""
    lines = []
    for t in targets:
        rows = [r for r in records if r["provider"] == "ours" and r["op"] == t.op and r["mode"] == t.mode]
        if not rows:
            lines.append(f"{t.op}, {t.mode}: {t.label} n/a (no record of ours)")
        for r in rows:
            value = r.get(t.column)
            where = f"{t.op} N={r['tokens']} V={r['vocab']} {r['dtype']}, {t.mode}"
            if value is None:
                lines.append(f"{where}: {t.label} n/a (ours: {r['status']})")
                continue
            ok = value >= t.bound if t.at_least else value <= t.bound
            lines.append(f"{where}: {t.label} {value:.2f}{t.unit} (target {'>=' if t.at_least else '<='} "
                         f"{t.bound:g}{t.unit}) {'ok' if ok else 'MISS'}")
    return lines


# ----------------------------------------------------------------------------------------------
# whole processes on CPU: `python -m bench process`

# The CPU-realistic sizes of the process grid: (tokens, vocabulary). 4096 = B 8 × T 512.
PROCESS_SHAPES = ((4096, 32000), (16384, 32000), (1024, 151936))
PROCESS_FIELDS = ("run_id", "op", "provider", "batch", "tokens", "vocab", "hidden", "dtype", "threads", "rep",
                  "steps", "status", "error", "process_s", "first_step_s", "steady_step_s", "peak_rss_kib",
                  "rss_inputs_kib", "loss", "device_name", "torch", "python", "git_commit", "date")


def process_cells(ops, shapes=PROCESS_SHAPES, dtypes=("bf16", "fp32"), threads=(2, 1), batch=8, hidden=None):
    """The cells (one dict each: op, tokens, vocab, dtype, threads, batch) of a process run."""
    cells = []
    for n_threads in threads:
        for dtype in dtypes:
            for tokens, vocab in shapes:
                for op in resolve_ops(ops):
                    cell = dict(op=op.id, batch=batch, tokens=tokens, vocab=vocab, dtype=dtype, threads=n_threads)
                    if op.family == "hidden":
                        cell["hidden"] = hidden or 1024
                    cells.append(cell)
    return cells


def run_process_grid(cells, providers=("ours", "eager"), *, reps=3, steps=3, out=None, log=print) -> list[dict]:
    """Every cell × provider as whole processes (``measure.run_process``), ``reps`` rounds,
    interleaved: each round runs every provider of a cell back to back, in an order rotated from
    round to round, so that the load of a shared machine falls on all of them alike. Records are
    appended to ``out`` (CSV) as they come; returns them all."""
    import csv
    import os as _os

    from .measure import run_process

    env = results_io.environment(torch.device("cpu"))
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    records = []
    for cell in cells:
        for rep in range(reps):
            order = list(providers[rep % len(providers):]) + list(providers[:rep % len(providers)])
            for provider in order:
                rec = run_process({**cell, "provider": provider, "steps": steps})
                rec.update(run_id=run_id, rep=rep, device_name=env["device_name"], python=env["python"],
                           git_commit=env["git_commit"], date=env["date"])
                rec.setdefault("torch", env["torch"])
                records.append(rec)
                if log:
                    peak = rec.get("peak_rss_kib")
                    log(f"{cell['op']} N={cell['tokens']} V={cell['vocab']} {cell['dtype']} t={cell['threads']} "
                        f"{provider:7s} rep {rep}: {rec['status']} process {rec.get('process_s') or 0:.2f} s, "
                        f"steady step {rec.get('steady_step_s') or 0:.3f} s, peak "
                        f"{(peak or 0) / 1024:.0f} MiB")
                if out:
                    new = not _os.path.exists(out)
                    with open(out, "a", newline="") as f:
                        writer = csv.DictWriter(f, PROCESS_FIELDS, extrasaction="ignore")
                        if new:
                            writer.writeheader()
                        writer.writerow(rec)
    return records


def _median(values):
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def process_summary(records) -> list[dict]:
    """Per cell and provider: medians over the rounds of the whole-process time, the steady step and
    the peak resident memory, and their ratios to eager's (and the steady step's to compile's) of
    the same run — one row each."""
    def num(rec, key):
        value = rec.get(key)
        return None if value in (None, "") else float(value)

    groups: dict = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        key = (r["run_id"], r["op"], int(r["tokens"]), int(r["vocab"]), r["dtype"], int(r["threads"]))
        groups.setdefault(key, {}).setdefault(r["provider"], []).append(r)
    rows = []
    for key, by_provider in groups.items():
        med = {p: {k: _median([num(r, k) for r in rs]) for k in ("process_s", "steady_step_s", "first_step_s",
                                                                  "peak_rss_kib", "rss_inputs_kib")}
               for p, rs in by_provider.items()}
        for provider, m in med.items():
            row = dict(zip(("run_id", "op", "tokens", "vocab", "dtype", "threads"), key), provider=provider,
                       runs=len(by_provider[provider]), **m)
            for base in ("eager", "compile"):
                b = med.get(base)
                if b is None:
                    continue
                for k, name in (("process_s", "process"), ("steady_step_s", "step"), ("peak_rss_kib", "peak")):
                    if m[k] and b[k]:
                        row[f"{name}_vs_{base}"] = m[k] / b[k]
            rows.append(row)
    return rows


def process_markdown(records) -> str:
    """The process run as a markdown table (medians; ratios < 1 favour the provider)."""
    rows = process_summary(records)
    lines = ["| op | N × V | dtype | threads | provider | runs | process s | steady step s | peak MiB | "
             "process / eager | step / eager | peak / eager | step / compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    for r in rows:
        lines.append(f"| {r['op']} | {r['tokens']} × {r['vocab']} | {r['dtype']} | {r['threads']} | {r['provider']} | "
                     f"{r['runs']} | {f(r['process_s'])} | {f(r['steady_step_s'], '.3f')} | "
                     f"{f(r['peak_rss_kib'] and r['peak_rss_kib'] / 1024, '.0f')} | {f(r.get('process_vs_eager'))} | "
                     f"{f(r.get('step_vs_eager'))} | {f(r.get('peak_vs_eager'))} | {f(r.get('step_vs_compile'))} |")
    return "\n".join(lines)


def read_process_records(path) -> list[dict]:
    """The records of a process CSV (every run in it)."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def process_report(records, notes: str = "") -> str:
    """``process.md``: every run of a process CSV — its environment (device, versions, threads,
    commit, date) and its table of medians and ratios (:func:`process_markdown`). ``notes``
    (markdown: the machine, its load, what a ``-dirty`` commit held) goes after the introduction."""
    runs: dict = {}
    for r in records:
        runs.setdefault(r["run_id"], []).append(r)
    out = ["# Whole-process CPU benchmark (`python -m bench process`)", "",
           "Each cell × provider ran in a fresh process; rounds interleaved (providers back to back, order "
           "rotated); medians over the rounds; ratios are to eager's (and compile's) medians of the same run "
           "(< 1 favours the provider). *process s*: the whole process by wall clock (interpreter start, "
           "imports, inputs, every step, exit); *steady step s*: the median forward+backward after the first "
           "(compilation included in the first); *peak MiB*: the process's peak resident memory (VmHWM), "
           "torch and the inputs included. Generated from `process.csv`; regenerate with "
           "`python -m bench process --report bench/results/cpu/<device>/process.csv` (the notes come from "
           "`process-notes.md` next to it).", ""]
    if notes.strip():
        out += [notes.strip(), ""]
    for run_id, rs in runs.items():
        r0 = rs[0]
        threads = sorted({r["threads"] for r in rs})
        out += [f"## Run `{run_id}`", "",
                f"{r0.get('device_name')}, torch {r0.get('torch')}, Python {r0.get('python')}, torch threads "
                f"{', '.join(threads)}, commit `{r0.get('git_commit')}`, {r0.get('date')}; "
                f"{len(rs)} processes ({sum(r['status'] != 'ok' for r in rs)} not ok).", "",
                process_markdown(rs), ""]
    return "\n".join(out)
