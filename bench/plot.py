"""Plots and a markdown summary of a results folder: ``python -m bench.plot [FOLDER] [--run ID|latest|latest-per-op|all]``.

For the chosen run of ``FOLDER`` (default: every ``<cpu|gpu>/<device>`` folder holding a ``results.csv``
under ``bench/results/``, the committed results, and ``build/bench-results/``, the untracked ones) it
writes, next to the CSV:

* ``<op>-<dtype>.png`` per op: time (p50, with the p20–p80 band) and peak extra memory against the
  number of tokens (at the vocabulary with the most token counts) and against the vocabulary (at the
  token count with the most vocabularies), one line per provider, out-of-memory marked;
* ``summary.md``: per op a table of time, speed-ups, achieved bandwidth and peak memory for the full
  step (forward and backward in folded sections), the environment, the plots, and the grid's targets
  (``grid.Target``) where it has some.

The markdown needs nothing beyond the standard library; the plots need matplotlib (the ``bench``
extra), and are skipped with a note without it.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from . import results as results_io
from .grid import GRIDS, target_lines
from .ops import MODELS, PROVIDERS

MODE_TITLES = {"full": "Full step (forward + backward)", "forward": "Forward", "backward": "Backward"}
COLORS = {"ours": "#1f77b4", "eager": "#ff7f0e", "compile": "#2ca02c", "liger": "#d62728"}
MIB = float(1 << 20)
_MODEL_ORDER = {name: i for i, name in enumerate(MODELS)}


def op_label(r: dict) -> str:
    return f"{r['op']}:{r['kind']}" if r.get("kind") else r["op"]


def _op_slug(r: dict) -> str:
    return op_label(r).replace(":", "-")


def _groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(op label, dtype) -> records, in the order ops first appear."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        out.setdefault((op_label(r), r["dtype"]), []).append(r)
    return out


def _providers(records: list[dict]) -> list[str]:
    present = {r["provider"] for r in records}
    return [p for p in PROVIDERS if p in present] + sorted(present - set(PROVIDERS))


# ----------------------------------------------------------------------------------------------
# markdown


def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _short(value) -> str:
    """Three significant digits, never in exponent form: 1040, 34.8, 1.23, 0.0123."""
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def _time_cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] in ("ok", "mismatch") and r.get("time_ms_p50") is not None:
        return _short(r["time_ms_p50"]) + (" †" if r["status"] == "mismatch" else "")
    return r["status"]


def _mem_cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("peak_bytes") is not None:
        return _short(r["peak_bytes"] / MIB)
    return "" if r["status"] in ("ok", "mismatch") else r["status"]


def table_markdown(records: list[dict], mode: str) -> tuple[str, list[str]]:
    """The table of one op and dtype for one mode, and its notes (why providers did not run)."""
    rows = [r for r in records if r["mode"] == mode]
    if not rows:
        return "", []
    shown = [p for p in _providers(rows) if any(r["provider"] == p and r["status"] != "unavailable" for r in rows)]
    others = [p for p in shown if p != "ours" and any(r["provider"] == p and r.get("time_ms_p50") for r in rows)]
    hidden = rows[0]["op"] == "askd_loss_from_hidden"
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        cells[(r["model"], r["tokens"], r["vocab"], r.get("hidden"))][r["provider"]] = r
    header = ["model", "tokens", "vocab"] + (["hidden"] if hidden else [])
    header += [f"{p} ms" for p in shown]
    if "ours" in shown:
        header += [f"ours × {p}" for p in others]
        header += ["ours TFLOP/s" if hidden else "ours GB/s (% copy)"]
    header += [f"{p} MiB" for p in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(cells, key=lambda k: (k[2], k[1], _MODEL_ORDER.get(k[0], 99))):
        by_p = cells[key]
        model, tokens, vocab, hid = key
        name = MODELS[model].name if model in MODELS else model
        row = [name, str(tokens), str(vocab)] + ([str(hid)] if hidden else [])
        row += [_time_cell(by_p.get(p)) for p in shown]
        ours = by_p.get("ours")
        if "ours" in shown:
            row += [_num(ours.get(f"speedup_vs_{p}") if ours else None, ".2f") for p in others]
            if hidden:
                row.append(_short(ours.get("tflops")) if ours else "")
            elif ours and ours.get("gbps") is not None:
                pct = ours.get("pct_of_copy")
                row.append(_num(ours["gbps"], ".1f") + (f" ({pct:.0f}%)" if pct is not None else ""))
            else:
                row.append("")
        row += [_mem_cell(by_p.get(p)) for p in shown]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for r in rows:
        if r["status"] != "ok" and r.get("error"):
            note = f"{r['provider']}: {r['status']} — {r['error']}"
            if note not in notes:
                notes.append(note)
    return "\n".join(lines), notes


def glance_markdown(records: list[dict]) -> str:
    """One row per op and dtype: its largest shape where ours ran, full step, ours against the others."""
    groups = _groups(records)
    others = [p for p in _providers(records) if p != "ours"
              and any(r["provider"] == p and r.get("time_ms_p50") for r in records)]
    header = ["op", "dtype", "model", "tokens", "vocab", "ours ms"] + [f"ours × {p}" for p in others]
    header += ["ours MiB fwd / full"] + [f"{p} MiB fwd / full" for p in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (label, dtype), rs in groups.items():
        ours = [r for r in rs if r["provider"] == "ours" and r["mode"] == "full" and r.get("time_ms_p50")]
        if not ours:
            continue
        top = max(ours, key=lambda r: (r["tokens"] * r["vocab"], r["tokens"]))
        same = [r for r in rs if (r["model"], r["tokens"], r["vocab"]) == (top["model"], top["tokens"], top["vocab"])]

        def mem(provider):
            by_mode = {r["mode"]: r for r in same if r["provider"] == provider}
            if not by_mode:
                return ""
            full = by_mode.get("full") or next(iter(by_mode.values()))
            if full.get("peak_bytes") is None:
                return "" if full["status"] in ("ok", "mismatch") else full["status"]
            fwd = by_mode.get("forward", {}).get("peak_bytes")
            return (_short(fwd / MIB) + " / " if fwd is not None else "") + _short(full["peak_bytes"] / MIB)

        name = MODELS[top["model"]].name if top["model"] in MODELS else top["model"]
        row = [label, dtype, name, str(top["tokens"]), str(top["vocab"]), _short(top["time_ms_p50"])]
        for p in others:
            peer = next((r for r in same if r["provider"] == p and r["mode"] == "full"), None)
            row.append(_num(top.get(f"speedup_vs_{p}"), ".2f") if top.get(f"speedup_vs_{p}") is not None
                       else (peer["status"] if peer else ""))
        row += [mem("ours")] + [mem(p) for p in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _latest(records: list[dict]) -> dict:
    """A record of the most recent run among ``records`` (run ids are UTC timestamps)."""
    return max(records, key=lambda r: r.get("run_id") or "")


def _older_runs(records: list[dict]) -> list[str]:
    """A line per run other than the latest (``--run latest-per-op``): which ops' rows it holds."""
    lines = []
    for run_id in sorted({r["run_id"] for r in records} - {_latest(records)["run_id"]}, reverse=True):
        rs = [r for r in records if r["run_id"] == run_id]
        ops = ", ".join(f"`{op}`" for op in dict.fromkeys(op_label(r) for r in rs))
        lines += [f"The {ops} rows are those of run `{run_id}` (commit `{rs[0]['git_commit']}`), which the run above "
                  "did not re-measure (`--run latest-per-op`).", ""]
    return lines


