"""The GPU basics a practitioner checks first, in one command that finishes within 8 minutes on one GPU.

    python bench/gpu_check.py [--smoke] [--no-write]        (or: make gpu-check)

On CUDA it measures, through the project's own ``Trainer``: ViT-B/16 and L/16 training at 224 in bf16 autocast,
eager and ``torch.compile``, images/s, MFU against the device's dense bf16 peak (``vit.engine.trainer.peak_flops``)
and peak memory; whether the attention runs a flash kernel (a profiled forward pass); host synchronisations per
non-log step (CUDA's sync debug mode); the GPU decode path's images/s; and a DDP self-test on a one-GPU NCCL process
group. It writes them into the "GPU check" section of docs/PERFORMANCE.md. The goal the code aims at: at least 45%
MFU for B/16 training on an H100/H200.

``--smoke`` runs every part on the CPU with a tiny model for 2 steps (what the test suite runs); it writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_line, markdown_table, median, save_results, update_section, write_summary  # noqa: E402
from bench.engine import data, engine_loop, images_per_second, loss_fn  # noqa: E402
from vit.engine import OptimConfig, TrainConfig  # noqa: E402
from vit.engine.trainer import peak_flops  # noqa: E402
from vit.model import create_model, flops_per_image  # noqa: E402

GOAL_MFU = 0.45


@dataclass(frozen=True)
class Shape:
    model: str
    size: int
    batch: int
    warmup: int
    steps: int


GPU_SHAPES = [Shape("vit_b_16", 224, 256, 3, 20), Shape("vit_l_16", 224, 96, 3, 10)]
SMOKE_SHAPES = [Shape("vit_micro_4", 32, 4, 1, 2)]


def training_row(shape: Shape, compile_: bool, device: torch.device, peak: float | None) -> list[object]:
    """images/s, MFU and peak memory of ``Trainer.fit`` in bf16 (compiled or eager), after warm-up steps."""
    cfg = TrainConfig(
        batch_size=shape.batch, steps=1, precision="bf16", compile=compile_, log_every=10, optim=OptimConfig(lr=1e-4)
    )
    run = engine_loop(shape.model, shape.size, shape.batch, cfg, device, peak)
    run(shape.warmup)  # compilation, autotuning, optimiser state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ips = median([images_per_second(run, shape.steps, shape.batch) for _ in range(2)])
    fpi = flops_per_image(create_model(shape.model, image_size=shape.size).cfg)
    mfu = ips * fpi / peak if peak else float("nan")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    mode = "compile" if compile_ else "eager"
    return [f"{shape.model} @{shape.size}", mode, shape.batch, ips, f"{100 * mfu:.1f}%", f"{memory:.1f}"]


def flash_attention_in_use(device: torch.device) -> str:
    """Whether a bf16 forward of ViT-B/16 runs a flash-attention kernel (its name in the CUDA profile)."""
    if device.type != "cuda":
        return "n/a (CPU)"
    from torch.profiler import ProfilerActivity, profile

    model = create_model("vit_b_16", image_size=224).to(device).eval()
    x = torch.randn(8, 3, 224, 224, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages() if "flash" in e.key.lower()]
    return f"yes ({kernels[0][:60]})" if kernels else "no"


def host_syncs_per_step(device: torch.device, shape: Shape) -> str:
    """CUDA synchronisations the engine issues in steps that do not log (sync debug mode counts them as warnings)."""
    if device.type != "cuda":
        return (
            "n/a (CPU: see tests/test_engine.py::test_training_steps_read_nothing_back_to_the_host_except_on_log_steps)"
        )
    import warnings

    cfg = TrainConfig(batch_size=shape.batch, steps=1, precision="bf16", log_every=1000, optim=OptimConfig(lr=1e-4))
    run = engine_loop(shape.model, shape.size, shape.batch, cfg, device, peak_flops(device, "bf16"))
    run(2)
    trainer_steps = 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(trainer_steps)  # the last of them ends the run and logs: one sync point expected
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return f"{len(syncs)} in {trainer_steps} steps (the last one logs)"


def gpu_decode_images_per_second(device: torch.device, batch: int, rounds: int) -> tuple[str, float]:
    """The GPU data path: JPEG batches decoded on the device (nvJPEG via torchvision), resized, normalised to
    [-1, 1]; on the CPU the same decode on the host. Synthetic 256x256 JPEGs, so only decoding is measured."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg, encode_jpeg

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=g) for _ in range(batch)]
    encoded = [encode_jpeg(img, quality=90) for img in images]
    where = "cuda" if device.type == "cuda" else "cpu"

    def one_batch() -> torch.Tensor:
        decoded = decode_jpeg(encoded, device=where)
        x = torch.stack(decoded).to(device, non_blocking=True).float()
        return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True).div_(127.5).sub_(1)

    one_batch()  # warm-up: decoder handles, kernels
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        one_batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return ("nvJPEG (torchvision.io.decode_jpeg on the GPU)" if where == "cuda" else "CPU decode"), batch / median(
        times
    )


