"""Few-shot evaluation cost: feature extraction images/s and the closed-form ridge solve.

Feature extraction is timed two ways: end to end as the pipeline runs it (``extract_features`` over a prepared
synthetic VTAB-like dataset read from shards, the demo's ``vit_micro_4`` at 32 px) and model-only on images held in
memory (``forward_pre_logits`` under ``inference_mode`` for ViT-Ti/16 and ViT-B/16 at 224). The ridge is
``vit.metrics.fewshot_ridge`` at ImageNet scale: 1,000 classes x 25 shots = 25,000 train rows of 768 features,
10,000 test rows; then the whole 4 shots x 3 seeds sweep (``fewshot_evaluate``) from a pool of 30 per class.
Features are class-clustered Gaussians; the cost does not depend on their values.

    python bench/fewshot.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    machine_line,
    markdown_table,
    median,
    save_results,
    timed,
    update_section,
    write_summary,
)
from vit.data import build_transform, open_dataset, prepare_dataset  # noqa: E402
from vit.engine.evaluation import extract_features  # noqa: E402
from vit.metrics import fewshot_evaluate, fewshot_ridge  # noqa: E402
from vit.model import create_model  # noqa: E402

CLASSES, SHOTS, DIM, TEST_PER_CLASS, POOL_PER_CLASS = 1000, 25, 768, 10, 30


def clustered_features(per_class: int, rng: np.random.Generator, centres: np.ndarray) -> tuple[np.ndarray, ...]:
    labels = np.repeat(np.arange(len(centres)), per_class)
    features = centres[labels] + rng.standard_normal((len(labels), centres.shape[1]), dtype=np.float32)
    return features.astype(np.float32), labels


def ridge_rows(repeats: int) -> tuple[list[list[object]], float]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM), dtype=np.float32) * 0.15
    train_x, train_y = clustered_features(SHOTS, rng, centres)
    test_x, test_y = clustered_features(TEST_PER_CLASS, rng, centres)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        accuracy = fewshot_ridge(train_x, train_y, test_x, test_y, num_classes=CLASSES)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    solve = median(times)
    pool_x, pool_y = clustered_features(POOL_PER_CLASS, rng, centres)
    start = time.perf_counter()
    frame = fewshot_evaluate(pool_x, pool_y, test_x, test_y, shots=(1, 5, 10, 25), seeds=(0, 1, 2))
    sweep = time.perf_counter() - start
    rows = [
        [
            f"`fewshot_ridge`: {CLASSES} classes x {SHOTS} shots x {DIM} features, {len(test_y):,} test rows",
            f"{solve:.2f} s (median of {repeats}; CPU time of all threads {median(cpu_times):.2f} s; "
            f"accuracy {accuracy:.3f})",
        ],
        [
            f"`fewshot_evaluate`: shots 1, 5, 10, 25 x seeds 0, 1, 2 ({len(frame)} solves), same classes",
            f"{sweep:.2f} s in all",
        ],
    ]
    return rows, solve


def extraction_rows(rounds: int, quick: bool) -> tuple[list[list[object]], dict[str, float]]:
    torch.manual_seed(0)
    rows, rates = [], {}
    with tempfile.TemporaryDirectory(prefix="vitflow-bench-fewshot-") as tmp:
        source = "synthetic-vtab:natural_objects"
        uri = prepare_dataset(source, "bench-fewshot", tmp, progress=False, size=32, test=1000)
        ds = open_dataset(uri)
        model = create_model("vit_micro_4", num_classes=0, image_size=32).eval()
        tf = build_transform("eval", 32)

        def pipeline() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                x, _ = extract_features(
                    model, ds.loader("test", 256, tf, shuffle=False, repeat=False), torch.device("cpu")
                )
            return len(x) / (time.perf_counter() - start)

        pipeline()
        rate = median([pipeline() for _ in range(rounds)])
        rates["vit_micro_4"] = rate
        rows.append(["vit_micro_4 @32 (the demo)", "prepared shards, `extract_features`", 256, rate])
    for name, batch in [("vit_ti_16", 32)] + ([] if quick else [("vit_b_16", 8)]):
        model = create_model(name, num_classes=0, image_size=224).eval()
        x = torch.randn(batch, 3, 224, 224)

        @torch.inference_mode()
        def forward(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            model.forward_pre_logits(x)

        forward()
        rate = median([batch / timed(forward, 2) for _ in range(rounds)])
        rates[name] = rate
        rows.append([f"{name} @224", "in-memory images, `forward_pre_logits`", batch, rate])
    return rows, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no B/16")
    parser.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/PERFORMANCE.md")
    args = parser.parse_args()
    rounds = 2 if args.quick else 3
    extraction, rates = extraction_rows(rounds, args.quick)
    print(markdown_table(["model", "input", "batch", "images/s"], extraction), flush=True)
    ridge, solve = ridge_rows(3 if args.quick else 5)
    print(markdown_table(["ridge", "time"], ridge), flush=True)
    body = (
        "## Few-shot evaluation (`python bench/fewshot.py`)\n\n"
        f"Feature extraction, median of {rounds} runs (one full pass each for the shards row):\n\n"
        + markdown_table(["model", "input", "batch", "images/s"], extraction)
        + "\n\nRidge regression (float64, numpy/scipy with the machine's BLAS threads), class-clustered "
        "synthetic features:\n\n"
        + markdown_table(["what", "time"], ridge)
        + f"\n\nGoal: the 1,000-class x 25-shot solve in at most 2 s: {solve:.2f} s "
        + ("(met)." if solve <= 2.0 else "(not met).")
        + f"\n\nMachine: {machine_line()}\n"
    )
    print(body)
    if not args.no_write:
        update_section("fewshot", body)
        figure = f"solve {solve:.2f} s; extraction " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items())
        save_results("fewshot", {"fewshot": {"figure": figure, "met": solve <= 2.0, "note": ""}})
        write_summary()


if __name__ == "__main__":
    main()
