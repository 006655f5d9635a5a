"""Model throughput: vit's ViT against timm's and torchvision's at the same shapes and threads.

Training step (forward, cross-entropy, backward, AdamW step) and inference (``inference_mode``) images/s, medians of
interleaved rounds, ratios to timm, and model-FLOP utilisation (MFU) against this machine's fp32 GEMM throughput,
measured as one more candidate of every round (a 2048² matmul) so that load from other processes moves numerator
and denominator alike.

Like for like: ``vit`` is built with the exact-erf GELU, as timm and torchvision use; that is the comparison the
goals are judged on. ``vit-tanh`` is vit's default (the official code's tanh approximation), shown beside it.
Training rows also run ``torch.compile(model)`` (the default mode: what the engine's ``compile: true`` does) for
vit, compared with timm eager (the goal); on a GPU, or with ``--compile-timm`` on CPU (where each compilation
takes a minute or more, so ``make bench`` leaves it out), timm is compiled too, for the compiled-vs-compiled ratio.
Every candidate uses the same optimiser, AdamW with ``fused=True``.

On a GPU the same table runs in bf16 autocast, and MFU is against the device's dense bf16 peak.

    python bench/model.py [--quick] [--threads N] [--no-compile] [--compile-timm] [--device auto|cpu|cuda]
                          [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_device_argument,
    interleaved,
    machine_line,
    markdown_table,
    median,
    resolve_device,
    save_results,
    timed,
    update_section,
    write_summary,
)
from vit.configs import model_config  # noqa: E402
from vit.engine.trainer import peak_flops  # noqa: E402
from vit.model import create_model, flops_per_image  # noqa: E402

TIMM_NAMES = {
    "vit_ti_16": "vit_tiny_patch16_224",
    "vit_s_16": "vit_small_patch16_224",
    "vit_b_16": "vit_base_patch16_224",
}
TV_SHAPES = {"vit_ti_16": (12, 3, 192, 768), "vit_s_16": (12, 6, 384, 1536), "vit_b_16": (12, 12, 768, 3072)}
# (model, mode, batch). CPU batches keep a B/16 training step to a few seconds.
CPU_GRID = [
    ("vit_ti_16", "train", 16),
    ("vit_ti_16", "infer", 32),
    ("vit_s_16", "train", 8),
    ("vit_s_16", "infer", 16),
    ("vit_b_16", "train", 4),
    ("vit_b_16", "infer", 8),
]
GPU_GRID = [
    ("vit_ti_16", "train", 256),
    ("vit_ti_16", "infer", 512),
    ("vit_s_16", "train", 256),
    ("vit_s_16", "infer", 512),
    ("vit_b_16", "train", 128),
    ("vit_b_16", "infer", 256),
]
SHORT = {"vit_ti_16": "Ti", "vit_s_16": "S", "vit_b_16": "B"}
GEMM_N = 2048
HEADERS = ["model", "step", "batch", "implementation", "images/s", "vs timm", "vs timm compiled", "MFU"]


def build(kind: str, name: str, size: int, device: torch.device) -> torch.nn.Module:
    if kind.startswith("vit"):
        gelu = "tanh" if kind == "vit-tanh" else "none"
        return create_model(name, num_classes=1000, image_size=size, gelu_approximate=gelu).to(device)
    if kind == "timm":
        import timm

        return timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000, img_size=size).to(device)
    import torchvision

    layers, heads, dim, mlp = TV_SHAPES[name]
    return torchvision.models.VisionTransformer(size, 16, layers, heads, dim, mlp, num_classes=1000).to(device)


def train_step_fn(model: torch.nn.Module, batch: int, size: int, device: torch.device, amp: bool) -> Callable:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model: torch.nn.Module, batch: int, size: int, device: torch.device, amp: bool) -> Callable:
    model.eval()
    x = torch.randn(batch, 3, size, size, device=device)

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    return step


def gemm_flops() -> float:
    """One timing of a GEMM_N² fp32 matmul: the CPU's MFU denominator, measured in the same rounds."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    start = time.perf_counter()
    for _ in range(2):
        a @ b
    return 2 * 2 * GEMM_N**3 / (time.perf_counter() - start)


