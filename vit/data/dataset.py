"""A prepared dataset, opened from its URI: facts, manifest, streaming loaders, map-style access."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from vit import storage
from vit.data.base import DataError
from vit.data.shards import read_members, shard_uri

if TYPE_CHECKING:  # torch's modules: imported where used, so that reading a dataset's facts does not import torch
    from vit.data.loader import MapDataset, ShardLoader, SplitIndex

SHUFFLE_BUFFER = 2000  # samples: the global shuffle buffer of `vit.data.loader`


class PreparedDataset:
    """A complete prepared dataset (its info.json exists)."""

    def __init__(self, uri: str, info: dict) -> None:
        self.uri, self.info = uri.rstrip("/"), info
        self.name: str = info["name"]
        self.fingerprint: str = info["fingerprint"]
        self.splits: list[str] = list(info["splits"])
        self._manifests: dict[str | None, pd.DataFrame] = {}

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s):,}" for s in self.splits)
        return f"PreparedDataset({self.uri!r}, {self.num_classes} classes, {counts})"

    @cached_property
    def classes(self) -> list[str]:
        return json.loads(storage.read_text(storage.join(self.uri, "classes.json")))

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DataError(f"dataset {self.name} has no split {split!r}; its splits: {', '.join(self.splits)}")

    def count(self, split: str) -> int:
        self._check_split(split)
        return int(self.info["counts"][split])

    def manifest(self, split: str | None = None) -> pd.DataFrame:
        """Every row (``split=None``), or one split's rows: row ``i`` is ``Batch.index == i`` of that split."""
        if None not in self._manifests:
            data = storage.read_bytes(storage.join(self.uri, "manifest.parquet"))
            self._manifests[None] = pd.read_parquet(io.BytesIO(data))
        if split is None:
            return self._manifests[None]
        self._check_split(split)
        if split not in self._manifests:
            frame = self._manifests[None]
            self._manifests[split] = frame[frame["split"] == split].reset_index(drop=True)
        return self._manifests[split]

    def split_index(self, split: str, subset: int | None = None, subset_seed: int = 0) -> SplitIndex:
        """The split's rows, or with ``subset`` the rows of :func:`nested_subset` (in their manifest order)."""
        from vit.data.loader import SplitIndex

        frame = self.manifest(split)
        if subset is not None:
            frame = frame.iloc[nested_subset(len(frame), subset, subset_seed)]
        codes, shards = pd.factorize(frame["shard"], sort=False)
        if len(codes) and np.any(np.diff(codes) < 0):
            raise DataError(f"{self.uri}: manifest rows of split {split!r} are not grouped by shard; prepare it again")
        counts = np.bincount(codes, minlength=len(shards)) if len(codes) else np.zeros(0, np.int64)
        return SplitIndex(
            shard_uris=tuple(shard_uri(self.uri, s) for s in shards),
            starts=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts,
            counts=counts.astype(np.int64),
            offsets=frame["offset"].to_numpy(np.int64),
            sizes=frame["size"].to_numpy(np.int64),
            labels=frame["label"].to_numpy(np.int64),
            widths=frame["width"].to_numpy(np.int64),
            heights=frame["height"].to_numpy(np.int64),
        )

    def loader(
        self,
        split: str,
        batch_size: int,
        transform: Callable,
        *,
        shuffle: bool = True,
        seed: int = 0,
        repeat: bool = True,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        shuffle_buffer: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        decode_device: str | None = None,
        subset: int | None = None,
        subset_seed: int = 0,
    ) -> ShardLoader:
        """A streaming loader of ``Batch``es; see `vit.data.loader`. ``rank``/``world_size`` default to
        torch.distributed's when it is initialised, else 0/1. ``shuffle_buffer``: samples (default
        ``SHUFFLE_BUFFER``). ``multiprocessing_context="spawn"`` is safe where forking is not (threads or CUDA in
        the parent). ``decode_device`` (e.g. ``"cuda"``): the workers only read, and each batch is decoded and
        augmented on that device in this process. ``subset``: only the rows of :func:`nested_subset` (a random
        subset of ``subset`` samples, the same for every loader with the same ``subset_seed``)."""
        import torch

        from vit.data.loader import ShardLoader, StreamConfig

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if transform is None:
            raise ValueError("a loader needs a transform, e.g. vit.data.build_transform('eval', 224)")
        if rank is None or world_size is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if initialised else 0
            world_size = torch.distributed.get_world_size() if initialised else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        config = StreamConfig(
            index=self.split_index(split, subset, subset_seed),
            transform=transform,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=SHUFFLE_BUFFER if shuffle_buffer is None else shuffle_buffer,
            repeat=repeat,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            workers=max(1, num_workers),
            decode_device=decode_device,
        )
        return ShardLoader(
            self.fingerprint,
            split,
            config,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            multiprocessing_context=multiprocessing_context,
        )

    def map_dataset(
        self, split: str, transform: Callable | None = None, *, indices: Sequence[int] | None = None
    ) -> MapDataset:
        """Map-style access to a split, or to the rows ``indices`` of it (a few-shot subset): only the bytes of
        those samples are read (ranged reads where they are sparse in a remote shard)."""
        from vit.data.loader import MapDataset

        index = self.split_index(split)
        rows = np.arange(index.num_rows) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= index.num_rows):
            raise IndexError(f"indices out of range for split {split!r} with {index.num_rows} rows")
        shard_of = np.repeat(np.arange(len(index.counts)), index.counts)
        blobs: dict[int, bytes] = {}

        def load(shard: int) -> None:
            wanted = np.unique(rows[shard_of[rows] == shard])
            members = read_members(index.shard_uris[shard], index.offsets[wanted], index.sizes[wanted])
            blobs.update(zip(wanted.tolist(), members, strict=True))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(load, np.unique(shard_of[rows]).tolist()))
        sizes = np.stack([index.widths[rows], index.heights[rows]], axis=1)
        return MapDataset([blobs[r] for r in rows.tolist()], index.labels[rows], sizes, transform)


