"""Preparation: a source in its own format -> a validated, fingerprinted, sharded dataset in the artifact store.

``<artifact-root>/datasets/<name>/<fingerprint>/`` holds ``shards/<group>-NNNNNN.tar`` (WebDataset-compatible,
bounded size), ``manifest.parquet`` (one row per sample and split: key, split, label, shard, offset, size, sha256,
width, height, and ReaL labels for ImageNet), ``classes.json``, ``quarantine.csv`` (source, reason) and, written
last, ``info.json``: a dataset is visible only once info.json exists, on a local disk and on S3 alike. Two runs
preparing the same dataset at once never interleave: one holds ``<fingerprint>.lock`` (`vit.storage.exclusive`) and
prepares, the other waits for its info.json and reuses the result.

Every sample is decoded once. Samples that cannot be used (missing, empty, truncated or non-image files, labels out
of range) go to quarantine.csv; preparation fails, publishing nothing, only when their share exceeds
``max_corrupt_fraction``. Each sample is stored once, in the shards of its "group" (an official split, or the
minival / train_minus_minival parts of train); a split is a list of groups, so a derived split (``train`` when a
minival is held out, VTAB's ``train800val200`` for synthetic tasks) costs no extra bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from vit import storage
from vit.data.base import CorruptDataError, DataError, Item, Source
from vit.data.shards import ShardWriter
from vit.data.sources import read_source

PREP_VERSION = 1
SHARD_BYTES = 128 * 1024 * 1024
SHARD_SAMPLES = 2000
MANIFEST_COLUMNS = ["key", "split", "label", "shard", "offset", "size", "sha256", "width", "height"]
VTAB1K_TRAIN, VTAB1K_VAL = 800, 200
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Encoded:
    """A validated sample, ready for a shard."""

    data: bytes
    ext: str
    width: int
    height: int


# --------------------------------------------------------------------------------------------------------------
# Validation and encoding (runs on a thread pool: PIL and zlib release the GIL)


def _png(array: np.ndarray) -> Encoded:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return Encoded(buf.getvalue(), "png", array.shape[1], array.shape[0])


def encode_item(item: Item, num_classes: int) -> Encoded | str:
    """The stored form of one item, or the reason it goes to quarantine. JPEG and PNG files in L or RGB mode are
    kept byte for byte; other formats and modes (CMYK, palette, alpha, 16-bit, BMP, ...) are stored as RGB PNG."""
    if item.problem:
        return item.problem
    if not 0 <= item.label < num_classes:
        return f"label {item.label} out of range [0, {num_classes})"
    payload = item.payload
    if not isinstance(payload, Path):
        array = payload() if callable(payload) else payload
        if array is None or array.dtype != np.uint8 or array.ndim not in (2, 3):
            return "not an image array"
        return _png(array)
    try:
        data = payload.read_bytes()
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}"
    if not data:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in ("JPEG", "PNG") and image.mode in ("L", "RGB"):
                return Encoded(data, "jpg" if image.format == "JPEG" else "png", image.width, image.height)
            return _png(np.asarray(image.convert("RGB")))
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"corrupt or truncated image: {exc}"


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.map`` with at most ``window`` items in flight, so memory stays bounded on any dataset size."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            head, future = pending.popleft()
            yield head, future.result()
    while pending:
        head, future = pending.popleft()
        yield head, future.result()


# --------------------------------------------------------------------------------------------------------------
# Splits


def _stratified_holdout(items: list[Item], fraction: float, seed: int) -> set[int]:
    """Positions of a seeded, stratified ``fraction`` of ``items``: round(fraction * n) of each class (at least one
    of a class with two or more), the first of a seeded permutation of the class."""
    by_class: dict[int, list[int]] = {}
    for pos, item in enumerate(items):
        by_class.setdefault(item.label, []).append(pos)
    rng = np.random.default_rng([seed, 0x6D696E69])
    held: set[int] = set()
    for label in sorted(by_class):
        members = by_class[label]
        take = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        held.update(members[i] for i in rng.permutation(len(members))[:take])
    return held


def split_plan(source: Source, minival_fraction: float, seed: int) -> tuple[dict[str, list[Item]], dict[str, list]]:
    """(groups: the disjoint sets of samples that get shards, splits: split name -> its groups)."""
    groups = dict(source.splits)
    splits = {name: [name] for name in source.splits}
    if minival_fraction > 0 and groups.get("train"):
        train = groups.pop("train")
        held = _stratified_holdout(train, minival_fraction, seed)
        groups["train_minus_minival"] = [item for pos, item in enumerate(train) if pos not in held]
        groups["minival"] = [item for pos, item in enumerate(train) if pos in held]
        splits.update(train=["train_minus_minival", "minival"], minival=["minival"])
        splits["train_minus_minival"] = ["train_minus_minival"]
    for name, parts in source.unions.items():
        splits[name] = [group for part in parts for group in splits[part]]
    return groups, splits


# --------------------------------------------------------------------------------------------------------------
# Fingerprint and options


def fingerprint(source: Source, settings: dict, seed: int) -> str:
    """Hash of the source listing (names, sizes, modification times) and every option that shapes the output."""
    h = hashlib.sha256()
    head = {
        "prep_version": PREP_VERSION,
        "format": source.format,
        "seed": seed,
        "settings": settings,
        "classes": source.classes,
        "info": source.info,
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, size, mtime in sorted(source.listing):
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def _number(options: dict, name: str, default, kind: type, low: float, high: float):
    value = options.pop(name, default)
    if value is None:
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise DataError(f"option {name}={value!r} is not a {kind.__name__}") from None
    if not low <= value <= high:
        raise DataError(f"option {name}={value} is out of range [{low}, {high}]")
    return value


def _artifact_root(artifact_root: str) -> str:
    try:
        root = storage.validate_uri(str(artifact_root))
    except storage.StorageError as exc:
        raise DataError(f"bad artifact root: {exc}") from None
    if storage.is_http(root):
        raise DataError(f"artifact root {root} is read-only over http(s): use a local path, file:// or s3://")
    try:
        storage.check_writable(root)
    except (storage.StorageError, OSError) as exc:
        raise DataError(f"cannot write to the artifact root {root}: {exc}") from None
    return root.rstrip("/")


# --------------------------------------------------------------------------------------------------------------
# The command


def prepare_dataset(
    source: str,
    name: str,
    artifact_root: str,
    *,
    max_corrupt_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> str:
    """Prepare ``source`` ("FORMAT:PATH") as dataset ``name`` under ``artifact_root``; returns its URI
    ``<artifact_root>/datasets/<name>/<fingerprint>``. An unchanged source with the same options returns the
    existing URI without work.

    Options (any format): ``minival=F`` (held-out fraction of train; defaults per protocol: 1% ImageNet, 2% CIFAR,
    10% Pets/Flowers, none otherwise), ``keep_classes=5-9`` (only these class ids, relabelled from 0), ``vtab1k=true``
    (VTAB-1k's train800 / val200 / train800val200 drawn from train; test as is), ``max_<split>=N`` (first N samples
    of a split, applied last, e.g. ``max_train=4000``), ``shard_bytes=`` and ``shard_samples=`` (shard bounds),
    ``workers=`` (decoding threads). Format options: ``real=PATH`` (imagenet), ``task=NAME`` (vtab),
    ``num_classes=N`` (list), and the synthetic generators' parameters.

    Raises `DataError` for bad input, `CorruptDataError` when the corrupt share exceeds ``max_corrupt_fraction``.
    """
    if not _NAME.match(name or ""):
        raise DataError(f"bad dataset name {name!r}: use letters, digits, '.', '_' and '-'")
    if not 0.0 <= max_corrupt_fraction <= 1.0:
        raise DataError(f"max_corrupt_fraction must be between 0 and 1, got {max_corrupt_fraction}")
    root = _artifact_root(artifact_root)
    options = dict(options)
    settings = _settings(options)
    workers = _number(options, "workers", min(8, os.cpu_count() or 1), int, 1, 256)
    src = read_source(source, options, seed)
    if options:
        raise DataError(f"unknown option(s) for {src.format}: {', '.join(sorted(options))}")
    _apply_settings(src, settings, source, seed)
    uri = storage.join(root, "datasets", name, fingerprint(src, settings, seed))
    info_uri = storage.join(uri, "info.json")

    def waiting() -> None:
        if progress:
            print(f"{name}: another run is preparing {uri}; waiting to reuse it", file=sys.stderr)

    # One preparation per fingerprint: a concurrent run waits for this one's info.json and reuses it.
    lock = storage.exclusive(f"{uri}.lock", lambda: storage.exists(info_uri), on_wait=waiting)
    if lock is None:
        if progress:
            print(f"{name}: unchanged source, already prepared at {uri}", file=sys.stderr)
        return uri
    with lock:
        storage.delete_prefix(uri)  # leftovers of an interrupted run (never visible: no info.json)
        return _prepare(src, source, name, uri, seed, settings, max_corrupt_fraction, workers, progress)


def _class_ids(options: dict) -> list[int] | None:
    """Option ``keep_classes``: class ids to keep, as ``5-9``, ``0,2,4`` or a mix (``0-2,7``), in increasing order
    (not ``classes``: the synthetic generators' number of classes)."""
    value = options.pop("keep_classes", None)
    if value is None:
        return None
    ids: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in str(value).split(","))):
            low, _, high = part.partition("-")
            ids.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise DataError(f"option keep_classes={value!r}: write class ids as e.g. 5-9 or 0,2,4") from None
    if not ids:
        raise DataError(f"option keep_classes={value!r} names no class")
    return sorted(ids)


