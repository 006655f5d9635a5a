"""Streaming loader over a prepared split: deterministic, resumable, split across DDP ranks and workers.

Each (rank, worker) pair is a *slot*. In epoch e the shards are permuted with (seed, e); with at least as many
shards as slots, rank r takes ``perm[r::world]`` and worker w of it ``[w::workers]``; with fewer (tiny datasets),
every slot streams all shards and keeps the rows ``row % slots == slot``. Either way every sample is read exactly
once per epoch across all slots.

A slot's emission order is fixed in advance from integers only: the classic shuffle buffer (seeded by seed,
epoch, slot) simulated on row numbers. Streaming the shards then only has to hold samples until their turn, never
more than the buffer, and resuming after ``k`` samples reads just the shards that hold the rest of the order.

The DataLoader interleaves its workers' batches round-robin (skipping workers that are done), so the whole batch
sequence is a function of the number of batches consumed: that number is the loader's state. On restore every
worker recomputes where its role stood, and worker ids are rotated so the round-robin resumes at the right one.
Image decoding and augmentation happen in the workers; augmentation is seeded per batch, so it resumes too.
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
from vit.data.base import DataError
from vit.data.shards import read_members, transform_encoded

STATE_VERSION = 1


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, 3, H, W) in [-1, 1]
    labels: torch.Tensor  # int64 (B,)
    index: torch.Tensor  # int64 (B,): rows of ds.manifest(split)


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
    batch_size: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    repeat: bool
    drop_last: bool
    rank: int
    world_size: int
    workers: int  # roles per rank (>= 1; 1 when loading in the main process)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def slot(self, role: int) -> int:
        return self.rank * self.workers + role

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.index.shard_uris)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def by_shards(self) -> bool:
        return len(self.index.shard_uris) >= self.slots

    def slot_shards(self, epoch: int, role: int) -> np.ndarray:
        order = self.shard_order(epoch)
        return order[self.rank :: self.world_size][role :: self.workers] if self.by_shards() else order

    def slot_size(self, epoch: int, role: int) -> int:
        if self.by_shards():
            return int(self.index.counts[self.slot_shards(epoch, role)].sum())
        n, slot = self.index.num_rows, self.slot(role)
        return max(0, (n - slot + self.slots - 1) // self.slots)

    def epoch_order(self, epoch: int, role: int) -> tuple[np.ndarray, list[int]]:
        """(the shards this slot reads in epoch ``epoch``, in order; its rows in emission order)."""
        shards = self.slot_shards(epoch, role)
        rows = np.concatenate([self.index.rows_of(s) for s in shards]) if len(shards) else np.zeros(0, np.int64)
        if not self.by_shards():
            rows = rows[rows % self.slots == self.slot(role)]
        if not self.shuffle:
            return shards, rows.tolist()
        rng = np.random.default_rng([self.seed, epoch, self.slot(role), 1])
        return shards, buffer_shuffle(rows.tolist(), self.shuffle_buffer, rng)


def buffer_shuffle(rows: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """The order a shuffle buffer of ``size`` emits ``rows`` in: fill the buffer, then each new row replaces a
    random buffered one, which is emitted; the rest leaves in random order. Equal to a full permutation when the
    buffer holds everything."""
    if size >= len(rows):
        return [rows[i] for i in rng.permutation(len(rows))]
    buffer, out = rows[:size], []
    for incoming, pick in zip(rows[size:], rng.integers(0, size, len(rows) - size).tolist(), strict=True):
        out.append(buffer[pick])
        buffer[pick] = incoming
    out.extend(buffer[i] for i in rng.permutation(size))
    return out


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


@dataclass(frozen=True)
class Position:
    """Where one role starts: epoch, samples of that epoch already consumed, batches it already produced."""

    epoch: int
    skip: int
    batches: int


class ShardStream(IterableDataset):
    """The per-worker stream of whole batches (DataLoader with ``batch_size=None``). Module-level and holding
    only picklable state, so workers can be spawned."""

    def __init__(self, config: StreamConfig, starts: list[Position], rotation: int, pass_epoch: int) -> None:
        self.config, self.starts, self.rotation, self.pass_epoch = config, starts, rotation, pass_epoch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        role = ((info.id if info else 0) + self.rotation) % self.config.workers
        start = self.starts[role]
        batch_no, pending = start.batches, []
        for sample in self._samples(role, start):
            pending.append(sample)
            if len(pending) == self.config.batch_size:
                yield self._collate(pending, role, batch_no)
                batch_no, pending = batch_no + 1, []
        if pending and not self.config.drop_last:
            yield self._collate(pending, role, batch_no)

    def _samples(self, role: int, start: Position) -> Iterator[tuple[int, bytes]]:
        epoch, skip = start.epoch, start.skip
        while True:
            shards, order = self.config.epoch_order(epoch, role)
            yield from _read_in_order(self.config.index, shards, order[skip:])
            if not self.config.repeat:
                return
            epoch, skip = epoch + 1, 0

    def _collate(self, samples: list[tuple[int, bytes]], role: int, batch_no: int) -> Batch:
        cfg, index = self.config, self.config.index
        rows = np.array([row for row, _ in samples], dtype=np.int64)
        seed = np.random.SeedSequence([cfg.seed, self.pass_epoch, cfg.slot(role), batch_no]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            images = [
                transform_encoded(cfg.transform, data, int(index.widths[row]), int(index.heights[row]))
                for row, data in samples
            ]
        return Batch(torch.stack(images), torch.from_numpy(index.labels[rows]), torch.from_numpy(rows))


class ShardLoader:
    """Iterable over `Batch`es of one split; see the module docstring. Use one iterator at a time: the state is
    the number of batches handed out since the start (``repeat=True``) or since the start of the current pass."""

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
        if config.repeat and config.index.num_rows < config.slots:  # checked alike on every rank
            raise DataError(
                f"split {split!r} has {config.index.num_rows} samples, fewer than world_size x num_workers "
                f"= {config.slots}: some workers would never yield a batch; use fewer workers"
            )

    # ---- resume arithmetic

    def _role_batches(self, epoch: int) -> list[int]:
        cfg = self.config
        rounding = math.floor if cfg.drop_last else math.ceil
        return [rounding(cfg.slot_size(epoch, role) / cfg.batch_size) for role in range(cfg.workers)]

    def _plan(self) -> tuple[list[Position], int]:
        """Each role's start position after ``self.batches`` batches, and the role the next batch comes from."""
        cfg, n, roles = self.config, self.batches, self.config.workers
        if cfg.repeat:
            done = [n // roles + (1 if role < n % roles else 0) for role in range(roles)]
            return [self._locate(role, done[role]) for role in range(roles)], n % roles
        remaining = self._role_batches(self.epoch)
        done, turn = [0] * roles, 0
        for _ in range(n):  # the DataLoader's round-robin, skipping roles that are finished
            while remaining[turn] == 0:
                turn = (turn + 1) % roles
            remaining[turn] -= 1
            done[turn] += 1
            turn = (turn + 1) % roles
        positions = [
            Position(self.epoch, min(done[r] * cfg.batch_size, cfg.slot_size(self.epoch, r)), done[r])
            for r in range(roles)
        ]
        return positions, turn

    def _locate(self, role: int, batches: int) -> Position:
        samples, epoch = batches * self.config.batch_size, 0
        while samples >= (size := self.config.slot_size(epoch, role)):
            samples -= size
            epoch += 1
        return Position(epoch, samples, batches)

    # ---- iteration

    def __len__(self) -> int:
        """Batches in one pass on this rank (``repeat=False`` only)."""
        if self.config.repeat:
            raise TypeError("a repeating loader is endless; it has no length")
        return sum(self._role_batches(self.epoch))

    def __iter__(self) -> Iterator[Batch]:
        starts, rotation = self._plan()
        stream = ShardStream(self.config, starts, rotation, self.epoch)
        if self.num_workers == 0:
            batches = iter(stream)
        else:
            batches = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                    pin_memory=self.pin_memory,
                    multiprocessing_context=self.multiprocessing_context,
                )
            )
        for batch in batches:
            self.batches += 1
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