def ddp_self_test(device: torch.device) -> str:
    """A DDP step on a process group of one (NCCL on CUDA, gloo on CPU) equals the plain step: the communicator,
    DDP's gradient hooks and the bucketed all-reduce work on this machine."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1, device_id=device if backend == "nccl" else None)
    try:
        torch.manual_seed(0)
        plain = create_model("vit_micro_4", num_classes=1000, image_size=32).to(device)
        twin = create_model("vit_micro_4", num_classes=1000, image_size=32).to(device)
        twin.load_state_dict(plain.state_dict())
        ddp = DistributedDataParallel(twin, device_ids=[device.index] if device.type == "cuda" else None)
        x, y = next(iter(data(32, 8, device)))
        loss_fn(plain, x, y).backward()
        loss_fn(ddp, x, y).backward()
        same = all(
            torch.allclose(p.grad, q.grad, atol=1e-5)
            for p, q in zip(plain.parameters(), twin.parameters(), strict=True)
        )
        return f"{backend}: {'passed' if same else 'FAILED (gradients differ)'}"
    finally:
        dist.destroy_process_group()


def report(rows: list[list[object]], extras: dict[str, str], device_name: str) -> str:
    headers = ["model", "mode", "batch", "images/s", "MFU (dense bf16 peak)", "peak memory (GiB)"]
    lines = "\n".join(f"- {k}: {v}" for k, v in extras.items())
    return (
        "## GPU check (`python bench/gpu_check.py`, `make gpu-check`)\n\n"
        f"On {device_name}: `Trainer.fit` with bf16 autocast, eager and `torch.compile`, median of 2 timed runs "
        "after warm-up; MFU = images/s x training FLOPs per image / the device's dense bf16 peak. "
        f"Goal: at least {100 * GOAL_MFU:.0f}% MFU for B/16 on an H100/H200.\n\n"
        + markdown_table(headers, rows)
        + f"\n\n{lines}\n\nMachine: {machine_line()}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --smoke for the CPU self-check")
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    peak = 1e12 if args.smoke else peak_flops(device, "bf16")
    rows = [training_row(s, c, device, peak) for s in shapes for c in ((False,) if args.smoke else (False, True))]
    for row in rows:
        print(markdown_table(["model", "mode", "batch", "images/s", "MFU", "GiB"], [row]), flush=True)
    decoder, decode_ips = gpu_decode_images_per_second(device, 4 if args.smoke else 256, 2 if args.smoke else 10)
    extras = {
        "flash attention in use": flash_attention_in_use(device),
        "host syncs in non-log steps": host_syncs_per_step(device, shapes[0]),
        "GPU data path": f"{decoder}: {decode_ips:,.0f} images/s",
        "DDP self-test (1 process)": ddp_self_test(device),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    body = report(rows, extras, name)
    print(body)
    if args.smoke or args.no_write:
        return
    update_section("gpu-check", body)
    save_results("gpu", {"gpu": b16_goal(rows, name)}, {"rows": rows, **extras})
    write_summary()


def b16_goal(rows: list[list[object]], device_name: str) -> dict[str, object]:
    """The summary row of the GPU goal: B/16's best MFU of its eager and compiled runs, against the goal."""
    b16 = [float(str(row[4]).rstrip("%")) for row in rows if str(row[0]).startswith("vit_b_16")]
    best = max(b16, default=float("nan"))
    return {
        "figure": f"B/16 {best:.1f}% MFU (best of eager, compile)",
        "met": best >= 100 * GOAL_MFU,
        "note": device_name,
    }


if __name__ == "__main__":
    main()
