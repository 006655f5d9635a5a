"""Shared by the benchmarks: interleaved timing, machine facts, and rewriting one section of docs/PERFORMANCE.md."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PERFORMANCE_DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The goals of the performance issues, in the order of the summary table: key, measure, goal, command.
GOALS: list[tuple[str, str, str, str]] = [
    (
        "train_eager",
        "training step images/s vs timm, eager (CPU: Ti/16, S/16, B/16 at 224)",
        "≥ 1.0×",
        "python bench/model.py",
    ),
    (
        "train_compile",
        "training step images/s vs timm, `torch.compile` (the default mode)",
        "≥ 1.2×",
        "python bench/model.py",
    ),
    ("inference", "inference images/s vs timm and torchvision", "≥ 1.0×", "python bench/model.py"),
    (
        "mfu",
        "model-FLOP utilisation of the training step vs measured GEMM throughput",
        "≥ 75% for B/16",
        "python bench/model.py",
    ),
    ("loader", "shard loader vs torchvision ImageFolder + PIL", "≥ 2×", "python bench/data.py"),
    ("s3", "S3 streaming vs local reading", "≥ 0.8×", "python bench/data.py"),
    ("engine", "engine step vs a bare training loop", "≤ 5% overhead", "python bench/engine.py"),
    (
        "pipeline",
        "orchestration + tracking overhead in `vitflow run demo`",
        "≤ 10% of wall",
        "python bench/pipeline.py",
    ),
    ("rerun", "unchanged re-run of the demo", "≤ 20 s", "python bench/pipeline.py"),
    (
        "pipeline-simulated",
        "benchmark flow makespan vs its critical path, simulated stage durations",
        "≤ 1.1×",
        "python bench/pipeline.py --simulate",
    ),
    (
        "fewshot",
        "few-shot feature extraction; ridge solve, 1,000 classes × 25 shots",
        "solve ≤ 2 s",
        "python bench/fewshot.py",
    ),
    (
        "memory",
        "peak training memory per model size, with and without gradient checkpointing",
        "reported",
        "python bench/memory.py",
    ),
    (
        "gpu",
        "GPU: ViT-B/16 and L/16 training at 224, bf16 eager and `torch.compile`",
        "≥ 45% MFU for B/16 on H100/H200",
        "python bench/gpu_check.py (one CUDA GPU)",
    ),
]


def machine_line() -> str:
    """One line naming the machine and versions a table was measured on."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads "
        f"({cpu_matmul_gflops():.0f} GFLOP/s fp32 matmul), {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


@functools.cache  # one figure per process: the record and the table beside it name the same machine
def cpu_matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """The CPU's float32 1024 x 1024 matrix-product throughput on torch's threads, so that tables measured on
    machines of one description can be compared: two 2-CPU "AMD EPYC" machines trained the demo 4x apart."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available, else cpu"
    )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def interleaved(candidates: dict[str, Callable[[], float]], rounds: int = 5) -> dict[str, list[float]]:
    """Call each candidate once per round, in turn (A B C A B C ...), so drift hits all alike.

    Each callable returns its own measurement (e.g. images/s); returns every measurement per candidate.
    """
    results: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            results[name].append(fn())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls (synchronising CUDA when in use)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(section: str, body: str, doc: Path = PERFORMANCE_DOC) -> None:
    """Replace the text between ``<!-- bench:SECTION -->`` and ``<!-- /bench:SECTION -->`` (appending if absent)."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + f"\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def save_results(bench: str, goals: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Record one bench's figures for the summary table: ``goals`` maps a key of :data:`GOALS` to
    ``{"figure": str, "met": bool | None, "note": str}`` (``met`` None: reported only, or not measured)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {"bench": bench, "date": today(), "machine": machine_line(), "goals": goals, **(extra or {})}
    (RESULTS_DIR / f"{bench}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def summary_section() -> str:
    """The goal-by-goal summary, from every bench's recorded figures (``bench/results/*.json``)."""
    figures: dict[str, tuple[dict[str, Any], str]] = {}
    for path in sorted(RESULTS_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        for key, entry in record["goals"].items():
            figures[key] = (entry, record["date"])
    rows = []
    for key, measure, goal, command in GOALS:
        entry, date = figures.get(key, ({"figure": "not measured yet", "met": None, "note": ""}, ""))
        status = {True: "met", False: "**not met**", None: "reported"}[entry["met"]]
        if entry["figure"].startswith("not measured"):
            status = "not measured"
        note = f" ({entry['note']})" if entry.get("note") else ""
        rows.append([measure, goal, entry["figure"], status + note, f"`{command}`", date])
    table = markdown_table(["measure", "goal", "measured (medians)", "status", "command", "measured on"], rows)
    return (
        "## Summary\n\nEvery figure below comes from `make bench` (= `python bench/run_all.py`), which runs each "
        "script in `bench/` in a fresh process and rewrites its section of this file; medians of interleaved runs, "
        "ratios against the named baseline. Details, with the exact command of each row, are in the sections "
        "below.\n\n" + table
    )


def write_summary() -> None:
    update_section("summary", summary_section())
