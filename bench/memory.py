"""Peak training memory per model size, with and without gradient checkpointing.

Each configuration runs in a fresh subprocess, so nothing another configuration allocated (or the allocator kept)
is counted. The child builds the model and AdamW and runs a warm-up step at batch 1 (which initialises the BLAS and
thread pools and allocates Adam's two moments), then measures one training step (forward, cross-entropy, backward,
optimiser step) at the batch size:

* CPU: the process's peak resident set (``resource.getrusage``) minus its resident set just before the step: the
  activations kept for backward, the gradients and the temporaries, on top of weights and optimiser state. The
  child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc maps every tensor of 64 KiB or more on its own and
  unmaps it when freed: the resident set then follows the live tensors instead of what malloc's arenas retain
  (without it, freed activations stay resident and checkpointing appears to save a fraction of what it does).
* GPU: ``torch.cuda.max_memory_allocated`` over the step minus the allocation before it (bf16 autocast).

Two further steps are timed (the faster counts) to show what checkpointing costs in compute.

    python bench/memory.py [--quick] [--large] [--batch N] [--device auto|cpu|cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_device_argument,
    machine_line,
    markdown_table,
    resolve_device,
    save_results,
    update_section,
    write_summary,
)
from vit.model import count_parameters, create_model  # noqa: E402

MiB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, batch: int, checkpointing: bool, device: torch.device) -> dict[str, float]:
    """One configuration, measured in this (fresh) process."""
    torch.manual_seed(0)
    model = create_model(name, image_size=224).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(1000, (batch,), device=device)

    def step(n: int = batch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x[:n]), y[:n])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak, total = torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()
    else:
        before = resident_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if total <= peak_before:
            raise RuntimeError("the step did not raise the peak resident set; the measurement would be wrong")
        peak = total - before
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "params": count_parameters(model),
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "step_peak": peak,
        "process_peak": total,
        "step_seconds": min(times),
    }


def run_child(name: str, batch: int, checkpointing: bool, device: torch.device) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--device", device.type, "--child", name, str(batch), str(int(checkpointing))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Ti/16 and S/16 only")
    parser.add_argument("--large", action="store_true", help="add ViT-L/16 on CPU too (tens of seconds per step)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "CKPT"), help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.child:
        name, batch, ckpt = args.child
        print(json.dumps(child(name, int(batch), ckpt == "1", device)))
        return
    on_gpu = device.type == "cuda"
    names = ["vit_ti_16", "vit_s_16"] + ([] if args.quick else ["vit_b_16"])
    names += ["vit_l_16"] if (on_gpu or args.large) and not args.quick else []
    rows, figures = [], []
    for name in names:
        plain, ckpt = run_child(name, args.batch, False, device), run_child(name, args.batch, True, device)
        for label, r in (("off", plain), ("on", ckpt)):
            rows.append(
                [
                    f"{name} @224",
                    f"{r['params'] / 1e6:.1f}M",
                    f"{r['weights'] / MiB:,.0f}",
                    label,
                    f"{r['step_peak'] / MiB:,.0f}",
                    f"{r['process_peak'] / MiB:,.0f}",
                    f"{r['step_seconds']:.2f}",
                ]
            )
        saving = 1 - ckpt["step_peak"] / plain["step_peak"]
        slowdown = ckpt["step_seconds"] / plain["step_seconds"]
        rows[-1][3] += f" (-{100 * saving:.0f}% memory, {slowdown:.2f}x time)"
        short = name.split("_")[1].upper() + "/16"
        figures.append(f"{short} {plain['step_peak'] / MiB:,.0f} → {ckpt['step_peak'] / MiB:,.0f}")
        print(markdown_table(HEADERS, rows[-2:]), flush=True)
    what = (
        "`torch.cuda.max_memory_allocated` over the step minus the allocation before it, bf16 autocast"
        if on_gpu
        else "peak resident set (`getrusage`) minus the resident set just before the step, fp32"
    )
    body = (
        "## Peak training memory (`python bench/memory.py`)\n\n"
        f"One training step (forward, cross-entropy, backward, AdamW step) at batch {args.batch}, 224 px, each "
        f"configuration in a fresh subprocess after a warm-up step at batch 1. Step peak = {what}: activations kept "
        "for backward, gradients and temporaries, on top of the weights and Adam's two moments (together 3x the "
        "weights column). Checkpointing = `model.set_grad_checkpointing()` (each block recomputed in backward). "
        "glibc's mmap threshold is fixed at 64 KiB so the resident set follows the live tensors. "
        "Step s = the faster of two further steps. L/16 (its official dropout 0.1; the others have none) is "
        "measured on a GPU, or on CPU with `--large`, where one of its steps takes tens of seconds.\n\n"
        + markdown_table(HEADERS, rows)
        + f"\n\nMachine: {machine_line()}\n"
    )
    print(body)
    if not args.no_write:
        figure = f"step peak MiB at batch {args.batch}, checkpointing off → on: " + "; ".join(figures)
        name = "memory-gpu" if on_gpu else "memory"
        update_section(name, body)
        save_results(name, {} if on_gpu else {"memory": {"figure": figure, "met": None, "note": ""}})
        write_summary()


HEADERS = ["model", "params", "weights MiB", "checkpointing", "step peak MiB", "process peak MiB", "step s"]

if __name__ == "__main__":
    main()