def measure(
    mode: str, name: str, batch: int, rounds: int, device: torch.device, compile_too: bool, compile_timm: bool
) -> dict[str, float]:
    """images/s per candidate (and FLOP/s of the GEMM candidate on CPU), medians of interleaved rounds."""
    amp = device.type == "cuda"
    make = train_step_fn if mode == "train" else infer_fn
    builds = {kind: kind for kind in ("vit", "vit-tanh", "timm", "torchvision")}
    if compile_too and mode == "train":
        builds["vit+compile"] = "vit"
        if compile_timm:
            builds["timm+compile"] = "timm"
    fns = {}
    for label, kind in builds.items():
        torch.manual_seed(0)
        model = build(kind, name, 224, device)
        fns[label] = make(torch.compile(model) if label.endswith("+compile") else model, batch, 224, device, amp)
    for fn in fns.values():  # warm-up (and compilation) outside the timing
        fn()
        fn()
    repeats = 1 if mode == "train" else 2
    candidates = {k: (lambda f=f: batch / timed(f, repeats)) for k, f in fns.items()}
    if device.type == "cpu":
        candidates["gemm"] = gemm_flops
    samples = interleaved(candidates, rounds)
    return {k: median(v) for k, v in samples.items()}


def mfu(name: str, mode: str, images_per_s: float, peak: float) -> float:
    return images_per_s * flops_per_image(model_config(name, image_size=224), training=mode == "train") / peak


def table_rows(name: str, mode: str, batch: int, ips: dict[str, float], peak: float) -> list[list[object]]:
    rows = []
    for kind, value in ips.items():
        if kind == "gemm":
            continue
        compiled = kind.endswith("+compile") and "timm+compile" in ips
        rows.append(
            [
                f"{name} @224",
                mode,
                batch,
                kind,
                value,
                f"{value / ips['timm']:.2f}x",
                f"{value / ips['timm+compile']:.2f}x" if compiled else "",
                f"{100 * mfu(name, mode, value, peak):.0f}%",
            ]
        )
    return rows


