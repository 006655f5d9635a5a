"""The training engine's step against a bare training loop, and (on a GPU) bf16 + compile throughput and MFU.

CPU: the same model, the same AdamW, the same ``InMemoryBatches`` and the same math (fp32, cross-entropy, global
gradient-norm clipping at 1, as every recipe of the paper does), once through ``vit.engine.Trainer.fit`` (learning
rate schedule, loss check, gradient norm, metrics every ``log_every`` steps, checkpoint and signal bookkeeping) and
once as the loop a person would write by hand. Both run the same number of steps per measurement, interleaved;
overhead = 1 - the median over rounds of (engine images/s / bare images/s of the same round). The shapes are the
demo's pre-training step (``vit_micro_4`` at 32 px, batch 128: small steps, where fixed per-step costs show most)
and ViT-Ti/16 at 224.

GPU (only where CUDA is available): ``Trainer`` with bf16 autocast and ``compile: true`` (the project's default
compile mode, ``torch.compile(model)``) for ViT-B/16 and L/16 at 224 and 384; images/s and MFU against
``vit.engine.trainer.peak_flops`` (the device's dense bf16 peak, 989 TFLOP/s on an H100).

    python bench/engine.py [--quick] [--device auto|cpu|cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import math
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
    update_section,
    write_summary,
)
from vit.engine import OptimConfig, TrainConfig, Trainer  # noqa: E402
from vit.engine.distributed import DistInfo  # noqa: E402
from vit.engine.losses import classification_loss  # noqa: E402
from vit.engine.memory import InMemoryBatches  # noqa: E402
from vit.engine.trainer import measure_gemm_flops, peak_flops  # noqa: E402
from vit.model import create_model, flops_per_image  # noqa: E402

GOAL_OVERHEAD = 0.05
GOAL_GPU_MFU = 0.45
CPU_SHAPES = [("vit_micro_4", 32, 128, 10), ("vit_ti_16", 224, 8, 4)]  # model, image size, batch, steps per run
GPU_SHAPES = [("vit_b_16", 224, 128), ("vit_b_16", 384, 32), ("vit_l_16", 224, 64), ("vit_l_16", 384, 16)]


def loss_fn(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return classification_loss("softmax", module(images), labels, 0.0)


def data(size: int, batch: int, device: torch.device) -> InMemoryBatches:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8 * batch, 3, size, size, generator=g).mul_(2).sub_(1).to(device)
    return InMemoryBatches(images, torch.randint(1000, (8 * batch,), generator=g).to(device), batch)


def model(name: str, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=1000, image_size=size).to(device).train()


def bare_loop(name: str, size: int, batch: int, optim: OptimConfig) -> Callable[[int], None]:
    """The hand-written loop: zero_grad, forward, loss, backward, clip, step."""
    net = model(name, size, torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=0.0)
    batches = iter(data(size, batch, torch.device("cpu")))

    def run(steps: int) -> None:
        for _ in range(steps):
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            loss_fn(net, x, y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
            opt.step()

    return run


def engine_loop(
    name: str, size: int, batch: int, cfg: TrainConfig, device: torch.device, peak: float | None
) -> Callable[[int], None]:
    """``Trainer.fit`` continued by ``steps`` more steps per call (the trainer keeps its step, data and state)."""
    net = model(name, size, device)
    cfg.peak_flops = peak  # measured once by the caller, not at every fit()
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(net, cfg, data(size, batch, device), 0, dist, loss_fn, flops_per_image=flops_per_image(net.cfg))

    def run(steps: int) -> None:
        trainer.total_steps += steps
        trainer.fit()

    return run


def images_per_second(run: Callable[[int], None], steps: int, batch: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def cpu_rows(rounds: int, quick: bool) -> tuple[list[list[object]], float]:
    gemm = measure_gemm_flops(n=1024, repeats=4)
    rows, worst = [], -math.inf
    for name, size, batch, steps in CPU_SHAPES[:1] if quick else CPU_SHAPES:
        cfg = TrainConfig(batch_size=batch, steps=1, optim=OptimConfig(lr=1e-3, grad_clip=1.0))
        bare = bare_loop(name, size, batch, cfg.optim)
        engine = engine_loop(name, size, batch, cfg, torch.device("cpu"), gemm)
        for run in (bare, engine):  # warm-up: first-touch allocations, optimiser state
            run(2)
        results = interleaved(
            {
                "bare": lambda run=bare, n=steps, b=batch: images_per_second(run, n, b),
                "engine": lambda run=engine, n=steps, b=batch: images_per_second(run, n, b),
            },
            rounds,
        )
        b, e = median(results["bare"]), median(results["engine"])
        ratio = median([en / ba for ba, en in zip(results["bare"], results["engine"], strict=True)])
        overhead = 1 - ratio
        worst = max(worst, overhead)
        shape = f"{name} @{size}, batch {batch}, {steps} steps per run"
        rows.append([shape, "bare loop", b, "", ""])
        rows.append([shape, "`Trainer.fit`", e, f"{ratio:.3f}x", f"{100 * overhead:.1f}%"])
        print(markdown_table(CPU_HEADERS, rows[-2:]), flush=True)
    return rows, worst


def gpu_rows(quick: bool) -> tuple[list[list[object]], dict[str, float]]:
    device = torch.device("cuda")
    peak = peak_flops(device, "bf16")
    rows, mfus = [], {}
    for name, size, batch in GPU_SHAPES[:1] if quick else GPU_SHAPES:
        cfg = TrainConfig(batch_size=batch, steps=1, precision="bf16", compile=True, optim=OptimConfig(lr=1e-4))
        run = engine_loop(name, size, batch, cfg, device, peak)
        run(3)  # compilation and warm-up
        ips = median([images_per_second(run, 10, batch) for _ in range(3)])
        fpi = flops_per_image(create_model(name, image_size=size).cfg)
        mfu = ips * fpi / peak if peak else float("nan")
        mfus[f"{name}@{size}"] = mfu
        rows.append([f"{name} @{size}", batch, ips, f"{fpi / 1e9:.0f}", f"{100 * mfu:.1f}%"])
        print(markdown_table(GPU_HEADERS, rows[-1:]), flush=True)
    return rows, mfus


CPU_HEADERS = ["shape", "loop", "images/s", "engine / bare", "overhead"]
GPU_HEADERS = ["model", "batch", "images/s", "GFLOP/image (train)", "MFU"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's shape only (B/16 at 224 on a GPU), 3 rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    add_device_argument(parser)
    args = parser.parse_args()
    on_gpu = resolve_device(args.device).type == "cuda"
    rounds = 3 if args.quick else 7
    rows, worst = cpu_rows(rounds, args.quick)
    body = (
        "## Engine step vs a bare loop (`python bench/engine.py`)\n\n"
        f"CPU, fp32, medians of {rounds} interleaved runs; engine / bare is the median of the {rounds} paired "
        "ratios (each engine run against the bare run just before it). Both loops: same model and seed, AdamW, "
        "`InMemoryBatches`, cross-entropy, gradient-norm clipping at 1. The engine adds the learning-rate "
        "schedule, a loss and NaN check kept on the device (read back on log steps), metrics every 10 steps and "
        "checkpoint/signal bookkeeping.\n\n" + markdown_table(CPU_HEADERS, rows) + "\n\n"
        f"Goal: at most {100 * GOAL_OVERHEAD:.0f}% overhead; worst here {100 * worst:.1f}% "
        + ("(met)." if worst <= GOAL_OVERHEAD else "(not met).")
    )
    goals = {
        "engine": {"figure": f"worst overhead {100 * worst:.1f}%", "met": worst <= GOAL_OVERHEAD, "note": ""},
        "gpu": {"figure": "not measured: no GPU on this machine", "met": None, "note": ""},
    }
    if on_gpu:
        gpu, mfus = gpu_rows(args.quick)
        b16 = mfus.get("vit_b_16@224", float("nan"))
        body += (
            "\n\n### GPU: bf16 autocast + `torch.compile`\n\n"
            f"`Trainer.fit` with `precision: bf16`, `compile: true`, on {torch.cuda.get_device_name()}; median of 3 "
            "runs of 10 steps after 3 warm-up steps. MFU = images/s x model training FLOPs per image / the "
            "device's dense bf16 peak.\n\n" + markdown_table(GPU_HEADERS, gpu)
        )
        goals["gpu"] = {
            "figure": ", ".join(f"{k} {100 * v:.1f}% MFU" for k, v in mfus.items()),
            "met": b16 >= GOAL_GPU_MFU if "H100" in torch.cuda.get_device_name() else None,
            "note": "",
        }
    else:
        body += (
            "\n\nGPU rows (ViT-B/16 and L/16, bf16 autocast + `torch.compile`, 224 and 384 px, images/s and MFU "
            "against the dense bf16 peak, 989 TFLOP/s on an H100; goal at least 45% for B/16): **not measured: no "
            "GPU on this machine**. On a CUDA machine the same command, `python bench/engine.py`, adds them."
        )
    body += f"\n\nMachine: {machine_line()}\n"
    print(body)
    if not args.no_write:
        update_section("engine", body)
        save_results("engine", goals)
        write_summary()


if __name__ == "__main__":
    main()
