"""Data loading throughput: vitflow's shard loader against torchvision ``ImageFolder`` + PIL on the same JPEGs,
with the same DataLoader workers, batch size and transforms; and the shard loader streaming from S3 (a moto server
on loopback) against local disk. Also the preparation rate.

The JPEGs are photo-like (smooth structure plus sensor-like noise, quality 90), so decoding costs what it costs on
real photos: ImageNet-sized 500x375 and CIFAR-sized 32x32. Medians of interleaved rounds, one full pass per
measurement (worker start-up included, as a training epoch pays it).

    python bench/data.py [--images N] [--workers W] [--rounds R] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleaved, machine_line, markdown_table, median, update_section  # noqa: E402
from vit import storage  # noqa: E402
from vit.data import build_transform, open_dataset, prepare_dataset  # noqa: E402

CLASSES = 10
BATCH = 64
HEADERS = ["loader", "JPEGs", "transform", "images/s", "vs ImageFolder"]
# JPEG size -> (transform kind, resolution): ImageNet-like photos for 224 px training and evaluation and for
# low-resolution pre-training (where the shard loader decodes JPEGs at reduced size in the DCT domain), and
# CIFAR-sized images (where per-image overheads dominate).
SETTINGS = {(500, 375): [("pretrain", 224), ("eval", 224), ("pretrain", 64)], (32, 32): [("finetune", 32)]}


def photo(seed: int, width: int = 500, height: int = 375) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 10, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpegs(root: Path, count: int, width: int, height: int) -> Path:
    for i in range(count):
        folder = root / "train" / f"class_{i % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.jpg").write_bytes(photo(i, width, height))
    return root


def images_per_second(batches: Callable[[], object]) -> float:
    start, n = time.perf_counter(), 0
    for batch in batches():
        n += len(batch[1])
    return n / (time.perf_counter() - start)


def imagefolder(root: Path, transform, workers: int) -> Callable[[], object]:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root / "train"), transform=transform)  # default loader: PIL open + convert("RGB")
    return lambda: torch.utils.data.DataLoader(dataset, BATCH, shuffle=True, num_workers=workers)


def shards(uri: str, transform, workers: int) -> Callable[[], object]:
    ds = open_dataset(uri)
    return lambda: ds.loader("train", BATCH, transform, repeat=False, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    storage.ensure_bucket("s3://bench")
    rows, prepare_rates = [], []
    with tempfile.TemporaryDirectory(prefix="vitflow-bench-data-") as tmp:
        for (width, height), settings in SETTINGS.items():
            count = args.images if width > 64 else 8 * args.images  # small ones: passes long enough to time
            root = write_jpegs(Path(tmp) / f"jpegs-{width}", count, width, height)
            source = f"imagefolder:{root}"
            start = time.perf_counter()
            local = prepare_dataset(source, "bench", f"{tmp}/store", progress=False, workers=args.workers)
            prepare_rates.append(f"{count / (time.perf_counter() - start):,.0f} images/s at {width}x{height}")
            remote = prepare_dataset(source, "bench", "s3://bench/store", progress=False, workers=args.workers)
            for kind, size in settings:
                tf = build_transform(kind, size)
                results = interleaved(
                    {
                        "imagefolder": lambda tf=tf, root=root: images_per_second(imagefolder(root, tf, args.workers)),
                        "local": lambda tf=tf, uri=local: images_per_second(shards(uri, tf, args.workers)),
                        "s3": lambda tf=tf, uri=remote: images_per_second(shards(uri, tf, args.workers)),
                    },
                    rounds=args.rounds,
                )
                base = median(results["imagefolder"])
                for name, label in (
                    ("imagefolder", "torchvision ImageFolder + PIL"),
                    ("local", "vitflow shards, local disk"),
                    ("s3", "vitflow shards, S3 (moto on loopback)"),
                ):
                    rate = median(results[name])
                    rows.append([label, f"{width}x{height}", f"{kind} {size}px", rate, f"{rate / base:.2f}x"])
                print(markdown_table(HEADERS, rows[-3:]), flush=True)
    server.stop()

    table = markdown_table(HEADERS, rows)
    best = max((float(r[4][:-1]), f"{r[2]} from {r[1]} JPEGs") for r in rows if r[0].startswith("vitflow"))
    body = "\n".join(
        [
            "## Data loading (`bench/data.py`)",
            "",
            f"{args.images} photo-like 500x375 JPEGs and {8 * args.images} 32x32 ones (quality 90), batch {BATCH}, "
            f"{args.workers} DataLoader "
            "workers, one full shuffled pass per measurement including worker start-up, median of "
            f"{args.rounds} interleaved rounds. Same workers and the same `vit.data.build_transform` transforms "
            "for every loader.",
            "",
            table,
            "",
            f"Preparation (decode every image once, write shards, {args.workers} threads): "
            + "; ".join(prepare_rates)
            + ".",
            "",
            f"Goal: at least 2x ImageFolder + PIL; best here {best[0]:.2f}x ({best[1]}). Where the shard loader "
            "gains: JPEGs are decoded at 1/2-1/8 size in the DCT domain when the sample's own crop allows it "
            "(low-resolution pre-training), torchvision's libjpeg-turbo decoder and uint8 kernels otherwise, "
            "sequential reads of few large files, whole batches built in the workers. What limits it: on "
            "500x375 photos at 224 px both loaders spend most of their time in full-size Huffman decoding in the "
            "same libjpeg-turbo, which no loader design removes; beyond that takes a GPU decoder "
            "(`torchvision.io.decode_jpeg(device='cuda')`, DALI) or shards of pre-resized images. The S3 rows "
            "stream from moto, an in-process Python S3 server sharing these two CPUs, so they bound S3 throughput "
            "from below.",
            "",
            f"Machine: {machine_line()}",
        ]
    )
    print(body)
    if not args.no_write:
        update_section("data", body)


if __name__ == "__main__":
    main()