def summary_markdown(records: list[dict], *, modes=("full", "forward", "backward"), plots: dict | None = None,
                     source: str = "results.csv") -> str:
    """The whole summary of one run: environment, method, then per mode and op a table."""
    if not records:
        return "# Benchmark results\n\nNo records.\n"
    r0 = _latest(records)
    copy = r0.get("copy_gbps")
    out = [
        f"# Benchmark results — {r0['device_name']} ({r0['device']})",
        "",
        f"Run `{r0['run_id']}` of grid `{r0.get('grid')}` on {r0['date']}, commit `{r0['git_commit']}`: "
        f"torch {r0['torch']}, triton {r0['triton']}" + (f", CUDA {r0['cuda']}" if r0.get("cuda") else "")
        + f", Python {r0['python']}, torch CPU threads {r0['threads']}. Copy bandwidth measured in the same run: "
        + (f"{copy:.1f} GB/s" if copy else "n/a") + " (bytes read + written).",
        "",
        *_older_runs(records),
        f"Generated by `python -m bench.plot` from `{source}` (one row per op × provider × mode × shape × "
        "dtype, with every column); regenerate it rather than editing it.",
        "",
        "* **time**: p50 in ms (p20/p80 in the CSV); "
        + ("`triton.testing.do_bench` for forward and full step, CUDA events around `loss.backward()` after "
           "an untimed forward and an L2 flush for backward" if r0["device"] == "cuda" else
           "wall clock, the forward and backward of each rep timed separately (full = their sum), after "
           "a first call")
        + ". `ours × X` is X's time / ours (> 1: ours is faster), in the same run.",
        "* **MiB**: peak extra memory of the mode, above the inputs (the gradient counts); "
        + ("`torch.cuda.max_memory_allocated` deltas." if r0["device"] == "cuda" else
           "every CPU allocation and free read from the profiler, summed in time order."),
        "* **GB/s**: the op's minimum traffic (see `bench/ops.py`: e.g. full step of `askd_loss` = 4·N·V·e, "
        "of a divergence 5·N·V·e) / p50, and that as % of the copy bandwidth.",
        "* `OOM`: the provider ran out of memory; `†`: its loss or gradient disagrees with eager (see the notes); "
        "`skipped`: past the run's time budget.",
        "",
    ]
    out += ["## At a glance", "",
            "The full step at each op's largest shape where ours ran (`ours × X` > 1: ours is faster; memory: "
            "peak extra MiB of the forward / of the full step).", "", glance_markdown(records), ""]
    out += targets_markdown(records)
    for mode in modes:
        if not any(r["mode"] == mode for r in records):
            continue
        folded = mode != "full"
        out.append(f"## {MODE_TITLES.get(mode, mode)}")
        out.append("")
        if folded:
            out += ["<details><summary>tables</summary>", ""]
        out += tables_markdown(records, mode, plots=plots if mode == "full" else None)
        if folded:
            out += ["</details>", ""]
    return "\n".join(out)


