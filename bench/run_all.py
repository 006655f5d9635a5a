"""``make bench``: every benchmark in ``bench/``, each in a fresh process, then the header and the goal summary.

Each script prints its tables and rewrites its own ``<!-- bench:NAME -->`` section of docs/PERFORMANCE.md and its
figures in ``bench/results/NAME.json``; this script writes the ``header`` section (machine, versions, date, the
command, each script's duration and the load average around it) and the ``summary`` table at the top.

    python bench/run_all.py [--quick] [--only NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PERFORMANCE_DOC,
    machine_line,
    markdown_table,
    summary_section,
    today,
    update_section,
    write_summary,
)

BENCHES = ["model", "engine", "fewshot", "memory", "data", "pipeline"]
PACKAGES = ["torch", "torchvision", "timm", "numpy", "scipy", "prefect", "mlflow"]


def reserve_sections(sections: list[str], doc: Path = PERFORMANCE_DOC) -> None:
    """Make sure every section exists, the missing ones right under the title in this order (so the header and
    the summary come first, then each bench's section in the order they run)."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    missing = [s for s in sections if f"<!-- bench:{s} -->" not in text]
    if not missing:
        return
    blocks = "".join(f"<!-- bench:{s} -->\n<!-- /bench:{s} -->\n\n" for s in missing)
    title = re.match(r"# [^\n]*\n+", text)
    at = title.end() if title else 0
    doc.write_text(text[:at] + blocks + text[at:])


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: each script's --quick")
    parser.add_argument("--only", nargs="+", choices=BENCHES, help="run only these scripts")
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    args = parser.parse_args()
    flags = (["--quick"] if args.quick else []) + (["--no-write"] if args.no_write else [])
    if not args.no_write:
        reserve_sections(["header", "summary", *(args.only or BENCHES)])
    started = today()
    rows, failed = [], []
    for name in args.only or BENCHES:
        print(f"\n=== bench/{name}.py {' '.join(flags)}", flush=True)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(Path(__file__).parent / f"{name}.py"), *flags])
        minutes = (time.perf_counter() - start) / 60
        if code:
            failed.append(name)
        status = "ok" if code == 0 else f"**failed** (exit {code})"
        rows.append(
            [f"`python bench/{name}.py`", f"{minutes:.1f} min", f"{load_before:.1f} → {os.getloadavg()[0]:.1f}", status]
        )
    command = "make bench" + (" (--quick)" if args.quick else "")
    body = (
        "## How these figures were made\n\n"
        f"`{command}` = `python bench/run_all.py{' --quick' if args.quick else ''}`, started {started}.\n\n"
        f"Machine: {machine_line()}.\n\nVersions: {versions()}.\n\n"
        "Each script ran in its own process; timings are medians of interleaved rounds (the candidates of a "
        "table alternate, so drift and other load hit all of them alike) and comparisons are ratios. The 1-minute "
        "load average before and after each script shows how busy the machine was.\n\n"
        + markdown_table(["script", "duration", "load average", "status"], rows)
        + "\n\nTo redo one table: `python bench/NAME.py` (each takes `--quick` for a smoke run and `--no-write` to "
        "leave this file alone); `make bench` redoes them all. On a machine with CUDA the same commands measure "
        "the GPU tables (bf16 autocast, `torch.compile`, MFU against the dense bf16 peak)."
    )
    print("\n" + body)
    if not args.no_write:
        update_section("header", body)
        write_summary()
        print("\n" + summary_section())
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
