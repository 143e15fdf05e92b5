"""The command line, ``python -m bench``: plan a grid, run it (measure -> derive -> write), report.

Every run, the headline case ``askd-core`` included, goes through ``grid.plan_grid`` and
``grid.run_grid``; then the tables (and the grid's targets) are printed, and ``summary.md`` and the
plots are written next to ``results.csv``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import grid as grid_mod
from . import plot
from . import results as results_io
from .measure import MODES
from .ops import ALIASES, DTYPES, MODELS, OPS, PROVIDERS


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark askd_kernels against straightforward PyTorch (eager and torch.compile) and "
                    "Liger-Kernel: a grid of ops x providers x modes x shapes x dtypes, appended to "
                    "<results root>/<cpu|gpu>/<device>/results.csv with plots and summary.md. Grids: "
                    + "; ".join(f"{g.name}: {g.description}" for g in grid_mod.GRIDS.values()) + ".",
        epilog="Plots and summary of existing results: python -m bench.plot [FOLDER]. Static report of the "
               "compiled kernels (registers, SASS loops, predicted roofline; no GPU needed): "
               "python -m bench static --help.")
    parser.add_argument("--grid", "--case", dest="grid", default="auto", choices=["auto", *grid_mod.GRIDS],
                        help="the grid (default auto = gpu; gpu and askd-core run their CPU stand-ins, cpu and "
                             "askd-core-cpu, where there is no CUDA); --case is another name for it")
    parser.add_argument("--ops", help="comma list of op ids " + ",".join(OPS) + " or aliases "
                        + ",".join(ALIASES) + " (default: the grid's)")
    parser.add_argument("--providers", help="comma list of " + ",".join(PROVIDERS) + " (default: the grid's)")
    parser.add_argument("--modes", help="comma list of " + ",".join(MODES) + " (default: all)")
    parser.add_argument("--models", help="comma list of " + ",".join(MODELS) + " (with --tokens: their cross product)")
    parser.add_argument("--tokens", help="comma list of token counts N = batch * seq")
    parser.add_argument("--vocab", help="comma list of custom vocabulary sizes")
    parser.add_argument("--dtype", help="comma list of " + ",".join(DTYPES) + " (default: the grid's)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: the grid's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--rep-ms", type=float, help="time budget of each timing (default: the grid's)")
    parser.add_argument("--budget-s", type=float, help="bound on the measuring time; later cells are recorded as "
                        "skipped (default: the grid's, 150 s for 'cpu', none otherwise; 0 = none)")
    parser.add_argument("--ignore-frac", type=float, default=0.0,
                        help="leading fraction of each sequence masked with ignore_index (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="on CPU: torch threads (default: the grid's; 1 for cpu grids)")
    parser.add_argument("--results-root", default=str(results_io.LOCAL_ROOT),
                        help="root of the <cpu|gpu>/<device> results folders (default build/bench-results, "
                             "untracked; bench/results holds the committed results)")
    parser.add_argument("--results-dir", help="the results folder itself (default <results root>/<cpu|gpu>/<device>)")
    parser.add_argument("--no-save", action="store_true", help="do not write the results folder")
    parser.add_argument("--no-plot", action="store_true", help="write summary.md but no PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--out", help="also append the records to this file: CSV if it ends in .csv, else JSON lines")
    return parser


def _process_main(argv: list[str]) -> int:
    """``python -m bench process``: whole-process CPU measurements (see ``grid.run_process_grid``)."""
    import json

    parser = argparse.ArgumentParser(
        prog="python -m bench process",
        description="Whole-process CPU benchmark: every cell x provider in a fresh interpreter (imports, inputs, "
                    "first step, steady steps), interleaved rounds, medians and ratios to eager of the same run; "
                    "peak memory is the process's peak resident set (VmHWM).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ops", default="askd", help="comma list of op ids or aliases (default askd)")
    parser.add_argument("--providers", default="ours,eager", help="comma list (default ours,eager)")
    parser.add_argument("--tokens", help="comma list of token counts (default: the grid's shapes)")
    parser.add_argument("--vocab", help="comma list of vocabularies, paired with --tokens one to one")
    parser.add_argument("--dtype", default="bf16,fp32")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, help="hidden size for askd_loss_from_hidden (default 1024)")
    parser.add_argument("--reps", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="forward+backward steps per process (default 3)")
    parser.add_argument("--out", help="append the records to this CSV (and write process.md next to it)")
    parser.add_argument("--report", metavar="CSV", help="only write process.md next to this CSV from its records")
    args = parser.parse_args(argv)

    def write_report(csv_path):
        notes = Path(csv_path).with_name("process-notes.md")
        report = Path(csv_path).with_name("process.md")
        report.write_text(grid_mod.process_report(grid_mod.read_process_records(csv_path),
                                                  notes.read_text() if notes.exists() else "") + "\n")
        return report

    if args.report:
        report = write_report(args.report)
        print(f"wrote {report}")
        return 0
    if args.child:
        from .measure import process_child
        print(json.dumps(process_child(json.loads(args.child))))
        return 0
    shapes = grid_mod.PROCESS_SHAPES
    if args.tokens:
        tokens = _ints(args.tokens, "tokens")
        vocabs = _ints(args.vocab, "vocab") or [32000] * len(tokens)
        if len(vocabs) != len(tokens):
            parser.error("--vocab: one vocabulary per --tokens entry")
        shapes = tuple(zip(tokens, vocabs))
    cells = grid_mod.process_cells(_words(args.ops), shapes, tuple(_words(args.dtype)),
                                   tuple(_ints(args.threads, "threads")), args.batch, args.hidden)
    records = grid_mod.run_process_grid(cells, tuple(_words(args.providers)), reps=args.reps, steps=args.steps,
                                        out=args.out)
    print()
    print(grid_mod.process_markdown(records))
    if args.out:
        report = write_report(args.out)
        print(f"appended to {args.out}; wrote {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["process"]:
        return _process_main(argv[1:])
    if argv[:1] == ["static"]:
        # ``python -m bench static``: the static (compiled, no GPU) performance report, bench/static.py.
        from . import static
        static_parser = argparse.ArgumentParser(prog="python -m bench static",
                                                description=static.__doc__.split("\n\n")[0])
        static.add_arguments(static_parser)
        return static.run_cli(static_parser.parse_args(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        plan = grid_mod.plan_grid(args.grid, device=args.device, ops=_words(args.ops),
                                  providers=_words(args.providers), modes=_words(args.modes),
                                  dtypes=_words(args.dtype), batch=args.batch, models=_words(args.models),
                                  tokens=_ints(args.tokens, "tokens"), vocabs=_ints(args.vocab, "vocab"))
        if args.list:
            print(plan.describe())
            return 0
        out_dir = None
        if not args.no_save:
            out_dir = Path(args.results_dir or results_io.results_dir(plan.device, root=args.results_root))
        outputs = [path for path in (out_dir and out_dir / results_io.RESULTS_FILE, args.out) if path]
        records = grid_mod.run_grid(plan, rep_ms=args.rep_ms, budget_s=args.budget_s, seed=args.seed,
                                    ignore_frac=args.ignore_frac, outputs=outputs, progress=not args.no_progress,
                                    threads=args.threads)
    except ValueError as error:
        parser.error(str(error))
    print()
    print(plot.report_markdown(records, "full" if "full" in plan.modes else plan.modes[0]))
    if out_dir is not None and records:
        written = plot.render(out_dir, run=records[0]["run_id"], plots=not args.no_plot)
        print(f"results appended to {out_dir / results_io.RESULTS_FILE}; wrote "
              + ", ".join(p.name for p in written) + f" in {out_dir}")
    if args.out:
        print(f"appended {len(records)} records to {args.out}", file=sys.stderr)
    return 0
