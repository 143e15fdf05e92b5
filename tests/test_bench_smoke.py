"""The benchmark runs end to end on CPU and reports sane numbers (no timing thresholds here).

The single case (``python -m bench --case askd-core``) and the grid (``python -m bench``) on toy
shapes: records, out-of-memory and unavailable providers recorded as such, the time budget, the
CSV files, the markdown summary and the plots.
"""
import csv
import json
import math

import pytest
import torch

from bench import grid, ops, plot, results, runner


def _ours_importable() -> bool:
    try:
        import askd_kernels

        askd_kernels.askd_loss
    except (ImportError, AttributeError):
        return False
    return True


PROVIDERS = ("eager", "ours") if _ours_importable() else ("eager",)
TINY = dict(device="cpu", batch=2, tokens=32, vocab=256, rep_ms=20, log=None)


def _positive_finite(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def test_tiny_cpu_run_reports_finite_numbers():
    records = runner.run(providers=PROVIDERS, ignore_frac=0.25, **TINY)
    assert [r["provider"] for r in records] == list(PROVIDERS)
    grad_bytes = 32 * 256 * 4
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert set(r) == set(runner.FIELDS)
        for key in ("time_ms_p20", "time_ms_p50", "time_ms_p80", "gbps", "pct_of_copy", "copy_gbps",
                    "ours_speedup" if "ours" in PROVIDERS else "gbps", "first_call_s"):
            assert _positive_finite(r[key]), (r["provider"], key, r[key])
        assert r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
        assert r["bytes_moved"] == 4 * 32 * 256 * 4
        assert math.isfinite(r["loss"])
        # Peak memory is measured (profiler allocation events), so it must see at least the gradient.
        assert r["fwd_peak_bytes"] is not None and r["fwd_peak_bytes"] >= 0
        assert r["fwdbwd_peak_bytes"] >= grad_bytes
        assert r["fwd_bytes_per_token"] == r["fwd_peak_bytes"] / 32
    if "ours" in PROVIDERS:
        ours = records[PROVIDERS.index("ours")]
        assert ours["loss_absdiff_vs_eager"] < 1e-4
        assert ours["grad_reldiff_vs_eager"] < 1e-3


def test_cpu_default_case_is_the_embedded_one():
    (record,) = runner.run(device="cpu", providers=("eager",), rep_ms=20, log=None)
    default = runner.CASES["askd-core"]["cpu"]
    assert record["cpu_default"] is True
    assert (record["batch"], record["seq"], record["vocab"], record["dtype"]) == (
        default["batch"], default["seq"], default["vocab"], default["dtype"])
    assert record["status"] == "ok" and _positive_finite(record["time_ms_p50"])


def test_failing_providers_are_recorded_and_the_run_goes_on(monkeypatch):
    def oom(_x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.28 GiB")

    def broken(_x):
        raise RuntimeError("not supported here")

    def missing():
        raise ImportError("No module named 'askd_kernels'")

    monkeypatch.setitem(runner.PROVIDERS, "oom", lambda: oom)
    monkeypatch.setitem(runner.PROVIDERS, "broken", lambda: broken)
    monkeypatch.setitem(runner.PROVIDERS, "missing", missing)
    lines = []
    records = runner.run(providers=("oom", "broken", "missing", "eager"), **{**TINY, "log": lines.append})
    status = {r["provider"]: r["status"] for r in records}
    assert status == {"oom": "OOM", "broken": "failed", "missing": "unavailable", "eager": "ok"}
    assert "not supported here" in records[1]["error"]
    assert records[0]["time_ms_p50"] is None and records[3]["time_ms_p50"] > 0
    assert "OOM" in "\n".join(lines)


def test_cli_appends_records(tmp_path):
    args = ["--case", "askd-core", "--device", "cpu", "--batch", "2", "--tokens", "16", "--vocab", "128",
            "--providers", "eager", "--rep-ms", "10"]
    for name in ("r.jsonl", "r.csv"):
        out = tmp_path / name
        assert runner.main(args + ["--out", str(out)]) == 0
        first = out.read_text()
        runner.write_records(out, [dict.fromkeys(runner.FIELDS, 1)])  # appends, no second CSV header
        assert out.read_text().startswith(first)
        if name.endswith(".csv"):
            rows = list(csv.DictReader(out.open()))
        else:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 2
        assert rows[0]["provider"] == "eager" and float(rows[0]["time_ms_p50"]) > 0
        assert rows[0]["torch"] == torch.__version__ and rows[0]["date"]


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        runner.main(["--case", "askd-core", "--device", "cpu", "--providers", "eager,nope"])
    with pytest.raises(SystemExit):
        runner.main(["--case", "askd-core", "--device", "cpu", "--batch", "3", "--tokens", "10"])
    with pytest.raises(SystemExit):
        runner.main(["--device", "cpu", "--grid", "tiny", "--ops", "nope", "--list"])
    with pytest.raises(SystemExit):
        runner.main(["--device", "cpu", "--grid", "tiny", "--providers", "nope", "--list"])
    with pytest.raises(SystemExit):
        runner.main(["--device", "cpu", "--grid", "tiny", "--tokens", "3", "--list"])  # not a multiple of batch


# ----------------------------------------------------------------------------------------------
# the grid

GRID_OPS = ["askd", "fkl", "from_hidden"]


def _grid_oom_provider(monkeypatch):
    """'compile' raises a CUDA-style out-of-memory error on its first call (no compilation here)."""
    real = ops.Op.loss_fn

    def loss_fn(self, provider, device):
        if provider == "compile":
            def oom(_case):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.10 GiB")

            return oom
        return real(self, provider, device)

    monkeypatch.setattr(ops.Op, "loss_fn", loss_fn)


def test_grid_end_to_end_on_toy_shapes(tmp_path, monkeypatch):
    _grid_oom_provider(monkeypatch)
    plan = grid.plan_grid("tiny", device="cpu", ops=GRID_OPS, providers=["ours", "eager", "compile", "liger"])
    assert [op.id for op in plan.ops] == [o.id for o in ops.resolve_ops(GRID_OPS) if o.available()]
    threads = torch.get_num_threads()
    records = grid.run_grid(plan, out_dir=tmp_path, progress=False, log=None)
    assert torch.get_num_threads() == threads  # the grid's one thread is restored
    n_shapes = len(grid.GRIDS["tiny"].shapes)
    assert len(records) == len(plan.ops) * n_shapes * 4 * 3
    by = {(r["op"], r["kind"], r["provider"], r["mode"], r["tokens"], r["vocab"]): r for r in records}
    assert len(by) == len(records)
    for r in records:
        assert set(r) == set(results.GRID_FIELDS)
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["date"] and r["git_commit"]
        if r["provider"] == "compile":
            assert r["status"] == "OOM" and "out of memory" in r["error"] and r["time_ms_p50"] is None
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
    if "divergence_loss" in {op.function for op in plan.ops}:
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
    assert "## Forward" in summary and "## Backward" in summary
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written == [tmp_path / "summary.md"]
    else:
        pngs = [p for p in written if p.suffix == ".png"]
        assert len(pngs) == len(plan.ops)
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        assert f"]({pngs[0].name})" in summary


def test_grid_budget_skips_the_rest(tmp_path):
    plan = grid.plan_grid("tiny", device="cpu", ops=["askd"], providers=["eager"], modes=["full"])
    records = grid.run_grid(plan, budget_s=1e-9, progress=False, log=None)
    assert records and all(r["status"] == "skipped" and "budget" in r["error"] for r in records)


def test_grid_cli_writes_results_summary_and_plots(tmp_path, capsys):
    args = ["--device", "cpu", "--grid", "tiny", "--ops", "askd", "--providers", "ours,eager", "--modes", "full",
            "--tokens", "8", "--models", "toy256,toy512", "--results-dir", str(tmp_path), "--no-progress"]
    assert runner.main(args) == 0
    out = capsys.readouterr().out
    assert "askd_loss (fp32), full step:" in out and "| toy-512 | 8 | 512 |" in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "summary.md").exists()
    assert runner.main(args + ["--no-plot"]) == 0  # a second run appends, and summarises the latest
    rows = results.read_records(tmp_path)
    assert len({r["run_id"] for r in rows}) in (1, 2) and len(rows) == 2 * 2 * 2
    assert plot.main([str(tmp_path), "--no-plots"]) == 0
    assert runner.main(["--device", "cpu", "--list"]) == 0
    assert "askd_loss" in capsys.readouterr().out


def test_results_paths_and_schema_changes(tmp_path):
    assert results.results_dir(torch.device("cpu"), "AMD EPYC 7B13", root=tmp_path) == tmp_path / "cpu" / "amd-epyc-7b13"
    assert results.results_dir(torch.device("cuda"), "NVIDIA H100 80GB HBM3", root=tmp_path) == \
        tmp_path / "gpu" / "nvidia-h100-80gb-hbm3"
    path = tmp_path / "results.csv"
    path.write_text("old,header\n1,2\n")
    written = results.append_records(path, [dict.fromkeys(results.GRID_FIELDS, 1)])
    assert written.name == "results.1.csv" and path.read_text() == "old,header\n1,2\n"
    assert results.append_records(path, [dict.fromkeys(results.GRID_FIELDS, 2)]) == written


def test_gross_disagreement_with_eager_is_a_mismatch():
    def row(provider, loss, p50):
        return {**dict.fromkeys(results.GRID_FIELDS), "provider": provider, "mode": "full", "status": "ok",
                "dtype": "bf16", "loss": loss, "time_ms_p50": p50, "bytes_moved": 100, "tokens": 1}

    group = [row("eager", 1.0, 2.0), row("liger", 0.0, 1.0), row("ours", 1.001, 0.5)]
    grid.derive(group, {}, copy_gbps=1.0)
    assert [r["status"] for r in group] == ["ok", "mismatch", "ok"]
    assert "loss differs" in group[1]["error"]
    assert group[2]["speedup_vs_eager"] == 4.0 and group[2]["speedup_vs_liger"] == 2.0