def _settings(options: dict) -> dict:
    """The preparation settings among ``options`` (taken out of it): fingerprinted with the source."""
    vtab1k = options.pop("vtab1k", False)
    subset = {  # only when given, so the fingerprints of datasets prepared without them stay as they were
        "keep_classes": _class_ids(options),
        "vtab1k": vtab1k if isinstance(vtab1k, bool) else str(vtab1k).lower() in ("1", "true", "yes"),
    }
    return {
        **{k: v for k, v in subset.items() if v},
        "minival": _number(options, "minival", None, float, 0.0, 0.5),
        "max": {k[4:]: _number(options, k, None, int, 1, 1 << 40) for k in sorted(options) if k.startswith("max_")},
        "shard_bytes": _number(options, "shard_bytes", SHARD_BYTES, int, 1, 1 << 40),
        "shard_samples": _number(options, "shard_samples", SHARD_SAMPLES, int, 1, 1 << 40),
    }


def _keep_classes(src: Source, ids: list[int]) -> None:
    """Only the samples of classes ``ids``, relabelled 0..len(ids)-1 in that order (e.g. held-out classes)."""
    if ids[-1] >= len(src.classes) or ids[0] < 0:
        raise DataError(f"option keep_classes: {src.format} has classes 0-{len(src.classes) - 1}, not {ids[-1]}")
    new = {old: i for i, old in enumerate(ids)}
    src.classes = [src.classes[i] for i in ids]
    for split, items in src.splits.items():
        src.splits[split] = [replace(item, label=new[item.label]) for item in items if item.label in new]


