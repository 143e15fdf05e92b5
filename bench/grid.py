"""The benchmark grid: ops × providers × modes × shapes × dtypes, with a progress bar and a time budget.

``run_grid(...)`` measures every cell and returns one record per op × provider × mode × shape ×
dtype (see ``results.GRID_FIELDS``), appending them to the results folder as it goes (a run that is
cut short keeps what it measured). Per op, shape and dtype the inputs are built once; then each
provider runs a first call (compilation, warm-up, and the loss and gradient cross-checked against
eager), the timings of ``measure.time_modes`` and the peak memory of ``measure.peak_memory_modes``.
A provider's failure is a result, never the end of the run: out-of-memory is status ``OOM``, a
provider that cannot run here ``unavailable`` (with the reason), anything else ``failed`` (with the
error); a provider whose loss or gradient disagrees grossly with eager is ``mismatch``; cells past
the time budget are ``skipped``.
"""
from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import results as results_io
from .measure import (MODES, copy_bandwidth_gbps, free_memory, is_oom, peak_memory_modes, resolve_device, synchronize,
                      time_modes)
from .ops import DTYPES, MODELS, OPS, PROVIDERS, Op, Shape, Unavailable, resolve_ops

GRAD_SAMPLE_ROWS = 64  # rows of the first leaf's gradient kept to compare providers with eager


@dataclass(frozen=True)
class Grid:
    """A named set of cells. ``shapes`` are (model, tokens) pairs, tokens = batch × seq;
    ``op_shapes`` overrides them per op function; ``hidden`` overrides the models' hidden size."""
    name: str
    description: str
    providers: tuple[str, ...]
    dtypes: tuple[str, ...]
    batch: int
    shapes: tuple[tuple[str, int], ...]
    op_shapes: dict = field(default_factory=dict)
    hidden: int | None = None
    rep_ms: float = 100.0
    budget_s: float | None = None
    modes: tuple[str, ...] = MODES
    threads: int | None = None  # CPU threads for the run (None: torch's default)


GRIDS = {
    # ~5 minutes of measurement on an H100 (plus one torch.compile per op); gpu_run.sh passes a
    # budget so that the whole device call stays within 10 minutes.
    "gpu": Grid(
        "gpu", "tokens 1k-32k at Qwen2's vocabulary, and the three vocabularies at 16k tokens; bf16",
        providers=("ours", "eager", "compile", "liger"), dtypes=("bf16",), batch=8,
        shapes=(("qwen2", 1024), ("qwen2", 4096), ("qwen2", 16384), ("llama3", 16384), ("gemma2", 16384),
                ("qwen2", 32768)),
        rep_ms=100.0),
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
    # the tests' grid: seconds
    "tiny": Grid(
        "tiny", "toy vocabularies (tests)", providers=("ours", "eager"), dtypes=("fp32",), batch=2,
        shapes=(("toy256", 8), ("toy256", 16), ("toy512", 8)), rep_ms=2.0, threads=1),
}


