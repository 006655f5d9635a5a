"""Synthetic data with real structure, generated from a seed with no files: an upstream pre-training set and a
downstream suite shaped like VTAB-1k's three groups.

Every image is a pure function of (seed, task, split, index), rendered with numpy from shared visual primitives:
seven shape types, eight colours in two families, seven surface textures (solid, stripes at four orientations,
checker, dots) and two sizes, placed at random positions on a cluttered background (low-frequency colour noise,
stray strokes and blobs, pixel noise).

* Upstream (``synthetic-upstream``): each class is one combination (shape, colour family, texture, size) -- 196
  in all, 100 by default -- like the many fine-grained classes of ImageNet-21k.
* Downstream (``synthetic-vtab:<task>``), new label semantics on the same primitives, named after their VTAB
  group: natural (object category in clutter; fine-grained shape x texture), specialized (orientation and
  frequency of a grating patch; kind of noise), structured (object count, x-position bin, orientation bin).

Pre-training on the upstream set measurably improves few-shot transfer to the suite over random initialisation
(``tests/test_data_synthetic.py`` shows it), which is what makes the offline demo a real pretrain-and-transfer run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vit.data.base import DataError, Item, Source

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "bar")
TEXTURES = ("solid", "stripes_0", "stripes_45", "stripes_90", "stripes_135", "checker", "dots")
SIZES = ("small", "large")
PALETTE = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.25),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "magenta": (0.85, 0.20, 0.80),
    "cyan": (0.15, 0.85, 0.90),
    "orange": (0.95, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
}
COLOURS = tuple(PALETTE)
COLOUR_FAMILIES = {"warm": ("red", "yellow", "magenta", "orange"), "cool": ("green", "blue", "cyan", "white")}
_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
_SPLIT_CODES = {"train": 0, "test": 1, "train800": 2, "val200": 3}


# --------------------------------------------------------------------------------------------------------------
# Primitives


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ys, xs


@lru_cache(maxsize=8)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """(size, cells) bilinear interpolation matrix: a cells x cells grid to size x size is U @ G @ U.T."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (cells - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    frac = pos - lo
    u = np.zeros((size, cells), np.float32)
    u[np.arange(size), lo] = 1 - frac
    u[np.arange(size), lo + 1] = frac
    return u


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1], shape (size, size, channels)."""
    u = _upsampler(size, cells)
    grid = rng.random((channels, cells, cells), dtype=np.float32)
    return (u @ grid @ u.T).transpose(1, 2, 0)


def _shape_field(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance-like field in pixels: negative inside the shape of radius ``r`` centred at (0, 0)."""
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) - 1.1 * r
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
    if shape == "cross":
        arm = 0.32 * r
        return np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - r))
    if shape == "triangle":  # pointing up (-v), vertices at distance r
        s = np.float32(np.sqrt(3) / 2)
        return np.maximum(np.maximum(v, s * u - 0.5 * v), -s * u - 0.5 * v) - 0.5 * r
    if shape == "star":  # five points
        return np.hypot(u, v) - r * (0.62 + 0.38 * np.cos(5 * np.arctan2(u, -v)))
    if shape == "half_disc":
        return np.maximum(np.hypot(u, v + 0.25 * r) - r, -(v + 0.25 * r))
    if shape == "bar":
        return np.maximum(np.abs(u) - r, np.abs(v) - 0.3 * r)
    if shape == "arrow":  # an isosceles wedge pointing along +u: its orientation is unambiguous over 360 degrees
        return np.maximum(np.maximum(-u - 0.5 * r, 0.45 * u + np.abs(v) - 0.55 * r), np.abs(v) - 0.6 * r)
    raise ValueError(shape)


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, period: float) -> np.ndarray:
    """Surface pattern in [0, 1] at offsets (u, v) from the object's centre."""
    if texture == "solid":
        return np.ones_like(u)
    if texture.startswith("stripes_"):  # orientation in degrees, +-10
        a = np.deg2rad(int(texture.split("_")[1]) + rng.uniform(-10, 10))
        return (np.sin((u * np.cos(a) + v * np.sin(a)) * (2 * np.pi / period)) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.sin(u * (2 * np.pi / period)) * np.sin(v * (2 * np.pi / period))) > 0).astype(np.float32)
    if texture == "dots":
        p = period
        return ((np.mod(u, p) - p / 2) ** 2 + (np.mod(v, p) - p / 2) ** 2 > (0.3 * p) ** 2).astype(np.float32)
    raise ValueError(texture)


