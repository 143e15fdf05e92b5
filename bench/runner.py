"""The command line, and the single-case benchmark (``python -m bench --case askd-core``).

``main(argv)`` is ``python -m bench``: without ``--case`` it runs the grid of ``bench/grid.py`` (the
default job), with ``--case`` one case, several providers, one table with the issue's targets and
optionally one record per provider (``run(...)`` does that work and returns the records).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import results as results_io
from .baselines import askd_loss_torch
from .measure import copy_bandwidth_gbps, free_memory, is_oom, peak_memory, resolve_device, synchronize, time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The case is fwd+bwd of askd_loss over 16384 tokens (B=8, T=2048) of a Qwen2-1.5B-sized
# vocabulary in bf16; it needs a GPU. Without one, a small embedded case that runs every provider
# (torch.compile included) in well under a minute on 2 cores.
CASES = {
    "askd-core": {
        "cuda": dict(batch=8, seq=2048, vocab=151936, dtype="bf16"),
        "cpu": dict(batch=2, seq=128, vocab=8192, dtype="fp32"),
    },
}

# The targets for the CUDA case.
TARGET_PCT_OF_COPY = 80.0  # achieved GB/s as % of the measured device copy bandwidth
TARGET_VS_EAGER = 3.5  # speed-up of ours over the eager PyTorch baseline
TARGET_VS_COMPILE = 1.25  # speed-up of ours over torch.compile of the same baseline
TARGET_FWD_BYTES_PER_TOKEN = 64  # extra memory of the forward

PROVIDER_NAMES = ("ours", "eager", "compile")
GRAD_SAMPLE_ROWS = 64  # rows of the gradient kept to compare providers with eager

FIELDS = (
    "case", "provider", "status", "error", "device", "device_name", "dtype", "batch", "seq",
    "tokens", "vocab", "ignore_frac", "cpu_default", "time_ms_p20", "time_ms_p50", "time_ms_p80",
    "first_call_s", "bytes_moved", "gbps", "copy_gbps", "pct_of_copy", "fwd_peak_bytes",
    "fwd_bytes_per_token", "fwdbwd_peak_bytes", "ours_speedup", "loss", "loss_absdiff_vs_eager",
    "grad_reldiff_vs_eager", "torch", "triton", "python", "threads", "git_commit", "date",
)


def traffic_bytes(tokens: int, vocab: int, elt_size: int) -> int:
    """Minimum memory traffic of one fused fwd+bwd step, the roofline the issue measures against.

    student logits  read in forward (log-sum-exp, logit of the label)   N·V·elt
    student logits  read again in backward (softmax for the gradient)   N·V·elt
    teacher logits  read once in forward                                N·V·elt
    gradient        written once in backward, dtype of the logits       N·V·elt
    Per-token scalars (labels, log-sum-exps, λ: a few bytes per token) are not counted.
    """
    return 4 * tokens * vocab * elt_size


# ----------------------------------------------------------------------------------------------
# inputs and providers


@dataclass
class Inputs:
    student: torch.Tensor  # [B, T, V] leaf, requires grad
    labels: torch.Tensor  # [B, T] int64
    teacher: torch.Tensor  # [B, T, V]
    student_generated: torch.Tensor  # [B] bool
    alpha: torch.Tensor  # [B] float32


def make_inputs(batch: int, seq: int, vocab: int, dtype: torch.dtype, device: torch.device,
                *, ignore_frac: float = 0.0, seed: int = 0) -> Inputs:
    """Random logits, a mixed batch (even sequences TGO, odd SGO) and α in [0.1, 0.9].

    ``ignore_frac`` masks that leading fraction of every sequence (a prompt) with -100. The byte
    model still counts every row: the logits of masked rows are there, and the gradient is written.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, seq, vocab)
    student = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(2.0)
    teacher = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(2.0)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    labels[:, : round(ignore_frac * seq)] = -100
    student_generated = torch.arange(batch, device=device) % 2 == 1
    alpha = torch.rand(batch, generator=gen, device=device) * 0.8 + 0.1
    return Inputs(student.requires_grad_(), labels, teacher, student_generated, alpha)


LossFn = Callable[[Inputs], torch.Tensor]


def _ours() -> LossFn:
    import askd_kernels

    askd_loss = askd_kernels.askd_loss

    def loss(x: Inputs) -> torch.Tensor:
        return askd_loss(x.student, x.labels, x.teacher, student_generated=x.student_generated,
                         alpha=x.alpha, reduction="mean")

    return loss


