"""The benchmark runs end to end on CPU and reports sane numbers (no timing thresholds here).

One harness (``bench/grid.py``): the headline case ``askd-core`` (``python -m bench --grid askd-core``)
and the main grid (``python -m bench``) run through the same pipeline, measure -> derive -> write.
Here on toy shapes: the records, out-of-memory, failing and unavailable providers recorded as such,
the targets, the time budget, the CSV and JSON files, the markdown summary and the plots.
"""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from bench import cli, grid, ops, plot, results


def _positive_finite(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _headline(**overrides):
    """The headline grid on CPU at a toy shape (B=2, N=32, V=256), ours and eager."""
    plan = grid.plan_grid("askd-core", device="cpu", providers=["ours", "eager"], batch=2, tokens=[32],
                          vocabs=[256], **overrides)
    return plan, grid.run_grid(plan, rep_ms=20, ignore_frac=0.25, progress=False, log=None)


def test_headline_case_is_a_grid_entry_with_targets():
    on_gpu = grid.GRIDS["askd-core"]
    assert on_gpu.ops == ("askd_loss",) and on_gpu.dtypes == ("bf16",) and on_gpu.batch == 8
    assert on_gpu.shapes == (("qwen2", 16384),) and ops.MODELS["qwen2"].vocab == 151936  # B=8 T=2048 V=151936
    assert {t.column for t in on_gpu.targets} == {"pct_of_copy", "speedup_vs_eager", "speedup_vs_compile",
                                                  "peak_bytes_per_token"}
    assert set(results.FIELDS) >= {t.column for t in on_gpu.targets}
    # without CUDA, the headline and the main grid run their CPU stand-ins
    cpu = torch.device("cpu")
    assert grid.resolve_grid("askd-core", cpu).name == "askd-core-cpu"
    assert grid.resolve_grid("askd-core", cpu).targets == on_gpu.targets
    assert grid.resolve_grid("auto", cpu).name == grid.resolve_grid("gpu", cpu).name == "cpu"
    assert grid.resolve_grid("tiny", cpu).name == "tiny"


def test_headline_case_reports_finite_numbers():
    plan, records = _headline()
    assert plan.grid.name == "askd-core-cpu"
    assert [(r["provider"], r["mode"]) for r in records] == [(p, m) for p in ("ours", "eager")
                                                             for m in ("forward", "backward", "full")]
    grad_bytes = 32 * 256 * 4
    by = {(r["provider"], r["mode"]): r for r in records}
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert set(r) == set(results.FIELDS)
        assert (r["grid"], r["op"], r["batch"], r["seq"], r["vocab"], r["dtype"]) == (
            "askd-core-cpu", "askd_loss", 2, 16, 256, "fp32")
        for key in ("time_ms_p20", "time_ms_p50", "time_ms_p80", "gbps", "pct_of_copy", "copy_gbps",
                    "speedup_vs_ours", "speedup_vs_eager", "first_call_s"):
            assert _positive_finite(r[key]), (r["provider"], r["mode"], key, r[key])
        assert r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
        assert math.isfinite(r["loss"]) and r["ignore_frac"] == 0.25
        # Peak memory is measured (profiler allocation events), so the full step must see the gradient.
        assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0
        assert r["peak_bytes_per_token"] == r["peak_bytes"] / 32
        assert r["bytes_moved"] == {"forward": 2, "backward": 2, "full": 4}[r["mode"]] * 32 * 256 * 4
    assert by[("eager", "full")]["peak_bytes"] >= grad_bytes and by[("ours", "full")]["peak_bytes"] >= grad_bytes
    ours = by[("ours", "full")]
    assert ours["loss_reldiff_vs_eager"] < 1e-4 and ours["grad_reldiff_vs_eager"] < 1e-3
    assert ours["speedup_vs_eager"] == pytest.approx(by[("eager", "full")]["time_ms_p50"] / ours["time_ms_p50"])

    lines = grid.target_lines(records, plan.grid.targets)
    assert len(lines) == 4
    assert lines[0].startswith("askd_loss N=32 V=256 fp32, full: % of copy bandwidth ")
    assert all(line.endswith((" ok", " MISS")) for line in lines[:2] + lines[3:])
    assert "speed-up vs compile n/a" in lines[2]  # compile did not run
    section = "\n".join(plot.targets_markdown(records))
    assert section.startswith("## Targets") and "informational" in section


def test_targets_are_checked_against_the_bound():
    def row(mode, **values):
        return {**dict.fromkeys(results.FIELDS), "provider": "ours", "op": "askd_loss", "mode": mode, "model": "qwen2",
                "tokens": 16384, "vocab": 151936, "dtype": "bf16", "status": "ok", **values}

    records = [row("full", pct_of_copy=85.0, speedup_vs_eager=3.0, speedup_vs_compile=None),
               row("forward", peak_bytes_per_token=40.0)]
    lines = grid.target_lines(records, grid.ASKD_CORE_TARGETS)
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["ok", "MISS", "ok)", "ok"]
    assert lines[2].endswith("speed-up vs compile n/a (ours: ok)")
    assert "85.00% (target >= 80%)" in lines[0] and "40.00 (target <= 64)" in lines[3]
    (first, *_rest) = grid.target_lines([], grid.ASKD_CORE_TARGETS)
    assert first == "askd_loss, full: % of copy bandwidth n/a (no record of ours)"


def test_cpu_default_headline_is_the_embedded_case():
    plan = grid.plan_grid("askd-core", device="cpu", providers=["eager"], modes=["full"])
    (shape,) = plan.shapes["askd_loss"]
    assert (shape.batch, shape.seq, shape.vocab, plan.dtypes) == (2, 128, 8192, ["fp32"])
    (record,) = grid.run_grid(plan, rep_ms=20, progress=False, log=None)
    assert record["grid"] == "askd-core-cpu" and (record["batch"], record["seq"], record["vocab"]) == (2, 128, 8192)
    assert record["status"] == "ok" and _positive_finite(record["time_ms_p50"])


def test_cli_appends_records(tmp_path, capsys):
    args = ["--grid", "askd-core", "--device", "cpu", "--batch", "2", "--tokens", "16", "--vocab", "128",
            "--providers", "eager", "--modes", "full", "--rep-ms", "10", "--no-save", "--no-progress"]
    for name in ("r.jsonl", "r.csv"):
        out = tmp_path / name
        assert cli.main(args + ["--out", str(out)]) == 0
        first = out.read_text()
        results.append_records(out, [dict.fromkeys(results.FIELDS, 1)])  # appends, no second CSV header
        assert out.read_text().startswith(first)
        if name.endswith(".csv"):
            rows = list(csv.DictReader(out.open()))
        else:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 2 and list(rows[0]) == list(results.FIELDS)
        assert rows[0]["provider"] == "eager" and float(rows[0]["time_ms_p50"]) > 0
        assert rows[0]["torch"] == torch.__version__ and rows[0]["date"] and rows[0]["grid"] == "askd-core-cpu"
    out = capsys.readouterr().out
    assert "## Targets" in out and "askd_loss, full: speed-up vs eager n/a (no record of ours)" in out
    assert cli.main(["--case", "askd-core", "--device", "cpu", "--list"]) == 0  # --case: the same option
    assert "grid askd-core-cpu on cpu" in capsys.readouterr().out


def test_cli_rejects_bad_arguments():
    planning = (["--grid", "askd-core", "--providers", "eager,nope"],
                ["--grid", "askd-core", "--batch", "3", "--tokens", "10"],  # not a multiple of batch
                ["--grid", "tiny", "--ops", "nope"], ["--grid", "tiny", "--modes", "sideways"],
                ["--grid", "tiny", "--dtype", "fp8"], ["--grid", "tiny", "--models", "gpt5"],
                ["--grid", "tiny", "--tokens", "3"], ["--grid", "nope"])
    running = (["--grid", "tiny", "--rep-ms", "0"], ["--grid", "tiny", "--ignore-frac", "1"])
    for bad in [[*args, "--list"] for args in planning] + [[*args, "--no-save"] for args in running]:
        with pytest.raises(SystemExit):
            cli.main(["--device", "cpu", "--no-progress", *bad])


def test_default_results_folder_is_untracked():
    default = results.results_dir(torch.device("cpu"), "AMD EPYC 7B13")
    repo = Path(results.__file__).resolve().parent.parent
    assert default == repo / "build" / "bench-results" / "cpu" / "amd-epyc-7b13"  # build/ is in .gitignore
    assert "build/" in (repo / ".gitignore").read_text().split()


# ----------------------------------------------------------------------------------------------
# the grid

GRID_OPS = ["askd", "fkl", "from_hidden"]


def _failing_providers(monkeypatch):
    """'compile' raises a CUDA-style out-of-memory error on its first call (no compilation here);
    'liger' of askd_loss_from_hidden raises an unexpected error; the other liger cells are unavailable."""
    real = ops.Op.loss_fn

    def loss_fn(self, provider, device):
        if provider == "compile":
            def oom(_case):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.10 GiB")

            return oom
        if provider == "liger" and self.family == "hidden":
            def broken(_case):
                raise RuntimeError("not supported here")

            return broken
        return real(self, provider, device)

    monkeypatch.setattr(ops.Op, "loss_fn", loss_fn)


def test_grid_end_to_end_on_toy_shapes(tmp_path, monkeypatch):
    _failing_providers(monkeypatch)
    plan = grid.plan_grid("tiny", device="cpu", ops=GRID_OPS, providers=["ours", "eager", "compile", "liger"])
    assert [op.id for op in plan.ops] == [o.id for o in ops.resolve_ops(GRID_OPS)] == \
        ["askd_loss", "divergence_loss:fkl", "askd_loss_from_hidden"]
    threads = torch.get_num_threads()
    records = grid.run_grid(plan, outputs=[tmp_path / results.RESULTS_FILE], progress=False, log=None)
    assert torch.get_num_threads() == threads  # the grid's one thread is restored
    n_shapes = len(grid.GRIDS["tiny"].shapes)
    assert len(records) == len(plan.ops) * n_shapes * 4 * 3
    by = {(r["op"], r["kind"], r["provider"], r["mode"], r["tokens"], r["vocab"]): r for r in records}
    assert len(by) == len(records)
    for r in records:
        assert set(r) == set(results.FIELDS)
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["date"] and r["git_commit"]
        if r["provider"] == "compile":
            assert r["status"] == "OOM" and "out of memory" in r["error"] and r["time_ms_p50"] is None
        elif r["provider"] == "liger" and r["op"] == "askd_loss_from_hidden":
            assert r["status"] == "failed" and "first call: RuntimeError: not supported here" == r["error"]
        elif r["provider"] == "liger":
            assert r["status"] == "unavailable" and r["error"]  # not installed, CPU, or no such loss
        else:
            assert r["status"] == "ok", r["error"]
            assert 0 < r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
            assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0
            assert _positive_finite(r["gbps"]) and _positive_finite(r["pct_of_copy"])
            assert _positive_finite(r["speedup_vs_eager"]) and _positive_finite(r["speedup_vs_ours"])
            assert r["loss_reldiff_vs_eager"] < 1e-3 and r["grad_reldiff_vs_eager"] < 1e-2
            if r["op"] == "askd_loss_from_hidden":
                assert _positive_finite(r["tflops"]) and r["hidden"] == 32
    # the roofline: full = forward + backward; the gradient is counted in the full step's memory
    r = by[("askd_loss", "", "eager", "full", 16, 256)]
    assert r["bytes_moved"] == 4 * 16 * 256 * 4
    assert r["peak_bytes"] >= 16 * 256 * 4
    assert by[("divergence_loss", "fkl", "ours", "full", 16, 256)]["bytes_moved"] == 5 * 16 * 256 * 4

    # the CSV: appended per group, read back with types
    back = results.read_records(tmp_path)
    assert len(back) == len(records)
    assert {(b["op"], b["provider"], b["mode"], b["tokens"]) for b in back} == \
        {(r["op"], r["provider"], r["mode"], r["tokens"]) for r in records}
    assert all(isinstance(b["tokens"], int) for b in back)

    # the summary and the plots
    written = plot.render(tmp_path, log=None)
    summary = (tmp_path / "summary.md").read_text()
    assert "| model | tokens | vocab |" in summary and "ours × eager" in summary
    assert "OOM" in summary and "compile: OOM" in summary and "liger: unavailable" in summary
    assert "liger: failed" in summary
    assert "## Forward" in summary and "## Backward" in summary and "## Targets" not in summary  # tiny has none
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written == [tmp_path / "summary.md"]
    else:
        pngs = [p for p in written if p.suffix == ".png"]
        assert len(pngs) == len(plan.ops)
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        assert f"]({pngs[0].name})" in summary


def test_grid_budget_skips_the_rest():
    plan = grid.plan_grid("tiny", device="cpu", ops=["askd"], providers=["eager"], modes=["full"])
    records = grid.run_grid(plan, budget_s=1e-9, progress=False, log=None)
    assert records and all(r["status"] == "skipped" and "budget" in r["error"] for r in records)


def test_grid_cli_writes_results_summary_and_plots(tmp_path, capsys):
    args = ["--device", "cpu", "--grid", "tiny", "--ops", "askd", "--providers", "ours,eager", "--modes", "full",
            "--tokens", "8", "--models", "toy256,toy512", "--results-dir", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "### askd_loss (fp32)" in out and "| toy-512 | 8 | 512 |" in out and "## Targets" not in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "summary.md").exists()
    assert cli.main(args + ["--no-plot"]) == 0  # a second run appends, and summarises the latest
    rows = results.read_records(tmp_path)
    assert len({r["run_id"] for r in rows}) in (1, 2) and len(rows) == 2 * 2 * 2
    assert plot.main([str(tmp_path), "--no-plots"]) == 0
    root = tmp_path / "root"
    assert cli.main(["--device", "cpu", "--grid", "tiny", "--ops", "askd", "--providers", "eager", "--modes", "full",
                     "--results-root", str(root), "--no-plot", "--no-progress"]) == 0
    assert [p.relative_to(root).parts[0] for p in root.glob("*/*/results.csv")] == ["cpu"]
    assert cli.main(["--device", "cpu", "--list"]) == 0
    assert "askd_loss" in capsys.readouterr().out


def test_committed_results_stay_readable():
    for csv_file in results.RESULTS_ROOT.glob(f"*/*/{results.RESULTS_FILE}"):
        records = plot.select_run(results.read_records(csv_file.parent))
        assert records and set(records[0]) == set(results.FIELDS)
        assert "## Full step" in plot.summary_markdown(records)


def test_results_paths_and_schema_changes(tmp_path):
    cpu_dir = results.results_dir(torch.device("cpu"), "AMD EPYC 7B13", root=tmp_path)
    assert cpu_dir == tmp_path / "cpu" / "amd-epyc-7b13"
    assert results.results_dir(torch.device("cuda"), "NVIDIA H100 80GB HBM3", root=tmp_path) == \
        tmp_path / "gpu" / "nvidia-h100-80gb-hbm3"
    path = tmp_path / "results.csv"
    path.write_text("old,header\n1,2\n")
    written = results.append_records(path, [dict.fromkeys(results.FIELDS, 1)])
    assert written.name == "results.1.csv" and path.read_text() == "old,header\n1,2\n"
    assert results.append_records(path, [dict.fromkeys(results.FIELDS, 2)]) == written


def test_gross_disagreement_with_eager_is_a_mismatch():
    def row(provider, loss, p50):
        return {**dict.fromkeys(results.FIELDS), "provider": provider, "mode": "full", "status": "ok",
                "dtype": "bf16", "loss": loss, "time_ms_p50": p50, "bytes_moved": 100, "tokens": 1, "copy_gbps": 1.0}

    group = [row("eager", 1.0, 2.0), row("liger", 0.0, 1.0), row("ours", 1.001, 0.5)]
    grid.derive(group, {})
    assert [r["status"] for r in group] == ["ok", "mismatch", "ok"]
    assert "loss differs" in group[1]["error"]
    assert group[2]["speedup_vs_eager"] == 4.0 and group[2]["speedup_vs_liger"] == 2.0
    assert group[2]["gbps"] == 100 / 0.5e-3 / 1e9 and group[2]["pct_of_copy"] == 100.0 * group[2]["gbps"]


# ---- whole processes: python -m bench process ------------------------------------------------------

def test_process_benchmark_end_to_end(tmp_path, capsys):
    """Two toy cells as whole processes, ours and eager interleaved: records in the CSV with the
    environment, the process's peak resident memory, and a summary table of medians and ratios."""
    out = tmp_path / "process.csv"
    assert cli.main(["process", "--ops", "askd,fkl", "--tokens", "32", "--vocab", "256", "--dtype", "fp32",
                     "--threads", "1", "--batch", "2", "--reps", "1", "--steps", "2", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["provider"]) for r in rows] == [("askd_loss", "ours"), ("askd_loss", "eager"),
                                                         ("divergence_loss:fkl", "ours"),
                                                         ("divergence_loss:fkl", "eager")]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert (r["tokens"], r["vocab"], r["dtype"], r["threads"], r["steps"]) == ("32", "256", "fp32", "1", "2")
        assert float(r["process_s"]) > float(r["first_step_s"]) > 0 and float(r["steady_step_s"]) > 0
        assert int(r["peak_rss_kib"]) >= int(r["rss_inputs_kib"]) > 0
        assert r["torch"] == torch.__version__ and r["git_commit"] and r["date"]
    losses = {(r["op"], r["provider"]): float(r["loss"]) for r in rows}
    assert losses[("askd_loss", "ours")] == pytest.approx(losses[("askd_loss", "eager")], rel=1e-4, abs=1e-5)
    text = capsys.readouterr().out
    assert "| askd_loss | 32 × 256 | fp32 | 1 | ours | 1 |" in text


def test_process_summary_medians_and_ratios():
    def rec(provider, process_s, step, peak, rep):
        return dict(run_id="r", op="askd_loss", provider=provider, tokens=8, vocab=16, dtype="bf16", threads=2,
                    status="ok", rep=rep, process_s=process_s, steady_step_s=step, first_step_s=step,
                    peak_rss_kib=peak, rss_inputs_kib=1)

    records = [rec("ours", 1.0, 0.1, 100, 0), rec("ours", 9.0, 0.3, 100, 1), rec("ours", 2.0, 0.2, 100, 2),
               rec("eager", 4.0, 1.0, 400, 0), rec("eager", 4.0, 1.0, 400, 1),
               rec("compile", 8.0, 0.4, 200, 0), {**rec("compile", 1.0, 0.01, 1, 1), "status": "failed"}]
    rows = {r["provider"]: r for r in grid.process_summary(records)}
    assert rows["ours"]["process_s"] == 2.0 and rows["ours"]["steady_step_s"] == 0.2  # medians
    assert rows["ours"]["process_vs_eager"] == 0.5 and rows["ours"]["peak_vs_eager"] == 0.25
    assert rows["ours"]["step_vs_compile"] == pytest.approx(0.5)  # the failed run is not counted
    assert rows["compile"]["runs"] == 1 and rows["eager"]["step_vs_eager"] == 1.0
    assert "| askd_loss | 8 × 16 | bf16 | 2 | ours | 3 |" in grid.process_markdown(records)


def test_latest_run_per_op_keeps_each_ops_newest_run():
    """A later run that re-measured only some ops keeps the other ops' rows of the earlier run."""
    def rec(run_id, op, kind=""):
        return {"run_id": run_id, "op": op, "kind": kind}
    records = [rec("T1", "askd_loss"), rec("T1", "divergence_loss", "fkl"), rec("T1", "divergence_loss", "jsd"),
               rec("T2", "divergence_loss", "fkl"), rec("T2", "divergence_loss", "fkl")]
    got = [(r["run_id"], r["op"], r["kind"]) for r in results.latest_run_per_op(records)]
    assert got == [("T1", "askd_loss", ""), ("T1", "divergence_loss", "jsd"), ("T2", "divergence_loss", "fkl"),
                   ("T2", "divergence_loss", "fkl")]
    assert plot.select_run(records, "latest-per-op") == results.latest_run_per_op(records)
    assert [r["run_id"] for r in plot.select_run(records)] == ["T2", "T2"]