def tables_markdown(records: list[dict], mode: str, *, plots: dict | None = None) -> list[str]:
    """Per op and dtype: a heading, its table for ``mode``, its notes and its plot (if in ``plots``)."""
    out = []
    for (label, dtype), rs in _groups(records).items():
        table, notes = table_markdown(rs, mode)
        if not table:
            continue
        out += [f"### {label} ({dtype})", "", table, ""]
        out += [f"* {n}" for n in notes]
        if notes:
            out.append("")
        if plots and (label, dtype) in plots:
            out += [f"![{label} {dtype}]({plots[(label, dtype)]})", ""]
    return out


def targets_markdown(records: list[dict]) -> list[str]:
    """The targets of the records' grid (see ``grid.Target``) against ours' numbers; none without targets."""
    grid = GRIDS.get(records[0].get("grid")) if records else None
    if grid is None or not grid.targets:
        return []
    note = "" if records[0]["device"] == "cuda" else " The targets are set for CUDA; on a CPU they are informational."
    return ["## Targets", "", f"Grid `{grid.name}`: {grid.description}.{note}", ""] + \
        [f"* {line}" for line in target_lines(records, grid.targets)] + [""]


def report_markdown(records: list[dict], mode: str) -> str:
    """What ``python -m bench`` prints after a run: the tables of one mode, then the targets if any."""
    return "\n".join([f"## {MODE_TITLES.get(mode, mode)}", ""] + tables_markdown(records, mode)
                     + targets_markdown(records))


# ----------------------------------------------------------------------------------------------
# plots


def _best_sweep(rows: list[dict], fixed: str, varying: str):
    """(fixed value, sorted varying values) with the most varying values (at least 2), else None."""
    values: dict = defaultdict(set)
    for r in rows:
        values[r[fixed]].add(r[varying])
    best = max(values.items(), key=lambda kv: (len(kv[1]), kv[0]), default=None)
    if best is None or len(best[1]) < 2:
        return None
    return best[0], sorted(best[1])