def nested_subset(rows: int, size: int, seed: int = 0) -> np.ndarray:
    """The first ``size`` of one seeded permutation of ``rows`` rows, sorted: subsets of one seed are nested
    (a smaller one lies inside every larger one), as the paper's random 9M/30M/90M subsets of JFT-300M."""
    if not 0 < size <= rows:
        raise DataError(f"a subset of {size:,} samples needs 1 to {rows:,} (the split's size)")
    return np.sort(np.random.default_rng([seed, rows]).permutation(rows)[:size])


def open_dataset(uri: str) -> PreparedDataset:
    """Open a prepared dataset by its URI (``.../datasets/<name>/<fingerprint>``), or the newest complete version
    under ``.../datasets/<name>``. Refuses an incomplete dataset (no info.json) with a clear error."""
    uri = str(uri).rstrip("/")
    try:
        storage.validate_uri(uri)
        if storage.exists(storage.join(uri, "info.json")):
            return PreparedDataset(uri, json.loads(storage.read_text(storage.join(uri, "info.json"))))
        versions = []
        for version in storage.list_dirs(uri):
            info_uri = storage.join(uri, version, "info.json")
            if storage.exists(info_uri):
                info = json.loads(storage.read_text(info_uri))
                versions.append((info.get("created", ""), storage.join(uri, version), info))
        if versions:
            _, newest, info = max(versions, key=lambda v: v[0])
            return PreparedDataset(newest, info)
        if storage.list_files(uri):
            raise DataError(
                f"{uri} is an incomplete dataset (no info.json): its preparation did not finish; run "
                "`vitflow data prepare` again"
            )
    except storage.StorageError as exc:
        raise DataError(f"cannot open dataset {uri}: {exc}") from None
    raise DataError(f"no prepared dataset at {uri}: prepare one with `vitflow data prepare FORMAT:PATH --name NAME`")