def _background(rng: np.random.Generator, size: int, clutter: int) -> np.ndarray:
    """A cluttered scene: low-frequency colour noise and ``clutter`` stray strokes and blobs (a blob is a stroke of
    length zero and larger width), all distances computed at once."""
    base = rng.uniform(0.1, 0.6)
    img = base + rng.uniform(0.1, 0.35) * (_smooth_noise(rng, size, 4) - 0.5)
    if not clutter:
        return img
    ys, xs = _grid(size)
    params = rng.random((8, clutter), dtype=np.float32)
    x0, y0 = params[0, :, None, None] * size, params[1, :, None, None] * size
    angle = params[2, :, None, None] * np.float32(np.pi)
    stroke = params[3] < 0.5
    length = np.where(stroke, 0.2 + 0.3 * params[4], 0.0)[:, None, None] * size
    width = np.where(stroke, 0.04, 0.04 + 0.06 * params[4])[:, None, None] * size
    c, s = np.cos(angle), np.sin(angle)
    t = np.clip((xs - x0) * c + (ys - y0) * s, 0, length)
    alpha = np.clip(0.5 + width - np.hypot(xs - x0 - t * c, ys - y0 - t * s), 0, 1)
    alpha = (alpha * (0.4 + 0.5 * params[5, :, None, None]))[..., None]
    colours = rng.random((clutter, 3), dtype=np.float32)
    for k in range(clutter):  # painted in order: later strokes cover earlier ones
        img = img * (1 - alpha[k]) + colours[k] * alpha[k]
    return img


def _draw(
    img: np.ndarray,
    rng: np.random.Generator,
    shape: str,
    colour: np.ndarray,
    texture: str,
    radius: float,
    centre: tuple[float, float],
    angle: float,
) -> None:
    """Composite one textured, anti-aliased object onto ``img`` in place."""
    size = img.shape[0]
    ys, xs = _grid(size)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xs - centre[0], ys - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    alpha = np.clip(0.5 - _shape_field(shape, u, v, radius), 0, 1)[..., None]
    pattern = _texture(texture, dx, dy, rng, period=max(2.5, radius * 0.55))[..., None]  # in the image's frame
    dark = colour * 0.3
    img *= 1 - alpha
    img += alpha * (dark + (colour - dark) * pattern)


def _colour(rng: np.random.Generator, index: int) -> np.ndarray:
    return np.clip(_RGB[index] + rng.normal(0, 0.05, 3).astype(np.float32), 0, 1)


def _radius(rng: np.random.Generator, size: int, kind: str) -> float:
    lo, hi = (0.2, 0.26) if kind == "small" else (0.32, 0.4)
    return float(rng.uniform(lo, hi) * size)


def _centre(rng: np.random.Generator, size: int, radius: float) -> tuple[float, float]:
    margin = min(radius, size / 2 - 1)
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    img = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Upstream: classes are combinations of primitives


def upstream_combinations(num_classes: int) -> list[tuple[str, str, str, str]]:
    """The (shape, colour family, texture, size) of each upstream class: a fixed seeded choice among all
    combinations, so the class semantics do not depend on the data seed. The exact colour within the family is
    random: telling classes apart takes shape, texture and size, not colour alone."""
    combos = [(sh, co, te, si) for sh in SHAPES for co in COLOUR_FAMILIES for te in TEXTURES for si in SIZES]
    if not 2 <= num_classes <= len(combos):
        raise DataError(f"synthetic-upstream: classes must be between 2 and {len(combos)}, got {num_classes}")
    order = np.random.default_rng(20210122).permutation(len(combos))
    return [combos[i] for i in order[:num_classes]]


def render_upstream(combo: tuple[str, str, str, str], rng: np.random.Generator, size: int) -> np.ndarray:
    shape, family, texture, size_kind = combo
    img = _background(rng, size, clutter=int(rng.integers(1, 4)))
    radius = _radius(rng, size, size_kind)
    angle = rng.uniform(-0.25, 0.25)  # small jitter: a rotated square must not become a diamond
    colour = _colour(rng, COLOURS.index(COLOUR_FAMILIES[family][int(rng.integers(4))]))
    _draw(img, rng, shape, colour, texture, radius, _centre(rng, size, radius), angle)
    return _finish(img, rng)


# --------------------------------------------------------------------------------------------------------------
# Downstream: a VTAB-like suite


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    group: str  # natural / specialized / structured, as VTAB's groups
    classes: tuple[str, ...]
    render: Callable[[int, np.random.Generator, int], np.ndarray]  # (label, rng, size) -> HWC uint8
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _any_object(img: np.ndarray, rng: np.random.Generator, shape: str, radius: float, centre=None, angle=None):
    size = img.shape[0]
    centre = centre if centre is not None else _centre(rng, size, radius)
    angle = angle if angle is not None else rng.uniform(-0.25, 0.25)
    colour = _colour(rng, int(rng.integers(len(COLOURS))))
    _draw(img, rng, shape, colour, TEXTURES[int(rng.integers(len(TEXTURES)))], radius, centre, angle)


