"""Model throughput: vit's ViT against timm's and torchvision's at the same shapes and threads.

Training step (forward, backward, AdamW step) and inference images/s, eager and ``torch.compile`` (default mode),
medians of interleaved rounds, the ratio to timm, and model-FLOP utilisation against this machine's measured
fp32 GEMM throughput. All three models use the exact-erf GELU here so the comparison is like for like (vit's
default tanh GELU is timed separately). On a GPU the same table runs in bf16 autocast, and MFU is against the
device's dense bf16 peak.

    python bench/model.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleaved, machine_line, markdown_table, median, timed, update_section  # noqa: E402
from vit.engine.trainer import measure_gemm_flops, peak_flops  # noqa: E402
from vit.model import create_model, flops_per_image  # noqa: E402

TIMM_NAMES = {
    "vit_ti_16": "vit_tiny_patch16_224",
    "vit_s_16": "vit_small_patch16_224",
    "vit_b_16": "vit_base_patch16_224",
}
TV_SHAPES = {"vit_ti_16": (12, 3, 192, 768), "vit_s_16": (12, 6, 384, 1536), "vit_b_16": (12, 12, 768, 3072)}


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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
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


def measure(
    mode: str, name: str, batch: int, size: int, rounds: int, repeats: int, device: torch.device, compile_too: bool
) -> dict[str, float]:
    """images/s per candidate (median of interleaved rounds)."""
    amp = device.type == "cuda"
    kinds = ["vit", "timm", "torchvision"] + (["vit-tanh"] if mode == "train" else [])
    fns = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = build(kind, name, size, device)
        make = train_step_fn if mode == "train" else infer_fn
        fns[kind] = make(model, batch, size, device, amp)
        if compile_too and kind in ("vit", "timm"):
            fns[f"{kind}+compile"] = make(torch.compile(build(kind, name, size, device)), batch, size, device, amp)
    for fn in fns.values():  # warm-up (and compilation) outside the timing
        fn()
        fn()
    samples = interleaved({k: (lambda f=f: batch / timed(f, repeats)) for k, f in fns.items()}, rounds)
    return {k: median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Ti/16 only, one batch size, 2 rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        grid = [("vit_ti_16", 256), ("vit_s_16", 256), ("vit_b_16", 128)]
    else:
        grid = [("vit_ti_16", 8), ("vit_s_16", 4), ("vit_b_16", 2)]
    if args.quick:
        grid = grid[:1]
    rounds = 2 if args.quick else 3
    gemm = peak_flops(device, "bf16") if on_gpu else measure_gemm_flops(n=2048, repeats=4)
    rows = []
    for name, batch in grid:
        for mode in ("train", "infer"):
            ips = measure(mode, name, batch, 224, rounds, 2 if mode == "train" else 3, device, not args.no_compile)
            model_flops = flops_per_image(create_model(name, image_size=224).cfg, training=mode == "train")
            for kind, value in ips.items():
                base = "timm+compile" if kind.endswith("+compile") and "timm+compile" in ips else "timm"
                rows.append(
                    [
                        f"{name} @224",
                        mode,
                        batch,
                        kind,
                        value,
                        value / ips["timm"],
                        value / ips[base] if base != "timm" else "",
                        f"{100 * value * model_flops / gemm:.0f}%",
                    ]
                )
            print(
                markdown_table(
                    [
                        "model",
                        "step",
                        "batch",
                        "implementation",
                        "images/s",
                        "vs timm eager",
                        "vs timm compiled",
                        "MFU",
                    ],
                    rows[-len(ips) :],
                ),
                flush=True,
            )
    peak_name = "dense bf16 peak" if on_gpu else f"measured fp32 GEMM throughput ({gemm / 1e9:.1f} GFLOP/s, 2048²)"
    table = markdown_table(
        ["model", "step", "batch", "implementation", "images/s", "vs timm eager", "vs timm compiled", "MFU"], rows
    )
    body = (
        f"### Model throughput ({'GPU, bf16 autocast' if on_gpu else 'CPU, fp32'})\n\n"
        f"`python bench/model.py` on {machine_line()}. Medians of {rounds} interleaved rounds; "
        f"`vit` uses the exact-erf GELU like timm and torchvision, `vit-tanh` is vit's default. "
        f"MFU = images/s × model FLOPs per image ÷ {peak_name}.\n\n{table}\n"
    )
    print(body)
    if not args.no_write:
        update_section("model-gpu" if on_gpu else "model", body)


if __name__ == "__main__":
    main()