def grid_shapes(grid: Grid, op: Op, *, batch: int | None = None, models: Iterable[str] | None = None,
                tokens: Iterable[int] | None = None, vocabs: Iterable[int] | None = None) -> list[Shape]:
    """The op's shapes: the grid's, or the cross product of the models (or custom vocabularies) and
    token counts given."""
    b = batch or grid.batch
    if models or tokens or vocabs:
        pairs = [(m, n) for m in (models or []) for n in (tokens or sorted({n for _, n in grid.shapes}))]
        pairs += [(f"V{v}", n) for v in (vocabs or []) for n in (tokens or sorted({n for _, n in grid.shapes}))]
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
            raise ValueError(f"models: unknown {model!r}; known: {sorted(MODELS)}")
        if n <= 0 or n % b:
            raise ValueError(f"tokens: {n} must be a positive multiple of batch={b}")
        shapes.append(Shape(model, b, n // b, vocab, grid.hidden or hidden))
    return shapes


# ----------------------------------------------------------------------------------------------
# progress


class _Progress:
    """tqdm on a terminal; one line per op/shape otherwise (logs of non-interactive runs)."""

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
# one provider on one case


def _grad_sample(leaf: torch.Tensor) -> torch.Tensor | None:
    if leaf.grad is None:
        return None
    grad = leaf.grad.reshape(-1, leaf.shape[-1])
    rows = torch.linspace(0, grad.shape[0] - 1, min(GRAD_SAMPLE_ROWS, grad.shape[0]), device=grad.device).long()
    return grad[rows].float().cpu()


def _error_text(stage: str, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{stage}: {type(error).__name__}: {lines[0][:200] if lines else ''}"


def measure_provider(op: Op, provider: str, case, device: torch.device, *, modes=MODES, rep_ms: float = 100.0,
                     min_reps: int = 3) -> tuple[dict, torch.Tensor | None]:
    """Status, first-call time, loss, timings and peaks of one provider; never raises (but for
    KeyboardInterrupt). Returns (partial record with per-mode ``time``/``peak`` dicts, gradient sample)."""
    rec: dict = {"provider": provider, "status": "ok", "error": None, "time": {}, "peak": {}}
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
# derived numbers


def _mismatch(rec: dict, dtype: str) -> str | None:
    """A gross disagreement with eager (a wrong formula or convention, not rounding)."""
    tol = 1e-3 if dtype == "fp32" else 3e-2
    if rec.get("loss_reldiff_vs_eager") is not None and rec["loss_reldiff_vs_eager"] > tol:
        return f"loss differs from eager by {rec['loss_reldiff_vs_eager']:.2e} (relative)"
    if rec.get("grad_reldiff_vs_eager") is not None and rec["grad_reldiff_vs_eager"] > 10 * tol:
        return f"gradient differs from eager by {rec['grad_reldiff_vs_eager']:.2e} (relative to its max)"
    return None


def derive(group: list[dict], samples: dict, copy_gbps: float | None) -> None:
    """Fill in GB/s, % of copy, TFLOP/s, per-token memory, speed-ups against every provider of the
    same op/shape/dtype/mode, the memory ratio to eager and the differences from eager, in place."""
    by_mode: dict[str, dict[str, dict]] = {}
    for r in group:
        by_mode.setdefault(r["mode"], {})[r["provider"]] = r
    eager_grad = samples.get("eager")
    for r in group:
        p50 = r.get("time_ms_p50")
        peers = by_mode[r["mode"]]
        if p50:
            r["gbps"] = r["bytes_moved"] / (p50 * 1e-3) / 1e9
            if copy_gbps:
                r["pct_of_copy"] = 100.0 * r["gbps"] / copy_gbps
            if r.get("flops"):
                r["tflops"] = r["flops"] / (p50 * 1e-3) / 1e12
            for other in PROVIDERS:
                other_p50 = peers.get(other, {}).get("time_ms_p50")
                if other_p50:
                    r[f"speedup_vs_{other}"] = other_p50 / p50  # > 1: this provider is faster
        if r.get("peak_bytes") is not None:
            r["peak_bytes_per_token"] = r["peak_bytes"] / r["tokens"]
            eager_peak = peers.get("eager", {}).get("peak_bytes")
            if eager_peak:
                r["mem_ratio_vs_eager"] = r["peak_bytes"] / eager_peak
        eager_loss = peers.get("eager", {}).get("loss")
        if r.get("loss") is not None and eager_loss is not None:
            # relative, but a loss near 0 is compared on the scale 0.01
            r["loss_reldiff_vs_eager"] = abs(r["loss"] - eager_loss) / max(abs(eager_loss), 1e-2)
        grad = samples.get(r["provider"])
        if grad is not None and eager_grad is not None and grad.shape == eager_grad.shape:
            scale = eager_grad.abs().max().item() or 1.0
            r["grad_reldiff_vs_eager"] = (grad - eager_grad).abs().max().item() / scale
        if r["status"] == "ok":
            problem = _mismatch(r, r["dtype"])
            if problem:
                r["status"], r["error"] = "mismatch", problem


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class Plan:
    grid: Grid
    device: torch.device
    ops: list[Op]
    skipped_ops: list[tuple[str, str]]  # (op id, why not in this run)
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
            lines.append(f"  {op.id}: {shapes}")
        for op_id, why in self.skipped_ops:
            lines.append(f"  {op_id}: not in this run ({why})")
        return "\n".join(lines)


def plan_grid(grid: str | Grid = "auto", *, device: str = "auto", ops=None, providers=None, modes=None,
              dtypes=None, batch=None, models=None, tokens=None, vocabs=None) -> Plan:
    dev = resolve_device(device)
    if isinstance(grid, str):
        name = ("gpu" if dev.type == "cuda" else "cpu") if grid == "auto" else grid
        if name not in GRIDS:
            raise ValueError(f"grid: unknown {name!r}; known: {sorted(GRIDS)}")
        grid = GRIDS[name]
    providers = list(providers or grid.providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; known: {list(PROVIDERS)}")
    modes = list(modes or grid.modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; known: {list(MODES)}")
    dtypes = list(dtypes or grid.dtypes)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes: unknown {unknown}; known: {sorted(DTYPES)}")
    wanted = resolve_ops(ops) if ops else list(OPS.values())
    chosen, skipped = [], []
    for op in wanted:
        if op.available():
            chosen.append(op)
        else:
            skipped.append((op.id, f"askd_kernels has no {op.function} yet"))
    shapes = {op.id: sorted(grid_shapes(grid, op, batch=batch, models=models, tokens=tokens, vocabs=vocabs),
                            key=lambda s: (s.tokens * s.vocab, s.tokens))
              for op in chosen}
    return Plan(grid, dev, chosen, skipped, shapes, providers, modes, dtypes)


def _new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def run_grid(plan: Plan, *, rep_ms: float | None = None, budget_s: float | None = None, seed: int = 0,
             ignore_frac: float = 0.0, out_dir=None, extra_out=None, progress: bool = True,
             threads: int | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """Measure every cell of ``plan``; append the records to ``out_dir/results.csv`` (and to
    ``extra_out``) after each op/shape/dtype group; return them all.

    ``budget_s`` bounds the measuring time: the cells run in rounds (every op at its smallest shape,
    then every op at its next one, ...; see ``Plan.order``), and those that would start past the
    budget are recorded as ``skipped``, so a short budget loses the largest shapes of every op rather
    than whole ops. None: no bound. ``threads``: CPU threads (default: the grid's), restored afterwards.
    """
    threads = plan.grid.threads if threads is None else threads
    saved_threads = torch.get_num_threads()
    if plan.device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        return _run_grid(plan, rep_ms, budget_s, seed, ignore_frac, out_dir, extra_out, progress, log)
    finally:
        torch.set_num_threads(saved_threads)


def _run_grid(plan, rep_ms, budget_s, seed, ignore_frac, out_dir, extra_out, progress, log) -> list[dict]:
    dev = plan.device
    rep_ms = plan.grid.rep_ms if rep_ms is None else rep_ms
    if rep_ms <= 0:
        raise ValueError(f"rep_ms: {rep_ms} must be positive")
    if not 0.0 <= ignore_frac < 1.0:
        raise ValueError(f"ignore_frac: {ignore_frac} must be in [0, 1)")
    budget_s = plan.grid.budget_s if budget_s is None else budget_s
    say = log or (lambda _s: None)
    if "compile" in plan.providers:
        import torch._dynamo

        # one compiled graph per op (dynamic shapes), but leave room for recompiles (dtypes, specialisations)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    env = results_io.environment(dev)
    run_id = _new_run_id()
    start = time.perf_counter()
    deadline = None if not budget_s or budget_s <= 0 else start + budget_s

    copy_bytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    copy_gbps = copy_bandwidth_gbps(dev, copy_bytes, rep_ms=max(rep_ms, 50.0))
    say(plan.describe())
    say(f"  device {env['device_name']} ({env['threads']} threads) | torch {env['torch']} | triton "
        f"{env['triton']} | commit {env['git_commit']} | copy bandwidth {copy_gbps:.1f} GB/s | run {run_id}")
    if deadline:
        say(f"  time budget {budget_s:.0f} s: cells past it are recorded as skipped")

    common = dict(run_id=run_id, grid=plan.grid.name, ignore_frac=ignore_frac, copy_gbps=copy_gbps, **env)
    bar = _Progress(plan.cells(), say, progress)
    records: list[dict] = []
    try:
        for op, dtype, shape in plan.order():
            group = _run_cell_group(op, shape, dtype, plan, dev, rep_ms, seed, ignore_frac, deadline, common,
                                    copy_gbps, bar)
            records.extend(group)
            if out_dir is not None:
                results_io.append_records(Path(out_dir) / results_io.RESULTS_FILE, group)
            if extra_out is not None:
                results_io.append_records(extra_out, group)
    finally:
        bar.close()
    say(f"measured {len(records)} records in {time.perf_counter() - start:.0f} s")
    return records


def _run_cell_group(op: Op, shape: Shape, dtype: str, plan: Plan, dev: torch.device, rep_ms: float, seed: int,
                    ignore_frac: float, deadline, common: dict, copy_gbps: float, bar: _Progress) -> list[dict]:
    torch_dtype = DTYPES[dtype]
    elt = torch.empty((), dtype=torch_dtype).element_size()
    base = dict(common, op=op.function, kind=op.kind or "", model=shape.model, batch=shape.batch, seq=shape.seq,
                tokens=shape.tokens, vocab=shape.vocab, hidden=shape.hidden if op.family == "hidden" else None,
                dtype=dtype)
    where = f"{op.id} {shape.model} N={shape.tokens} V={shape.vocab} {dtype}"
    per_provider: dict[str, tuple[dict, torch.Tensor | None]] = {}
    case = None
    setup_failure = None
    if deadline is not None and time.perf_counter() > deadline:
        setup_failure = ("skipped", "time budget exhausted")
    else:
        try:
            bar.describe(f"{where}: inputs")
            case = op.make_case(shape, torch_dtype, dev, seed=seed, ignore_frac=ignore_frac)
        except Exception as error:  # noqa: BLE001
            setup_failure = ("OOM" if is_oom(error) else "failed", _error_text("inputs", error))
            error = None
            free_memory(dev, collect=True)
    for provider in plan.providers:
        if setup_failure is not None:  # a group that starts runs every provider: same-run speed-ups
            rec, sample = {"provider": provider, "status": setup_failure[0], "error": setup_failure[1]}, None
        else:
            bar.describe(f"{where}: {provider}")
            rec, sample = measure_provider(op, provider, case, dev, modes=plan.modes, rep_ms=rep_ms)
        per_provider[provider] = (rec, sample)
        p50 = rec.get("time", {}).get("full", [None] * 3)[1] if rec.get("time") else None
        bar.advance(f"{where} {provider}: {rec['status']}" + (f" full p50 {p50:.3f} ms" if p50 else "")
                    + (f" ({rec['error']})" if rec.get("error") and rec["status"] != "ok" else ""))
    del case
    free_memory(dev, collect=False)

    group = []
    for provider, (rec, _sample) in per_provider.items():
        for mode in plan.modes:
            q = rec.get("time", {}).get(mode)
            row = dict.fromkeys(results_io.GRID_FIELDS)
            row.update(base, provider=provider, mode=mode, status=rec["status"], error=rec.get("error"),
                       first_call_s=rec.get("first_call_s"), loss=rec.get("loss"), reps=rec.get("reps"),
                       bytes_moved=op.bytes_moved(shape, elt, mode), flops=op.flops(shape, mode),
                       peak_bytes=rec.get("peak", {}).get(mode))
            if q is not None:
                row["time_ms_p20"], row["time_ms_p50"], row["time_ms_p80"] = q
            group.append(row)
    derive(group, {p: s for p, (_r, s) in per_provider.items()}, copy_gbps)
    return group