def _baseline(fn) -> LossFn:
    def loss(x: Inputs) -> torch.Tensor:
        return fn(x.student, x.labels, x.teacher, student_generated=x.student_generated,
                  alpha=x.alpha)

    return loss


# name -> factory of the loss function (a factory so that an import or compile set-up failure
# is recorded against the provider, not raised at import of this module).
PROVIDERS: dict[str, Callable[[], LossFn]] = {
    "ours": _ours,
    "eager": lambda: _baseline(askd_loss_torch),
    "compile": lambda: _baseline(torch.compile(askd_loss_torch)),
}


# ----------------------------------------------------------------------------------------------
# measuring one provider


def _measure(name: str, x: Inputs, device: torch.device, rep_ms: float) -> tuple[dict, torch.Tensor | None]:
    """Time and memory of one provider; returns (partial record, sample of its gradient rows).

    Failures never propagate: an out-of-memory is status "OOM", a provider that cannot be
    imported is "unavailable", anything else (e.g. torch.compile unsupported here) "failed".
    """
    rec: dict = {"provider": name, "status": "ok"}
    grad_sample = None
    stage = "set-up"
    try:
        loss_fn = PROVIDERS[name]()

        def step() -> torch.Tensor:
            loss = loss_fn(x)
            loss.backward()
            return loss

        # First call: compiles what needs compiling, and gives the values to cross-check.
        stage = "first call"
        x.student.grad = None
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        rec["first_call_s"] = time.perf_counter() - start
        rec["loss"] = loss.item()
        vocab = x.student.shape[-1]
        grad = x.student.grad.reshape(-1, vocab)
        rows = torch.linspace(0, grad.shape[0] - 1, min(GRAD_SAMPLE_ROWS, grad.shape[0]),
                              device=device).long()
        grad_sample = grad[rows].float().cpu()
        del loss, grad
        x.student.grad = None

        stage = "timing"
        rec["time_ms_p20"], rec["time_ms_p50"], rec["time_ms_p80"] = time_ms(
            step, device, grad_to_none=[x.student], rep_ms=rep_ms)

        stage = "memory"
        x.student.grad = None
        rec["fwd_peak_bytes"], rec["fwdbwd_peak_bytes"] = peak_memory(lambda: loss_fn(x), device)
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        if is_oom(error):
            rec["status"] = "OOM"
        elif stage == "set-up" and isinstance(error, (ImportError, AttributeError)):
            rec["status"] = "unavailable"
        else:
            rec["status"] = "failed"
        message = str(error).strip().splitlines()
        rec["error"] = f"{stage}: {type(error).__name__}: {message[0][:200] if message else ''}"
    finally:
        x.student.grad = None
        free_memory(device)
    return rec, grad_sample


# ----------------------------------------------------------------------------------------------
# environment


def _environment(device: torch.device) -> dict:
    env = results_io.environment(device)
    env.pop("cuda", None)
    return env


# ----------------------------------------------------------------------------------------------
# the run