def _vtab1k(src: Source, seed: int) -> None:
    """VTAB-1k's splits (Zhai et al. 2019) from any source: train800 and val200 drawn (seeded) from the official
    train split, their union train800val200; the test split stays the official one."""
    train = src.splits.pop("train", None)
    if train is None or len(train) < VTAB1K_TRAIN + VTAB1K_VAL or "test" not in src.splits:
        raise DataError(
            f"option vtab1k: {src.format} needs a train split of at least {VTAB1K_TRAIN + VTAB1K_VAL} samples and "
            f"a test split (it has {', '.join(f'{k} ({len(v)})' for k, v in src.splits.items()) or 'none'})"
        )
    order = np.random.default_rng([seed, 0x7674616B]).permutation(len(train))
    src.splits["train800"] = [train[i] for i in sorted(order[:VTAB1K_TRAIN])]
    src.splits["val200"] = [train[i] for i in sorted(order[VTAB1K_TRAIN : VTAB1K_TRAIN + VTAB1K_VAL])]
    src.unions["train800val200"] = ["train800", "val200"]
    src.minival_fraction = 0.0


def _apply_settings(src: Source, settings: dict, source: str, seed: int) -> None:
    """Keep the ``keep_classes``, draw the ``vtab1k`` splits, cut the splits to their ``max_<split>`` and fix the
    minival fraction (the protocol's default if unset; none with vtab1k, whose val200 plays its part)."""
    if "keep_classes" in settings:
        _keep_classes(src, settings["keep_classes"])
    if settings.get("vtab1k"):
        if settings["minival"]:
            raise DataError("option minival: vtab1k holds out val200 instead; give one of them")
        _vtab1k(src, seed)
    for split, limit in settings["max"].items():
        if split not in src.splits:
            raise DataError(f"option max_{split}: {src.format} has no split {split!r} (it has {', '.join(src.splits)})")
        src.splits[split] = src.splits[split][:limit]
    if src.num_items == 0:
        raise DataError(f"empty dataset: {source} has no samples; check the path and its layout")
    if settings["minival"] is None:
        settings["minival"] = src.minival_fraction  # the protocol's default, fingerprinted as such
    src.minival_fraction = settings["minival"]