def goals(results: dict[tuple[str, str, int], dict[str, float]], peaks: dict) -> dict[str, dict]:
    """The summary's entries (CPU): each goal over the models, judged on the exact-erf GELU ``vit``."""

    def ratios(mode: str, kind: str, base: str) -> dict[str, float]:
        return {
            SHORT[n]: ips[kind] / ips[base]
            for (n, m, _), ips in results.items()
            if m == mode and kind in ips and base in ips
        }

    def figure(r: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.2f}x" for k, v in r.items())

    eager, tanh = ratios("train", "vit", "timm"), ratios("train", "vit-tanh", "timm")
    out = {
        "train_eager": {
            "figure": f"{figure(eager)} (vit's default tanh GELU: {figure(tanh)})",
            "met": min(eager.values()) >= 1.0,
            "note": "same erf GELU as timm",
        }
    }
    compiled = ratios("train", "vit+compile", "timm")
    if compiled:
        same = ratios("train", "vit+compile", "timm+compile")
        worst = min(compiled, key=compiled.get)
        (key, ips), *_ = [(k, v) for k, v in results.items() if SHORT[k[0]] == worst and k[1] == "train"]
        needed = 1.2 * mfu(key[0], "train", ips["timm"], peaks[key])
        met = compiled[worst] >= 1.2
        out["train_compile"] = {
            "figure": f"vs timm eager: {figure(compiled)}" + (f"; vs timm compiled: {figure(same)}" if same else ""),
            "met": met,
            "note": "vs timm eager"
            if met
            else f"vs timm eager: on {worst}/16 that takes {100 * needed:.0f}% MFU; timm eager runs at "
            f"{100 * needed / 1.2:.0f}%, and compile only fuses the element-wise work around the GEMMs",
        }
    vs_timm, vs_tv = ratios("infer", "vit", "timm"), ratios("infer", "vit", "torchvision")
    out["inference"] = {
        "figure": f"vs timm: {figure(vs_timm)}; vs torchvision: {figure(vs_tv)}",
        "met": min([*vs_timm.values(), *vs_tv.values()]) >= 1.0,
        "note": "",
    }
    b16 = [(key, ips) for key, ips in results.items() if key[0] == "vit_b_16" and key[1] == "train"]
    if b16:
        key, ips = b16[0]
        util = {k: mfu(key[0], "train", ips[k], peaks[key]) for k in ("vit", "vit+compile") if k in ips}
        out["mfu"] = {
            "figure": f"B/16 batch {key[2]}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in util.items()),
            "met": max(util.values()) >= 0.75,
            "note": "",
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Ti/16 only, 2 rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every candidate")
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    parser.add_argument("--no-compile", action="store_true", help="eager only (torch.compile takes minutes on CPU)")
    parser.add_argument(
        "--compile-timm", action="store_true", help="compile timm too on CPU (always on a GPU): minutes per model"
    )
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    grid = GPU_GRID if on_gpu else CPU_GRID
    if args.quick:
        grid = [g for g in grid if g[0] == "vit_ti_16"]
    rounds = 2 if args.quick else 3
    device_peak = peak_flops(device, "bf16") if on_gpu else None
    rows, results, peaks = [], {}, {}
    for name, mode, batch in grid:
        ips = measure(mode, name, batch, rounds, device, not args.no_compile, on_gpu or args.compile_timm)
        results[(name, mode, batch)] = ips
        peaks[(name, mode, batch)] = device_peak or ips["gemm"]
        new = table_rows(name, mode, batch, ips, peaks[(name, mode, batch)])
        rows += new
        print(markdown_table(HEADERS, new), flush=True)
    if on_gpu:
        peak_text = "the device's dense bf16 peak"
        gpu_note = ""
    else:
        gemms = [p / 1e9 for p in peaks.values()]
        peak_text = (
            f"this machine's fp32 GEMM throughput ({GEMM_N}² matmul, measured in every round: "
            f"median {median(gemms):.0f} GFLOP/s, {min(gemms):.0f}-{max(gemms):.0f} across rows)"
        )
        gpu_note = (
            "\n\nGPU (bf16 autocast, batches 128-512, MFU against the dense bf16 peak): **not measured: no GPU on "
            "this machine**; `python bench/model.py` on a CUDA machine writes that table."
        )
    body = (
        f"## Model throughput, {'GPU, bf16 autocast' if on_gpu else 'CPU, fp32'} (`python bench/model.py`)\n\n"
        f"Medians of {rounds} interleaved rounds, {args.threads} torch threads for every candidate, 224 px, "
        "AdamW (fused) for training. `vit` uses the exact-erf GELU like timm and torchvision (the like-for-like "
        "comparison, on which the goals are judged); `vit-tanh` is vit's default, the official tanh "
        "approximation. `+compile` = `torch.compile(model)`, the default mode, which is what the engine's "
        "`compile: true` uses"
        + ("." if on_gpu or args.compile_timm else " (timm compiled too: `python bench/model.py --compile-timm`).")
        + " MFU = images/s x model FLOPs per image (training: 3x forward) / "
        f"{peak_text}.\n\n{markdown_table(HEADERS, rows)}{gpu_note}\n\nMachine: {machine_line()}\n"
    )
    print(body)
    if not args.no_write:
        update_section("model-gpu" if on_gpu else "model", body)
        save_results("model-gpu" if on_gpu else "model", {} if on_gpu else goals(results, peaks))
        write_summary()


if __name__ == "__main__":
    main()