def run(*, case: str = "askd-core", device: str = "auto", batch: int | None = None,
        tokens: int | None = None, vocab: int | None = None, dtype: str | None = None,
        providers: Iterable[str] = PROVIDER_NAMES, rep_ms: float | None = None,
        ignore_frac: float = 0.0, seed: int = 0, log: Callable[[str], None] | None = print) -> list[dict]:
    """Run one case for each provider; print the table through ``log``; return one record each.

    Shape arguments left at None take the case's default for the device: the issue's case on
    CUDA, a small embedded case on CPU (``cpu_default`` is True in the records when all of them
    were left at None on CPU).
    """
    dev = resolve_device(device)
    if case not in CASES:
        raise ValueError(f"case: unknown case {case!r}; known: {sorted(CASES)}")
    providers = list(providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; known: {sorted(PROVIDERS)}")
    default = CASES[case]["cuda" if dev.type == "cuda" else "cpu"]
    cpu_default = dev.type == "cpu" and batch is None and tokens is None and vocab is None and dtype is None
    batch = default["batch"] if batch is None else batch
    tokens = batch * default["seq"] if tokens is None else tokens
    vocab = default["vocab"] if vocab is None else vocab
    dtype = default["dtype"] if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; known: {sorted(DTYPES)}")
    for name, value in (("batch", batch), ("tokens", tokens), ("vocab", vocab)):
        if value <= 0:
            raise ValueError(f"{name}: {value} must be positive")
    if tokens % batch:
        raise ValueError(f"tokens: {tokens} must be a multiple of batch={batch}")
    if not 0.0 <= ignore_frac < 1.0:
        raise ValueError(f"ignore_frac: {ignore_frac} must be in [0, 1)")
    seq = tokens // batch
    if rep_ms is None:
        rep_ms = 1000.0 if dev.type == "cuda" else 500.0
    if rep_ms <= 0:
        raise ValueError(f"rep_ms: {rep_ms} must be positive")
    torch_dtype = DTYPES[dtype]
    elt = torch.empty((), dtype=torch_dtype).element_size()
    moved = traffic_bytes(tokens, vocab, elt)
    env = _environment(dev)
    say = log or (lambda _s: None)

    # Copy bandwidth of the device, in this run: 1 GiB on a GPU (well beyond L2), 256 MiB on CPU.
    copy_bytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    copy_gbps = copy_bandwidth_gbps(dev, copy_bytes, rep_ms=rep_ms)

    say(f"case {case}: fwd+bwd of askd_loss, B={batch} T={seq} (N={tokens} tokens), V={vocab}, {dtype}, "
        f"estimator=exact, mixed TGO/SGO batch, reduction=mean")
    if cpu_default:
        say("  CPU default: a small embedded case; the issue's case (B=8 T=2048 V=151936 bf16) "
            "runs by default on CUDA")
    say(f"  device {env['device']}: {env['device_name']}, {env['threads']} threads | torch {env['torch']}, "
        f"triton {env['triton']}, commit {env['git_commit']}")
    say(f"  bytes moved per step = 4*N*V*{elt} = {moved / 1e6:.1f} MB (student read twice, teacher once, "
        f"gradient written once); copy bandwidth {copy_gbps:.1f} GB/s ({copy_bytes >> 20} MiB copy)")

    x = make_inputs(batch, seq, vocab, torch_dtype, dev, ignore_frac=ignore_frac, seed=seed)
    common = dict(case=case, dtype=dtype, batch=batch, seq=seq, tokens=tokens, vocab=vocab,
                  ignore_frac=ignore_frac, cpu_default=cpu_default, bytes_moved=moved,
                  copy_gbps=copy_gbps, **env)
    records, samples = [], {}
    for name in providers:
        rec, samples[name] = _measure(name, x, dev, rep_ms)
        records.append({**dict.fromkeys(FIELDS), **common, **rec})
    del x
    free_memory(dev)

    _derive(records, samples, tokens)
    say(format_table(records))
    for line in target_lines(records, on_gpu=dev.type == "cuda"):
        say(line)
    return records


def _derive(records: list[dict], samples: dict, tokens: int) -> None:
    """Fill in GB/s, % of copy, bytes per token, speed-ups of ours, differences from eager."""
    by_name = {r["provider"]: r for r in records}
    ours_p50 = by_name.get("ours", {}).get("time_ms_p50")
    eager = by_name.get("eager", {})
    ref_grad = samples.get("eager")
    for r in records:
        p50 = r["time_ms_p50"]
        if p50:
            r["gbps"] = r["bytes_moved"] / (p50 * 1e-3) / 1e9
            r["pct_of_copy"] = 100.0 * r["gbps"] / r["copy_gbps"]
            if ours_p50:
                r["ours_speedup"] = p50 / ours_p50  # how many times faster ours is than this one
        if r["fwd_peak_bytes"] is not None:
            r["fwd_bytes_per_token"] = r["fwd_peak_bytes"] / tokens
        if r["loss"] is not None and eager.get("loss") is not None:
            r["loss_absdiff_vs_eager"] = abs(r["loss"] - eager["loss"])
        grad = samples.get(r["provider"])
        if grad is not None and ref_grad is not None:
            scale = ref_grad.abs().max().item() or 1.0
            r["grad_reldiff_vs_eager"] = (grad - ref_grad).abs().max().item() / scale


# ----------------------------------------------------------------------------------------------
# output


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(records: list[dict]) -> str:
    header = ("provider", "status", "p50 ms", "p20-p80 ms", "GB/s", "% copy", "fwd peak MiB",
              "fwd B/tok", "f+b peak MiB", "ours x", "1st call s", "loss", "grad rel.diff")
    rows = [header]
    mib = 1 << 20
    for r in records:
        if r["time_ms_p20"] is not None:
            spread = f"{r['time_ms_p20']:.3f}-{r['time_ms_p80']:.3f}"
        else:
            spread = "n/a"
        rows.append((
            r["provider"], r["status"], _fmt(r["time_ms_p50"], ".3f"), spread, _fmt(r["gbps"], ".1f"),
            _fmt(r["pct_of_copy"], ".1f"),
            _fmt(None if r["fwd_peak_bytes"] is None else r["fwd_peak_bytes"] / mib, ".2f"),
            _fmt(r["fwd_bytes_per_token"], ".0f"),
            _fmt(None if r["fwdbwd_peak_bytes"] is None else r["fwdbwd_peak_bytes"] / mib, ".2f"),
            _fmt(r["ours_speedup"], ".2f"), _fmt(r["first_call_s"], ".2f"), _fmt(r["loss"], ".6g"),
            _fmt(r["grad_reldiff_vs_eager"], ".1e"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for r in records:
        if r["error"]:
            lines.append(f"{r['provider']}: {r['status']} ({r['error']})")
    return "\n".join(lines)


def target_lines(records: list[dict], *, on_gpu: bool) -> list[str]:
    by_name = {r["provider"]: r for r in records}
    ours = by_name.get("ours")
    if ours is None or ours["status"] != "ok":
        return ["targets: n/a (ours did not run)"]

    def check(label, value, target, higher_is_better, unit=""):
        if value is None:
            return f"  {label}: n/a"
        ok = value >= target if higher_is_better else value <= target
        sign = ">=" if higher_is_better else "<="
        return f"  {label}: {value:.2f}{unit} (target {sign} {target}{unit}) {'ok' if ok else 'MISS'}"

    lines = ["targets" + ("" if on_gpu else " (set for the CUDA case; informational on CPU)") + ":"]
    lines.append(check("% of copy bandwidth", ours["pct_of_copy"], TARGET_PCT_OF_COPY, True, "%"))
    for other, target in (("eager", TARGET_VS_EAGER), ("compile", TARGET_VS_COMPILE)):
        r = by_name.get(other)
        speedup = r["ours_speedup"] if r is not None else None
        lines.append(check(f"speed-up vs {other}", speedup, target, True, "x"))
    lines.append(check("forward extra bytes per token", ours["fwd_bytes_per_token"],
                       TARGET_FWD_BYTES_PER_TOKEN, False))
    return lines


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Append the records: CSV (header written to a new file) if the name ends in .csv, else JSON lines."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows({k: r.get(k) for k in FIELDS} for r in records)
        else:
            for r in records:
                f.write(json.dumps({k: r.get(k) for k in FIELDS}) + "\n")


# ----------------------------------------------------------------------------------------------
# the command line


def _words(text: str | None) -> list[str] | None:
    return [w.strip() for w in text.split(",") if w.strip()] if text else None


def _ints(text: str | None, name: str) -> list[int] | None:
    words = _words(text)
    if words is None:
        return None
    try:
        return [int(w) for w in words]
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a comma list of integers") from None


def _one(values: list | None, name: str):
    if values is None:
        return None
    if len(values) != 1:
        raise ValueError(f"{name}: --case takes one value, got {values}")
    return values[0]


def _parser():
    import argparse

    from .grid import GRIDS
    from .measure import MODES
    from .ops import ALIASES, MODELS, OPS, PROVIDERS as GRID_PROVIDERS

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark askd_kernels against straightforward PyTorch (eager and torch.compile) and "
                    "Liger-Kernel. Without --case: the grid (ops x providers x modes x shapes x dtypes; "
                    "'gpu' on CUDA, 'cpu' otherwise), appended to bench/results/<cpu|gpu>/<device>/results.csv "
                    "with plots and summary.md. With --case askd-core: the core issue's single case and its "
                    "targets (B=8 T=2048 V=151936 bf16 on CUDA, a small embedded case on CPU).",
        epilog="Plots and summary of existing results: python -m bench.plot [FOLDER].")
    parser.add_argument("--case", choices=sorted(CASES), help="run one case instead of the grid")
    parser.add_argument("--grid", default="auto", choices=["auto", *GRIDS],
                        help="grid (default auto: gpu on CUDA, cpu otherwise)")
    parser.add_argument("--ops", help="comma list of op ids " + ",".join(OPS) + " or aliases "
                        + ",".join(ALIASES) + " (default: every op askd_kernels has)")
    parser.add_argument("--providers", help="comma list of " + ",".join(GRID_PROVIDERS)
                        + " (default: the grid's; with --case: " + ",".join(PROVIDER_NAMES) + ")")
    parser.add_argument("--modes", help="comma list of " + ",".join(MODES) + " (default: all)")
    parser.add_argument("--models", help="comma list of " + ",".join(MODELS) + " (with --tokens: their cross product)")
    parser.add_argument("--tokens", help="comma list of token counts N = batch * seq (--case: one)")
    parser.add_argument("--vocab", help="comma list of custom vocabulary sizes (--case: one)")
    parser.add_argument("--dtype", help="comma list of bf16,fp16,fp32 (default: the grid's; --case: one)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: the grid's or case's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--rep-ms", type=float, help="time budget of each timing (default: the grid's; --case "
                        "1000 on CUDA, 500 on CPU)")
    parser.add_argument("--budget-s", type=float, help="bound on the grid's measuring time; later cells are "
                        "recorded as skipped (default: the grid's, 150 s on CPU, none on GPU; 0 = none)")
    parser.add_argument("--ignore-frac", type=float, default=0.0,
                        help="leading fraction of each sequence masked with ignore_index (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="grid on CPU: torch threads (default: the grid's; 1 for 'cpu')")
    parser.add_argument("--results-dir", help="folder of results.csv, plots and summary.md "
                        "(default bench/results/<cpu|gpu>/<device>)")
    parser.add_argument("--no-save", action="store_true", help="grid: do not write the results folder")
    parser.add_argument("--no-plot", action="store_true", help="grid: write summary.md but no PNG")
    parser.add_argument("--no-progress", action="store_true", help="grid: no progress bar")
    parser.add_argument("--list", action="store_true", help="grid: print the cells and exit")
    parser.add_argument("--out", help="also append the records to this file: CSV if it ends in .csv, else JSON lines")
    return parser


def _main_case(args) -> int:
    providers = _words(args.providers) or list(PROVIDER_NAMES)
    records = run(case=args.case, device=args.device, batch=args.batch, tokens=_one(_ints(args.tokens, "tokens"), "tokens"),
                  vocab=_one(_ints(args.vocab, "vocab"), "vocab"), dtype=_one(_words(args.dtype), "dtype"),
                  providers=providers, rep_ms=args.rep_ms, ignore_frac=args.ignore_frac, seed=args.seed)
    if args.out:
        write_records(args.out, records)
        print(f"appended {len(records)} records to {args.out}", file=sys.stderr)
    return 0


def _main_grid(args) -> int:
    from . import grid as grid_mod
    from . import plot

    plan = grid_mod.plan_grid(args.grid, device=args.device, ops=_words(args.ops), providers=_words(args.providers),
                              modes=_words(args.modes), dtypes=_words(args.dtype), batch=args.batch,
                              models=_words(args.models), tokens=_ints(args.tokens, "tokens"),
                              vocabs=_ints(args.vocab, "vocab"))
    if args.list:
        print(plan.describe())
        return 0
    out_dir = None
    if not args.no_save:
        out_dir = Path(args.results_dir) if args.results_dir else results_io.results_dir(plan.device)
    records = grid_mod.run_grid(plan, rep_ms=args.rep_ms, budget_s=args.budget_s, seed=args.seed,
                                ignore_frac=args.ignore_frac, out_dir=out_dir, extra_out=args.out,
                                progress=not args.no_progress, threads=args.threads)
    print()
    for (label, dtype), rs in plot._groups(records).items():
        table, notes = plot.table_markdown(rs, "full" if "full" in plan.modes else plan.modes[0])
        print(f"{label} ({dtype}), {'full step' if 'full' in plan.modes else plan.modes[0]}:")
        print(table)
        for note in notes:
            print(f"  * {note}")
        print()
    if out_dir is not None:
        written = plot.render(out_dir, run=records[0]["run_id"], plots=not args.no_plot) if records else []
        print(f"results appended to {out_dir / results_io.RESULTS_FILE}; wrote "
              + ", ".join(p.name for p in written) + f" in {out_dir}")
    if args.out:
        print(f"appended {len(records)} records to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _main_case(args) if args.case else _main_grid(args)
    except ValueError as error:
        parser.error(str(error))
    return 2