def _prepare(
    src: Source,
    source: str,
    name: str,
    uri: str,
    seed: int,
    settings: dict,
    max_corrupt_fraction: float,
    workers: int,
    progress: bool,
) -> str:
    start = time.perf_counter()
    groups, splits = split_plan(src, src.minival_fraction, seed)
    written = _write_shards(src, groups, name, uri, seed, settings, max_corrupt_fraction, workers, progress)
    manifest = _manifest(written.records, splits, list(src.extra_columns))
    counts = manifest.groupby("split", sort=False).size().to_dict()
    info = {
        "name": name,
        "format": src.format,
        "source": source,
        "location": src.location,
        "fingerprint": uri.rsplit("/", 1)[1],
        "prep_version": PREP_VERSION,
        "seed": seed,
        "settings": settings,
        "minival_fraction": src.minival_fraction,
        "num_classes": len(src.classes),
        "splits": list(splits),
        "counts": {split: int(counts.get(split, 0)) for split in splits},
        "split_groups": splits,
        "quarantined": len(written.quarantine),
        "bytes": written.stored_bytes,
        "shards": written.shard_count,
        "seconds": round(time.perf_counter() - start, 3),
        "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
        **src.info,
    }
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    storage.write_bytes(storage.join(uri, "manifest.parquet"), buf.getvalue())
    storage.write_text(storage.join(uri, "classes.json"), json.dumps(src.classes, indent=1))
    _write_quarantine(uri, written.quarantine)
    storage.write_text(storage.join(uri, "info.json"), json.dumps(info, indent=2))  # last: now it is visible
    if progress:
        print(summary(info, manifest, src.classes, uri), file=sys.stderr)
    return uri


@dataclass
class _Written:
    """What :func:`_write_shards` stored: manifest rows per split group, what it quarantined, sizes."""

    records: dict[str, list[dict]] = field(default_factory=dict)
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    stored_bytes: int = 0
    shard_count: int = 0


def _write_shards(
    src: Source,
    groups: dict,
    name: str,
    uri: str,
    seed: int,
    settings: dict,
    max_corrupt_fraction: float,
    workers: int,
    progress: bool,
) -> _Written:
    """Encode every item (in a thread pool, order kept) into the shards of its split group; fails once more than
    ``max_corrupt_fraction`` of the items were quarantined."""
    from tqdm import tqdm

    total = src.num_items
    allowed = math.floor(max_corrupt_fraction * total)
    shards_uri = storage.join(uri, "shards")
    out = _Written()
    seen_keys: set[str] = set()
    encode = partial(encode_item, num_classes=len(src.classes))
    # The bar shows images/s on a terminal (tqdm stays quiet when stderr is not one); the summary always prints.
    bar = tqdm(total=total, unit="img", desc=f"prepare {name}", disable=None if progress else True, file=sys.stderr)
    try:
        with contextlib.ExitStack() as stack:
            if storage.is_s3(uri):  # shards are staged locally, then uploaded
                staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitflow-prepare-")))
            else:  # written next to their final place, then renamed
                staging = storage.local_path(shards_uri)
                staging.mkdir(parents=True, exist_ok=True)
            pool = stack.enter_context(ThreadPoolExecutor(workers))
            uploads = stack.enter_context(ThreadPoolExecutor(2))
            for group_index, (group, items) in enumerate(groups.items()):
                writer = ShardWriter(
                    shards_uri, group, staging, uploads, settings["shard_bytes"], settings["shard_samples"]
                )
                order = np.random.default_rng([seed, group_index]).permutation(len(items))  # classes mixed
                rows = out.records[group] = []
                for item, result in _ordered_map(pool, encode, (items[i] for i in order), window=4 * workers):
                    bar.update()
                    if isinstance(result, str):
                        out.quarantine.append((item.source, result))
                        if len(out.quarantine) > allowed:
                            writer.discard()
                            raise _TooCorrupt
                        continue
                    key = _unique(item.key, seen_keys)
                    shard, offset = writer.add(key, result.ext, result.data, item.label)
                    rows.append(_row(src, item, result, key, shard, offset))
                    out.stored_bytes += len(result.data)
                writer.close()
                out.shard_count += writer.index + 1
    except _TooCorrupt:  # raised inside the pools, so every upload has finished before the clean-up
        bar.close()
        _fail(uri, out.quarantine, total, max_corrupt_fraction)
    bar.close()
    return out