def plot_op(records: list[dict], path: Path, mode: str = "full") -> bool:
    """Four panels (time/memory × tokens/vocabulary) for one op and dtype; False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    from matplotlib.transforms import blended_transform_factory

    rows = [r for r in records if r["mode"] == mode]
    sweeps = {"tokens": _best_sweep(rows, "vocab", "tokens"), "vocab": _best_sweep(rows, "tokens", "vocab")}
    if not any(sweeps.values()):
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    r0 = rows[0]
    fig.suptitle(f"{op_label(r0)} — {MODE_TITLES.get(mode, mode).lower()} — {r0['dtype']} — {r0['device_name']}",
                 fontsize=12)
    names = {}
    for r in rows:
        names[r["vocab"]] = MODELS[r["model"]].name if r["model"] in MODELS else r["model"]
    for col, axis in enumerate(("tokens", "vocab")):
        sweep = sweeps[axis]
        for row, metric in enumerate(("time", "memory")):
            ax = axes[row][col]
            if sweep is None:
                ax.text(0.5, 0.5, f"no {axis} sweep in this run", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            fixed_value, xs = sweep
            fixed_key = "vocab" if axis == "tokens" else "tokens"
            sub = [r for r in rows if r[fixed_key] == fixed_value]
            trans = blended_transform_factory(ax.transData, ax.transAxes)
            for provider in _providers(sub):
                pts = sorted((r for r in sub if r["provider"] == provider), key=lambda r: r[axis])
                ok = [r for r in pts if r["status"] in ("ok", "mismatch")
                      and (r.get("time_ms_p50") if metric == "time" else r.get("peak_bytes")) is not None]
                bad = [r for r in pts if r["status"] in ("OOM", "failed")]
                if not ok and not bad:
                    continue
                color = COLORS.get(provider)
                if ok:
                    x = [r[axis] for r in ok]
                    if metric == "time":
                        y = [r["time_ms_p50"] for r in ok]
                        lo = [r.get("time_ms_p20") or v for r, v in zip(ok, y)]
                        hi = [r.get("time_ms_p80") or v for r, v in zip(ok, y)]
                        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
                    else:
                        y = [r["peak_bytes"] / MIB for r in ok]
                    ax.plot(x, y, marker="o", color=color, label=provider)
                for r in bad:  # out of memory (or failed): an x at the top of the panel, labelled
                    ax.plot([r[axis]], [0.95], marker="x", color=color, markersize=9, transform=trans, clip_on=False,
                            linestyle="none")
                    ax.annotate(f"{provider} {r['status']}", (r[axis], 0.95), xytext=(-7, -3),
                                textcoords="offset points", color=color, fontsize=8, xycoords=trans, ha="right")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(xs)
            if axis == "tokens":
                ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs])
                ax.set_xlabel(f"tokens N (vocabulary {fixed_value}, {names.get(fixed_value, '')})")
            else:
                ax.set_xticklabels([(f"{x // 1000}k" if x >= 1000 else str(x)) + f"\n{names.get(x, '')}" for x in xs],
                                   fontsize=8)
                ax.set_xlabel(f"vocabulary V (tokens N = {fixed_value})")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            low, high = ax.get_ylim()
            span = high / low if low > 0 else 1e9
            subs = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9) if span < 10 else (1, 2, 5) if span < 1000 else (1,)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_ylabel("time, ms (p50; band p20–p80)" if metric == "time" else
                          f"peak extra memory, MiB ({mode})")
            ax.grid(True, which="major", alpha=0.3)
            handles, _labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=9, loc="best")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# the folder


def select_run(records: list[dict], run: str = "latest") -> list[dict]:
    if run == "all":
        return records
    if run == "latest":
        return results_io.latest_run(records)
    if run == "latest-per-op":
        return results_io.latest_run_per_op(records)
    return [r for r in records if r.get("run_id") == run]


def render(folder, *, run: str = "latest", mode: str = "full", plots: bool = True,
           log=print) -> list[Path]:
    """Write the PNGs and ``summary.md`` of one run of a results folder; return the files written."""
    folder = Path(folder)
    records = select_run(results_io.read_records(folder), run)
    if not records:
        raise ValueError(f"no records of run {run!r} in {folder}")
    written: list[Path] = []
    images: dict = {}
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
            if log:
                log("matplotlib is not installed (pip install -e '.[bench]'): summary.md only, no plots")
    if plots:
        for (label, dtype), rs in _groups(records).items():
            path = folder / f"{_op_slug(rs[0])}-{dtype}.png"
            if plot_op(rs, path, mode):
                images[(label, dtype)] = path.name
                written.append(path)
    summary = folder / "summary.md"
    summary.write_text(summary_markdown(records, plots=images), encoding="utf-8")
    written.append(summary)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help="results folders (default: every <cpu|gpu>/<device> folder "
                        "with a results.csv under bench/results and build/bench-results)")
    parser.add_argument("--run", default="latest", help="run id, 'latest' (default), 'latest-per-op' (each op's "
                        "rows from the latest run holding it) or 'all'")
    parser.add_argument("--mode", default="full", choices=tuple(MODE_TITLES), help="mode plotted (default full)")
    parser.add_argument("--no-plots", action="store_true", help="write summary.md only")
    args = parser.parse_args(argv)
    roots = (results_io.RESULTS_ROOT, results_io.LOCAL_ROOT)
    folders = [Path(f) for f in args.folders] or sorted(
        {p.parent for root in roots for p in root.glob(f"*/*/{results_io.RESULTS_FILE}")})
    if not folders:
        parser.error(f"no results folders under {' or '.join(map(str, roots))}")
    for folder in folders:
        try:
            written = render(folder, run=args.run, mode=args.mode, plots=not args.no_plots)
        except (ValueError, OSError) as error:
            print(f"{folder}: {error}", file=sys.stderr)
            return 1
        for path in written:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
