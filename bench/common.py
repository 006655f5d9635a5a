"""Shared by the benchmarks: interleaved timing, machine facts, and rewriting one section of docs/PERFORMANCE.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

PERFORMANCE_DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


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
        f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


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
