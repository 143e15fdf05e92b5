"""Where results go and what a record holds: the environment, the CSV files, reading them back.

Every run appends its records to ``<root>/<cpu|gpu>/<device>/results.csv`` (CPU results are kept apart
from GPU ones; ``<device>`` is a slug of the device name), one row per op × provider × mode × shape ×
dtype (``FIELDS``), each carrying the grid's name, the device name, torch/triton versions, git commit,
date and the run's id. ``<root>`` is ``build/bench-results`` (ignored by git) unless asked otherwise;
the committed results live under ``bench/results`` (``python -m bench --results-root bench/results``).
``python -m bench.plot`` turns the latest run of such a folder into PNG plots and ``summary.md``.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"  # committed results
LOCAL_ROOT = Path(__file__).resolve().parent.parent / "build" / "bench-results"  # the default: untracked
RESULTS_FILE = "results.csv"

FIELDS = (
    "run_id", "grid", "op", "kind", "provider", "mode", "model", "batch", "seq", "tokens", "vocab", "hidden",
    "dtype", "ignore_frac", "status", "error", "time_ms_p20", "time_ms_p50", "time_ms_p80", "reps",
    "first_call_s", "peak_bytes", "peak_bytes_per_token", "bytes_moved", "gbps", "copy_gbps", "pct_of_copy",
    "flops", "tflops", "speedup_vs_ours", "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_liger",
    "mem_ratio_vs_eager", "loss", "loss_reldiff_vs_eager", "grad_reldiff_vs_eager",
    "device", "device_name", "torch", "triton", "cuda", "python", "threads", "git_commit", "date",
)
INT_FIELDS = {"batch", "seq", "tokens", "vocab", "hidden", "reps", "peak_bytes", "bytes_moved", "flops",
              "threads"}
STR_FIELDS = {"run_id", "grid", "op", "kind", "provider", "mode", "model", "dtype", "status", "error", "device",
              "device_name", "torch", "triton", "cuda", "python", "git_commit", "date"}


def git_commit() -> str:
    """Short commit of the source tree (``-dirty`` with uncommitted changes); ``BENCH_GIT_COMMIT``
    when there is no repository (e.g. a copy of the working tree sent to a GPU machine)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return os.environ.get("BENCH_GIT_COMMIT", "unknown")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
    }


def slug(text: str, limit: int = 48) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    text = re.sub(r"\((?:r|tm|c)\)", "", text.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:limit].rstrip("-") or "device"


def results_dir(device: torch.device, name: str | None = None, root: Path | str = LOCAL_ROOT) -> Path:
    """``<root>/<cpu|gpu>/<slug of the device name>``."""
    kind = "gpu" if device.type == "cuda" else "cpu"
    return Path(root) / kind / slug(name or device_name(device))


def append_records(path: str | os.PathLike, records: list[dict], fields=FIELDS) -> Path:
    """Append records to ``path``: CSV if it ends in .csv (header on a new file), else JSON lines.

    A CSV whose header is not ``fields`` (an older schema) is left alone: the records go to
    ``<stem>.<n>.csv`` instead, the first such name that is free or has the same header. Returns
    the file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        n = 1
        while path.exists() and path.stat().st_size > 0:
            with path.open(encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
            if header == list(fields):
                break
            path = path.with_name(f"{path.name.split('.')[0]}.{n}.csv")
            n += 1
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({k: r.get(k) for k in fields} for r in records)
    else:
        with path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({k: r.get(k) for k in fields}) + "\n")
    return path


def _parse(key: str, value):
    if value is None or value == "":
        return None
    if key in STR_FIELDS or not isinstance(value, str):
        return value
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value) if key in INT_FIELDS else float(value)
    except ValueError:
        return value


def read_records(source: str | os.PathLike) -> list[dict]:
    """Records from a results folder (every ``results*.csv`` and ``*.jsonl`` in it) or one file."""
    source = Path(source)
    files = sorted(source.glob("results*.csv")) + sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    records = []
    for file in files:
        with file.open(encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f) if file.suffix.lower() == ".csv" else (json.loads(l) for l in f if l.strip())
            for row in rows:
                records.append({k: _parse(k, v) for k, v in row.items() if k is not None})
    return records


def latest_run(records: list[dict]) -> list[dict]:
    """The records of the most recent run id (ids are UTC timestamps, so they sort by time)."""
    ids = sorted({r.get("run_id") for r in records if r.get("run_id")})
    return [r for r in records if r.get("run_id") == ids[-1]] if ids else []


def latest_run_per_op(records: list[dict]) -> list[dict]:
    """For every op (a divergence: every kind), the records of the most recent run that holds it — a
    folder whose later runs re-measured only some ops — in the file's order."""
    latest: dict = {}
    for r in records:
        key, run_id = (r.get("op"), r.get("kind") or ""), r.get("run_id")
        if run_id and run_id > latest.get(key, ""):
            latest[key] = run_id
    return [r for r in records if r.get("run_id") and latest.get((r.get("op"), r.get("kind") or "")) == r["run_id"]]
