"""The benchmark runs end to end on CPU and reports sane numbers (no timing thresholds here)."""
import csv
import json
import math

import pytest
import torch

from bench import runner


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
    args = ["--device", "cpu", "--batch", "2", "--tokens", "16", "--vocab", "128", "--providers", "eager",
            "--rep-ms", "10"]
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
        runner.main(["--device", "cpu", "--providers", "eager,nope"])
    with pytest.raises(SystemExit):
        runner.main(["--device", "cpu", "--batch", "3", "--tokens", "10"])