def _natural_objects(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _background(rng, size, clutter=int(rng.integers(2, 5)))
    _any_object(img, rng, SHAPES[label], float(rng.uniform(0.2, 0.36) * size))
    return _finish(img, rng)


_FINE = [(sh, te) for sh in ("circle", "square", "triangle") for te in ("solid", "stripes_0", "checker", "dots")]


def _natural_fine(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    shape, texture = _FINE[label]
    img = _background(rng, size, clutter=int(rng.integers(2, 5)))
    radius = float(rng.uniform(0.26, 0.38) * size)
    colour = _colour(rng, int(rng.integers(len(COLOURS))))
    _draw(img, rng, shape, colour, texture, radius, _centre(rng, size, radius), rng.uniform(-0.25, 0.25))
    return _finish(img, rng)


_GRATINGS = [(o, f) for o in (0, 45, 90, 135) for f in ("coarse", "fine")]


def _specialized_gratings(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    orientation, freq = _GRATINGS[label]
    ys, xs = _grid(size)
    a = np.deg2rad(orientation + rng.uniform(-8, 8))
    period = size * (rng.uniform(0.3, 0.45) if freq == "coarse" else rng.uniform(0.1, 0.16))
    wave = np.sin((xs * np.cos(a) + ys * np.sin(a)) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi))
    tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    contrast = rng.uniform(0.25, 0.45)
    radius = rng.uniform(0.3, 0.45) * size  # seen through a round aperture, like a Gabor patch, in clutter
    cx, cy = rng.uniform(radius, size - radius, 2)
    aperture = np.clip(0.5 + radius - np.hypot(xs - cx, ys - cy), 0, 1)
    img = _background(rng, size, clutter=int(rng.integers(1, 4)))
    img += (contrast * wave * aperture)[..., None] * tint
    return _finish(img, rng, noise=0.04)


_NOISES = ("gaussian", "salt_pepper", "blotches", "scanlines", "blocks")


def _specialized_noise(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    kind = _NOISES[label]
    base = rng.uniform(0.25, 0.75, 3).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    strength = rng.uniform(0.15, 0.3)
    if kind == "gaussian":
        img += rng.normal(0, strength, img.shape).astype(np.float32)
    elif kind == "salt_pepper":
        mask = rng.random((size, size)) < rng.uniform(0.08, 0.2)
        img[mask] = rng.integers(0, 2, (int(mask.sum()), 1)).astype(np.float32)
    elif kind == "blotches":
        img += 2.5 * strength * (_smooth_noise(rng, size, int(rng.integers(4, 7))) - 0.5)
    elif kind == "scanlines":
        img += rng.normal(0, strength, (size, 1, 3)).astype(np.float32)
    else:  # blocks
        cells = size // int(rng.choice([4, 8]))
        block = rng.normal(0, strength, (cells, cells, 3)).astype(np.float32)
        img += np.repeat(np.repeat(block, size // cells, axis=0), size // cells, axis=1)
    return _finish(img, rng, noise=0.02)


def _structured_count(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _background(rng, size, clutter=int(rng.integers(0, 2)))
    count = label + 1
    cells = 3
    chosen = rng.permutation(cells * cells)[:count]
    cell = size / cells
    for c in chosen:
        radius = float(rng.uniform(0.32, 0.42) * cell)
        jitter = rng.uniform(-0.5, 0.5, 2) * (cell - 2 * radius)
        centre = ((c % cells + 0.5) * cell + jitter[0], (c // cells + 0.5) * cell + jitter[1])
        _any_object(img, rng, SHAPES[int(rng.integers(len(SHAPES)))], radius, centre)
    return _finish(img, rng)


LOCATION_BINS = 8


def _structured_location(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _background(rng, size, clutter=int(rng.integers(0, 3)))
    radius = float(rng.uniform(0.14, 0.2) * size)
    x = (label + rng.uniform(0.05, 0.95)) * size / LOCATION_BINS
    y = rng.uniform(radius, size - radius)
    _any_object(img, rng, SHAPES[int(rng.integers(len(SHAPES)))], radius, (x, y))
    return _finish(img, rng)


ORIENTATION_BINS = 8


def _structured_orientation(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _background(rng, size, clutter=int(rng.integers(0, 3)))
    radius = float(rng.uniform(0.28, 0.38) * size)
    angle = (label + rng.uniform(0.1, 0.9)) * 2 * np.pi / ORIENTATION_BINS
    centre = (size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size)
    _any_object(img, rng, "arrow", radius, centre, angle)
    return _finish(img, rng)


VTAB_TASKS: dict[str, SyntheticTask] = {
    t.name: t
    for t in (
        SyntheticTask("natural_objects", "natural", SHAPES, _natural_objects, "shape of the object in clutter"),
        SyntheticTask(
            "natural_fine", "natural", tuple(f"{s}_{t}" for s, t in _FINE), _natural_fine, "shape and texture"
        ),
        SyntheticTask(
            "specialized_gratings",
            "specialized",
            tuple(f"{o}deg_{f}" for o, f in _GRATINGS),
            _specialized_gratings,
            "orientation and frequency of a grating",
        ),
        SyntheticTask("specialized_noise", "specialized", _NOISES, _specialized_noise, "kind of noise"),
        SyntheticTask(
            "structured_count", "structured", tuple(str(n) for n in range(1, 7)), _structured_count, "object count"
        ),
        SyntheticTask(
            "structured_location",
            "structured",
            tuple(f"x{b}" for b in range(LOCATION_BINS)),
            _structured_location,
            "x-position bin of the object",
        ),
        SyntheticTask(
            "structured_orientation",
            "structured",
            tuple(f"{b * 360 // ORIENTATION_BINS}deg" for b in range(ORIENTATION_BINS)),
            _structured_orientation,
            "orientation bin of an arrow",
        ),
    )
}


# --------------------------------------------------------------------------------------------------------------
# Sources


def _rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    task_code = int.from_bytes(task.encode()[:8].ljust(8, b"\0"), "little") % (1 << 62)
    return np.random.default_rng([seed, task_code, _SPLIT_CODES[split], index])


def _items(task: str, split: str, count: int, num_classes: int, seed: int, size: int, render) -> list[Item]:
    def item(i: int) -> Item:
        label = i % num_classes
        return Item(
            key=f"{split}/{i:07d}",
            label=label,
            source=f"{task}:{split}[{i}]",
            payload=lambda: render(label, _rng(seed, task, split, i), size),
        )

    return [item(i) for i in range(count)]


def _int_option(options: dict, name: str, default: int, low: int, high: int) -> int:
    value = options.pop(name, default)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise DataError(f"option {name}={value!r} is not an integer") from None
    if not low <= value <= high:
        raise DataError(f"option {name}={value} is out of range [{low}, {high}]")
    return value


def upstream_source(options: dict, seed: int) -> Source:
    """``synthetic-upstream:classes=100,per_class=200,test_per_class=10,size=32`` (the defaults)."""
    classes = _int_option(options, "classes", 100, 2, len(SHAPES) * len(COLOUR_FAMILIES) * len(TEXTURES) * len(SIZES))
    per_class = _int_option(options, "per_class", 200, 1, 100_000)
    test_per_class = _int_option(options, "test_per_class", 10, 1, 100_000)
    size = _int_option(options, "size", 32, 8, 1024)
    combos = upstream_combinations(classes)

    def render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
        return render_upstream(combos[label], rng, size)

    splits = {
        "train": _items("upstream", "train", classes * per_class, classes, seed, size, render),
        "test": _items("upstream", "test", classes * test_per_class, classes, seed, size, render),
    }
    params = {"classes": classes, "per_class": per_class, "test_per_class": test_per_class, "size": size}
    return Source(
        format="synthetic-upstream",
        location="",
        classes=["-".join(c) for c in combos],
        splits=splits,
        listing=[(f"generator-v{GENERATOR_VERSION}", 0, 0)],
        minival_fraction=0.01,
        info={"synthetic": params, "image_size": size},
    )


def vtab_source(task_name: str, options: dict, seed: int) -> Source:
    """``synthetic-vtab:<task>`` with options ``test=1000,size=32``: train800 / val200 / train800val200 / test."""
    task = VTAB_TASKS.get(task_name)
    if task is None:
        raise DataError(f"unknown synthetic VTAB task {task_name!r}; known: {', '.join(VTAB_TASKS)}")
    test = _int_option(options, "test", 1000, 1, 1_000_000)
    size = _int_option(options, "size", 32, 8, 1024)
    n = task.num_classes
    splits = {
        "train800": _items(task.name, "train800", 800, n, seed, size, task.render),
        "val200": _items(task.name, "val200", 200, n, seed, size, task.render),
        "test": _items(task.name, "test", test, n, seed, size, task.render),
    }
    return Source(
        format="synthetic-vtab",
        location=task.name,
        classes=list(task.classes),
        splits=splits,
        listing=[(f"generator-v{GENERATOR_VERSION}", 0, 0)],
        unions={"train800val200": ["train800", "val200"]},
        info={
            "vtab_task": task.name,
            "vtab_group": task.group,
            "description": task.description,
            "synthetic": {"test": test, "size": size},
            "image_size": size,
        },
    )