def _row(src: Source, item: Item, result: Encoded, key: str, shard: str, offset: int) -> dict:
    """One manifest row: where a sample's bytes are, their checksum, its label, size and extra columns."""
    return {
        "key": key,
        "label": item.label,
        "shard": f"shards/{shard}",
        "offset": offset,
        "size": len(result.data),
        "sha256": hashlib.sha256(result.data).hexdigest(),
        "width": result.width,
        "height": result.height,
        **{col: (item.extra or {}).get(col, default) for col, default in src.extra_columns.items()},
    }


class _TooCorrupt(Exception):
    pass


def _unique(key: str, seen: set[str]) -> str:
    """Keys are unique within a dataset (``a.jpg`` and ``a.png`` would both be ``a``)."""
    candidate, n = key, 1
    while candidate in seen:
        n += 1
        candidate = f"{key}_{n}"
    seen.add(candidate)
    return candidate


def _manifest(records: dict[str, list[dict]], splits: dict[str, list[str]], extra: list[str]) -> pd.DataFrame:
    """One row per (split, sample): a split's rows are its groups' rows in shard order, so the rows of a shard are
    contiguous and a row's position is its index in ``manifest(split)``."""
    frames = []
    for split, parts in splits.items():
        rows = [row for group in parts for row in records[group]]
        frame = pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c != "split"] + extra)
        frame.insert(1, "split", split)
        frames.append(frame)
    manifest = pd.concat(frames, ignore_index=True)
    return manifest.astype({"label": "int64", "offset": "int64", "size": "int64", "width": "int32", "height": "int32"})


def _write_quarantine(uri: str, quarantine: list[tuple[str, str]]) -> str:
    target = storage.join(uri, "quarantine.csv")
    buf = io.StringIO()
    pd.DataFrame(quarantine, columns=["source", "reason"]).to_csv(buf, index=False)
    storage.write_text(target, buf.getvalue())
    return target


def _fail(uri: str, quarantine: list[tuple[str, str]], total: int, limit: float) -> None:
    """Stop as soon as the corrupt share is certain to exceed the limit: remove what was written, keep the list."""
    storage.delete_prefix(uri)
    where = _write_quarantine(uri, quarantine)
    raise CorruptDataError(
        f"at least {len(quarantine)} of {total} samples ({len(quarantine) / total:.2%}) are corrupt or unusable, "
        f"more than --max-corrupt-fraction {limit:.2%}; nothing was published. The list is at {where}: fix or "
        "remove those files, or raise the limit"
    )


def summary(info: dict, manifest: pd.DataFrame, classes: list[str], uri: str) -> str:
    """The closing report: counts per split and class, quarantined samples, bytes, time."""
    lines = [f"prepared {info['name']} ({info['format']}): {uri}"]
    lines.append(f"  {'split':<22}{'images':>10}{'classes':>9}  per class min / max")
    for split in info["splits"]:
        per_class = manifest.loc[manifest["split"] == split, "label"].value_counts()
        low, high = (int(per_class.min()), int(per_class.max())) if len(per_class) else (0, 0)
        lines.append(f"  {split:<22}{info['counts'][split]:>10,}{len(per_class):>9}  {low:,} / {high:,}")
    if len(classes) <= 20:
        table = manifest.groupby(["label", "split"]).size().unstack(fill_value=0)
        table = table.reindex(columns=info["splits"], fill_value=0)
        width = max(len(s) for s in info["splits"]) + 2
        lines.append(f"  {'class':<22}" + "".join(f"{s:>{width}}" for s in info["splits"]))
        for label, row in table.iterrows():
            lines.append(f"  {classes[label][:21]:<22}" + "".join(f"{int(v):>{width},}" for v in row))
    if info["quarantined"]:
        lines.append(f"  quarantined: {info['quarantined']:,} (list: {storage.join(uri, 'quarantine.csv')})")
    else:
        lines.append("  quarantined: 0")
    stored = manifest["key"].nunique()
    lines.append(
        f"  stored {stored:,} images, {info['bytes'] / 1e6:,.1f} MB in {info['shards']} shards in "
        f"{info['seconds']:.1f} s ({stored / max(info['seconds'], 1e-9):,.0f} images/s)"
    )
    return "\n".join(lines)
