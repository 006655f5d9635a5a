"""Streaming loader over a prepared split: deterministic, resumable, split across DDP ranks and workers, and with
a global batch that holds the same samples whatever the world size.

Epoch e of a split is one global order of its rows, a function of (seed, e) only: the shards permuted, their rows
concatenated, then the classic shuffle buffer, simulated on row numbers. The loader cuts the endless stream of
epochs (one pass with ``repeat=False``) into chunks of ``batch_size`` positions: rank r's j-th batch is chunk
``j * world_size + r``, made by that rank's worker ``j % workers``; each (rank, worker) pair is a *slot*. A training
step of world_size x accum_steps batches therefore covers the same positions, with the same augmentation (seeded
per position), on one process or many: only the float reductions differ. Every sample is read once per epoch.

A slot knows its positions in advance from integers only; it streams the shards in the epoch's order, reads just
its rows (skipping or ranged-reading past the others) and holds early arrivals until their turn, about
2 x buffer / slots samples. The DataLoader interleaves its workers round-robin, which hands a rank's batches out
in order, so the number of batches a rank has consumed is the loader's state: on restore every worker recomputes
where it stood, and worker ids are rotated so the round-robin resumes at the right one.

Images are decoded and augmented in the workers, or, with ``decode_device``, the workers read bytes only and the
main process decodes each batch on that device (batched nvJPEG on CUDA) and augments it there under the same
per-sample seeds: the same crops and flips as on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vit import storage
from vit.data.shards import decode_batch, read_members, transform_encoded

STATE_VERSION = 2


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, 3, H, W) in [-1, 1]
    labels: torch.Tensor  # int64 (B,)
    index: torch.Tensor  # int64 (B,): rows of ds.manifest(split)


class EncodedBatch(NamedTuple):
    """What the workers hand over when the main process decodes (``decode_device``)."""

    blobs: list[torch.Tensor]  # uint8 (bytes,): one encoded image each
    seeds: list[int]  # each sample's augmentation seed
    labels: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class SplitIndex:
    """What a worker needs to know about a split, as numpy arrays (cheap to pickle to spawned workers). The rows
    of a shard are contiguous: shard ``s`` holds rows ``starts[s] : starts[s] + counts[s]``."""

    shard_uris: tuple[str, ...]
    starts: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    widths: np.ndarray
    heights: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def rows_of(self, shard: int) -> np.ndarray:
        return np.arange(self.starts[shard], self.starts[shard] + self.counts[shard])


@dataclass(frozen=True)
class StreamConfig:
    index: SplitIndex
    transform: Callable
    batch_size: int  # per rank: one chunk of the global order
    seed: int
    shuffle: bool
    shuffle_buffer: int
    repeat: bool
    drop_last: bool
    rank: int
    world_size: int
    workers: int  # roles per rank (>= 1; 1 when loading in the main process)
    decode_device: str | None = None  # None: workers decode; else the main process decodes on this device

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the shards in the order epoch ``epoch`` reads them, every row in the order it emits them): a function
        of (seed, epoch) only, the same for every world size and worker count."""
        n = len(self.index.shard_uris)
        if not self.shuffle:
            return np.arange(n), np.arange(self.index.num_rows)
        shards = np.random.default_rng([self.seed, epoch]).permutation(n)
        rows = np.concatenate([self.index.rows_of(s) for s in shards]) if n else np.zeros(0, np.int64)
        return shards, buffer_shuffle(rows, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, 1]))

    def pass_batches(self) -> int:
        """Chunks of ``batch_size`` in one pass over the split (``repeat=False``), over all ranks."""
        n, m = self.index.num_rows, self.batch_size
        return n // m if self.drop_last else -(-n // m)

    def rank_batches(self) -> int:
        return len(range(self.rank, self.pass_batches(), self.world_size))

    def role_positions(self, role: int, first: int, pass_epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, positions) of one slot's samples from its ``first``-th batch on, an epoch at a time. Positions
        count samples of the endless stream of epochs; pass ``p`` of a ``repeat=False`` loader is epoch ``p``.
        The slot's k-th batch is chunk ``(role + k * workers) * world_size + rank``."""
        n, m, period = self.index.num_rows, self.batch_size, self.slots * self.batch_size
        if n == 0:
            return
        base = 0 if self.repeat else pass_epoch * n
        end = math.inf if self.repeat else base + min(n, self.pass_batches() * m)
        origin = base + (role * self.world_size + self.rank) * m  # where this slot's first chunk starts
        start = origin + first * period
        epoch = start // n
        while epoch * n < end:
            low, high = max(epoch * n, start), min((epoch + 1) * n, end)
            chunks = np.arange(
                max(first, -(-(low - origin - m + 1) // period)), max(first, -(-(high - origin) // period))
            )
            positions = (origin + chunks[:, None] * period + np.arange(m)).ravel()
            yield epoch, positions[(positions >= low) & (positions < high)]
            epoch += 1


def buffer_shuffle(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``size`` emits ``rows`` in: fill the buffer, then each new row replaces a
    random buffered one, which is emitted; the rest leaves in random order. Equal to a full permutation when the
    buffer holds everything. Vectorised: the row emitted at step t is the last one that entered the picked place."""
    n = len(rows)
    if size >= n:
        return rows[rng.permutation(n)]
    picks = rng.integers(0, size, n - size)
    times = np.argsort(picks, kind="stable")  # steps grouped by the place they pick, in time order
    grouped = picks[times]
    starts = np.r_[True, grouped[1:] != grouped[:-1]]
    previous = np.r_[-1, times[:-1]]
    previous[starts] = -1  # the first pick of a place emits the row it was filled with
    last_entrant = np.empty(n - size, np.int64)
    last_entrant[times] = previous
    head = np.where(last_entrant >= 0, rows[size + last_entrant], rows[picks])
    ends = np.r_[starts[1:], True]
    remaining = rows[:size].copy()
    remaining[grouped[ends]] = rows[size + times[ends]]
    return np.concatenate([head, remaining[rng.permutation(size)]])


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of the stream: independent of who loads it."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


def _read_in_order(index: SplitIndex, shards: np.ndarray, order: list[int]) -> Iterator[tuple[int, bytes]]:
    """Stream ``shards`` and yield (row, bytes) in ``order``, holding early arrivals until their turn."""
    if not order:
        return
    wanted = np.zeros(index.num_rows, dtype=bool)
    wanted[order] = True
    pending: dict[int, bytes] = {}
    next_pos = 0
    for shard in shards:
        rows = index.rows_of(shard)
        rows = rows[wanted[rows]]
        if not len(rows):
            continue
        members = read_members(index.shard_uris[shard], index.offsets[rows], index.sizes[rows])
        for row, data in zip(rows.tolist(), members, strict=True):
            pending[row] = data
            while next_pos < len(order) and order[next_pos] in pending:
                yield order[next_pos], pending.pop(order[next_pos])
                next_pos += 1
    if next_pos != len(order):
        raise storage.StorageError(f"shards ended before {len(order) - next_pos} of their samples were read")


class ShardStream(IterableDataset):
    """The per-worker stream of whole batches (DataLoader with ``batch_size=None``). Module-level and holding
    only picklable state, so workers can be spawned. ``starts[role]``: batches that role already produced."""

    def __init__(self, config: StreamConfig, starts: list[int], rotation: int, pass_epoch: int) -> None:
        self.config, self.starts, self.rotation, self.pass_epoch = config, starts, rotation, pass_epoch

    def __iter__(self) -> Iterator[Batch | EncodedBatch]:
        info = get_worker_info()
        role = ((info.id if info else 0) + self.rotation) % self.config.workers
        pending: list[tuple[int, int, bytes]] = []
        for sample in self._samples(role):
            pending.append(sample)
            if len(pending) == self.config.batch_size:
                yield self._collate(pending)
                pending = []
        if pending and not self.config.drop_last:
            yield self._collate(pending)

    def _samples(self, role: int) -> Iterator[tuple[int, int, bytes]]:
        """(position, row, encoded image) of this role's samples, in order."""
        cfg = self.config
        for epoch, positions in cfg.role_positions(role, self.starts[role], self.pass_epoch):
            if not len(positions):
                continue
            shards, rows = cfg.epoch_rows(epoch)
            order = rows[positions - epoch * cfg.index.num_rows].tolist()
            for position, (row, data) in zip(positions.tolist(), _read_in_order(cfg.index, shards, order), strict=True):
                yield position, row, data

    def _collate(self, samples: list[tuple[int, int, bytes]]) -> Batch | EncodedBatch:
        cfg, index = self.config, self.config.index
        rows = np.array([row for _, row, _ in samples], dtype=np.int64)
        labels, rows_t = torch.from_numpy(index.labels[rows]), torch.from_numpy(rows)
        seeds = [sample_seed(cfg.seed, position) for position, _, _ in samples]
        if cfg.decode_device is not None:
            blobs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, _, data in samples]
            return EncodedBatch(blobs, seeds, labels, rows_t)
        images = []
        with torch.random.fork_rng(devices=[]):
            for seed, (_, row, data) in zip(seeds, samples, strict=True):
                torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
                images.append(transform_encoded(cfg.transform, data, int(index.widths[row]), int(index.heights[row])))
        return Batch(torch.stack(images), labels, rows_t)


def decode_encoded(batch: EncodedBatch, transform: Callable | None, device: torch.device) -> Batch:
    """Decode a batch on ``device`` (batched nvJPEG on CUDA) and augment it there, each sample under the seed the
    worker path uses, so the crops and flips equal the CPU path's."""
    images = []
    with torch.random.fork_rng(devices=[]):  # the transforms draw from the CPU generator whatever the device
        for seed, image in zip(batch.seeds, decode_batch(batch.blobs, device), strict=True):
            torch.default_generator.manual_seed(seed)
            images.append(transform(image) if transform is not None else image)
    return Batch(torch.stack(images), batch.labels, batch.index)


class ShardLoader:
    """Iterable over `Batch`es of one split; see the module docstring. Use one iterator at a time: the state is
    the number of batches handed out since the start (``repeat=True``) or since the start of the current pass.
    ``pin_memory``: batches come in page-locked memory, for asynchronous copies to a GPU."""

    def __init__(
        self,
        dataset: str,
        split: str,
        config: StreamConfig,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ) -> None:
        self.dataset, self.split, self.config = dataset, split, config
        self.num_workers = num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0  # passes completed (repeat=False); always 0 with repeat=True, whose stream never ends
        self.batches = 0

    def _plan(self) -> tuple[list[int], int]:
        """The batches each worker role has produced after ``self.batches``, and the role of the next batch (the
        round-robin hands out a rank's batches in order, role ``j % workers`` making batch j)."""
        roles = self.config.workers
        return [len(range(role, self.batches, roles)) for role in range(roles)], self.batches % roles

    def __len__(self) -> int:
        """Batches in one pass on this rank (``repeat=False`` only)."""
        if self.config.repeat:
            raise TypeError("a repeating loader is endless; it has no length")
        return self.config.rank_batches()

    def __iter__(self) -> Iterator[Batch]:
        starts, rotation = self._plan()
        stream = ShardStream(self.config, starts, rotation, self.epoch)
        on_device = self.config.decode_device is not None
        if self.num_workers == 0:
            batches = iter(stream)
        else:
            batches = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                    pin_memory=self.pin_memory and not on_device,
                    multiprocessing_context=self.multiprocessing_context,
                )
            )
        for batch in batches:
            self.batches += 1
            if on_device:
                batch = decode_encoded(batch, self.config.transform, torch.device(self.config.decode_device))
            elif self.pin_memory and self.num_workers == 0:
                batch = Batch(batch.images.pin_memory(), batch.labels.pin_memory(), batch.index)
            yield batch
        if not self.config.repeat:
            self.epoch, self.batches = self.epoch + 1, 0

    # ---- state

    def _identity(self) -> dict:
        cfg = self.config
        return {
            "dataset": self.dataset,
            "split": self.split,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "shuffle": cfg.shuffle,
            "shuffle_buffer": cfg.shuffle_buffer,
            "repeat": cfg.repeat,
            "drop_last": cfg.drop_last,
            "world_size": cfg.world_size,
            "num_workers": self.num_workers,
        }

    def state_dict(self) -> dict:
        """A small JSON-able dict; with ``repeat=True`` it is the same on every rank (save it from rank 0)."""
        return {"version": STATE_VERSION, **self._identity(), "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped; refuses a state saved with a different setup, which
        would see different samples."""
        identity = self._identity().items()
        mismatched = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in identity if state.get(k) != v]
        if state.get("version") != STATE_VERSION or mismatched:
            raise ValueError("loader state does not fit this loader (" + "; ".join(mismatched or ["version"]) + ")")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


class MapDataset(Dataset):
    """Random access to a small split (VTAB-1k, minival, few-shot subsets), held in memory as encoded bytes and
    decoded on access. Returns ``(image, label)``; the image is ``transform(uint8 CHW)``, or the uint8 CHW tensor
    itself when there is no transform."""

    def __init__(
        self, blobs: list[bytes], labels: np.ndarray, sizes: np.ndarray, transform: Callable | None = None
    ) -> None:
        self.blobs, self.labels, self.sizes, self.transform = blobs, labels, sizes, transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        width, height = map(int, self.sizes[i])
        return transform_encoded(self.transform, self.blobs[i], width, height), int(self.labels[i])
