"""What every format reader hands to preparation: the errors, one sample (`Item`) and one source (`Source`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad input: a missing path, unknown format, empty dataset, missing split file, label/class mismatch, or an
    artifact root that cannot be written. Raised before any long work starts; the message says what to do."""


class CorruptDataError(DataError):
    """More of the source is corrupt than ``max_corrupt_fraction`` allows; nothing was published. A `DataError`:
    retrying does not help, fixing the source or raising the limit does."""


# An item's pixels: a file to decode, an array already decoded (HW or HWC uint8), or a function that renders one.
Payload = Path | np.ndarray | Callable[[], np.ndarray]


@dataclass(frozen=True, slots=True)  # slots: ImageNet has 1.3 million of these
class Item:
    """One sample of a source, before validation. ``problem`` is set when the reader already knows it is bad
    (a listed file that does not exist, an image missing from a truncated IDX file)."""

    key: str  # unique within the dataset, WebDataset-safe (no dots)
    label: int
    source: str  # what quarantine.csv names: a path, or "file[index]"
    payload: Payload | None
    problem: str | None = None
    extra: Mapping[str, object] | None = None  # per-sample manifest columns, e.g. ImageNet ReaL labels


@dataclass
class Source:
    """A dataset as its reader sees it: classes, the official splits, and the protocol for derived splits."""

    format: str
    location: str
    classes: list[str]
    splits: dict[str, list[Item]]  # official splits, in a stable order
    listing: list[tuple[str, int, int]]  # (name, size, mtime_ns) of every file read: the fingerprint's input
    minival_fraction: float = 0.0  # > 0: a seeded stratified minival is held out of "train"
    unions: dict[str, list[str]] = field(default_factory=dict)  # derived splits made of official ones
    info: dict = field(default_factory=dict)  # extra facts for info.json (e.g. the VTAB group)
    extra_columns: dict[str, object] = field(default_factory=dict)  # manifest column -> value for rows without one

    @property
    def num_items(self) -> int:
        return sum(len(items) for items in self.splits.values())
