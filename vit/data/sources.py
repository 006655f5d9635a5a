"""Format readers: each turns ``FORMAT:PATH`` (files exactly as the dataset ships or torchvision downloads it)
into a `Source` — classes, official splits, items — without decoding anything. Bad input (a missing path or
split file, a label/class mismatch, an unreadable index file) raises `DataError` here, before any long work;
problems with single samples (a missing, empty or corrupt image, a truncated IDX file) are marked on the item and
end in quarantine.csv.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vit import vtab
from vit.data import synthetic
from vit.data.base import DataError, Item, Source

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Held-out minival for learning-rate selection (paper-facts §5.1): 1% ImageNet, 2% CIFAR, 10% Pets/Flowers.
MINIVAL = {
    "imagenet": 0.01,
    "imagenet21k": 0.01,
    "cifar10": 0.02,
    "cifar100": 0.02,
    "fashion-mnist": 0.02,
    "pets": 0.10,
    "flowers102": 0.10,
}


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _stat(path: Path, root: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (_relative(path, root), st.st_size, st.st_mtime_ns)


def _key(relative: str) -> str:
    """A WebDataset-safe key from a relative path: no extension, no dots (WebDataset splits at the first dot)."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem).strip("/")


def _find(path: Path, marker: str, subfolders: tuple[str, ...], what: str) -> Path:
    """``path`` itself or the sub-folder (as torchvision lays out downloads) that contains ``marker``."""
    for candidate in (path, *(path / s for s in subfolders)):
        if (candidate / marker).exists():
            return candidate
    raise DataError(
        f"{path} does not look like {what}: {marker} not found there"
        + (f" nor in {', '.join(subfolders)}/" if subfolders else "")
        + "; point at the folder that holds it, or pass --download to fetch the dataset"
    )


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"missing {what}: {path} does not exist")
    return path


def _files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (recursively), sorted: nothing is skipped silently, so a
    stray non-image file ends in quarantine rather than vanishing."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_items(root: Path, split_dir: Path, classes: list[str], listing: list) -> list[Item]:
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for name in _class_dirs(split_dir):
        for path in _files(split_dir / name):
            rel = path.relative_to(root).as_posix()
            listing.append(_stat(path, root))
            items.append(Item(key=_key(rel), label=index[name], source=str(path), payload=path))
    return items


def _file_item(root: Path, path: Path, label: int, listing: list) -> Item:
    key = _key(_relative(path, root))
    if path.is_file():
        listing.append(_stat(path, root))
        return Item(key=key, label=label, source=str(path), payload=path)
    return Item(key=key, label=label, source=str(path), payload=None, problem="file not found")


def _check_subset(split: str, found: list[str], classes: list[str], where: Path) -> None:
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(
            f"label/class mismatch: {where} has class folders not in train/: {', '.join(extra[:5])}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            + f"; every {split} class must also be a train class"
        )


# --------------------------------------------------------------------------------------------------------------
# Folder formats


def read_imagefolder(path: Path, options: dict, fmt: str = "imagefolder") -> Source:
    """``<path>/<class>/*`` (one split, ``train``) or ``<path>/{train,val,test}/<class>/*``."""
    _require(path, "image folder")
    split_dirs = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": path}
    classes = _class_dirs(split_dirs["train"])
    if not classes:
        raise DataError(f"{split_dirs['train']} has no class folders: expected <class>/<image files>")
    listing: list = []
    splits = {}
    for split, folder in split_dirs.items():
        _check_subset(split, _class_dirs(folder), classes, folder)
        splits[split] = _folder_items(path, folder, classes, listing)
    return Source(fmt, str(path), classes, splits, listing, minival_fraction=MINIVAL.get(fmt, 0.0))


def read_imagenet(path: Path, options: dict) -> Source:
    """ILSVRC layout ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``; optional ReaL labels (``real.json`` in the
    root, or option ``real=PATH``): one label list per validation image, in sorted file-name order."""
    _require(path, "ImageNet folder")
    train, val = path / "train", path / "val"
    for folder in (train, val):
        if not folder.is_dir():
            raise DataError(f"missing split: {folder} does not exist (expected the ILSVRC layout train/ and val/)")
    if any(p.is_file() for p in val.iterdir()):
        raise DataError(
            f"{val} holds images directly: arrange the validation images in val/<wnid>/ folders "
            "(for example with the well-known valprep.sh script)"
        )
    classes = _class_dirs(train)
    if not classes:
        raise DataError(f"{train} has no class folders: expected train/<wnid>/*.JPEG")
    _check_subset("val", _class_dirs(val), classes, val)
    listing: list = []
    splits = {"train": _folder_items(path, train, classes, listing), "val": _folder_items(path, val, classes, listing)}
    source = Source("imagenet", str(path), classes, splits, listing, minival_fraction=MINIVAL["imagenet"])
    explicit = options.pop("real", None)
    real = Path(explicit) if explicit else path / "real.json"
    if real.exists():
        _attach_real_labels(source, real, len(classes))
        listing.append(_stat(real, path))
    elif explicit:
        raise DataError(f"missing ReaL labels file: {real} does not exist")
    return source


def _attach_real_labels(source: Source, real: Path, num_classes: int) -> None:
    try:
        labels = json.loads(real.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read ReaL labels {real}: {exc}") from None
    val = sorted(source.splits["val"], key=lambda item: Path(item.source).name)
    if not isinstance(labels, list) or len(labels) != len(val):
        count = len(labels) if isinstance(labels, list) else "no list of"
        raise DataError(
            f"label/class mismatch: {real} has {count} entries but val/ has {len(val)} images; ReaL labels are one "
            "list per validation image, in sorted file-name order"
        )
    for entry in labels:
        if not isinstance(entry, list) or any(not isinstance(x, int) or not 0 <= x < num_classes for x in entry):
            raise DataError(f"label/class mismatch: {real} has an entry {entry!r} that is not a list of class ids")
    real_of = {id(item): entry for item, entry in zip(val, labels, strict=True)}
    source.splits["val"] = [
        Item(i.key, i.label, i.source, i.payload, i.problem, {"real_labels": real_of[id(i)]})
        for i in source.splits["val"]
    ]
    source.extra_columns["real_labels"] = []


# --------------------------------------------------------------------------------------------------------------
# Array formats: CIFAR pickles, IDX


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of dicts of lists and numpy arrays; allow exactly that and nothing else, so a
    tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # the original (Python 2) files
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt file
        raise DataError(f"{path} is not a readable CIFAR batch ({exc}); re-download it (--download)") from None


def read_cifar(path: Path, options: dict, fmt: str) -> Source:
    """``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
    ``cifar-100-python/{train,test,meta}`` (the path itself or its parent)."""
    _require(path, f"{fmt} folder")
    if fmt == "cifar10":
        root = _find(path, "batches.meta", ("cifar-10-batches-py",), "CIFAR-10 (python version)")
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_file, names_key, labels_key, expected = "batches.meta", b"label_names", b"labels", 10
    else:
        root = _find(path, "meta", ("cifar-100-python",), "CIFAR-100 (python version)")
        files = {"train": ["train"], "test": ["test"]}
        meta_file, names_key, labels_key, expected = "meta", b"fine_label_names", b"fine_labels", 100
    meta = _unpickle(root / meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    if len(classes) != expected:
        raise DataError(f"label/class mismatch: {root / meta_file} names {len(classes)} classes, {fmt} has {expected}")
    listing = [_stat(root / meta_file, root)]
    splits: dict[str, list[Item]] = {}
    for split, names in files.items():
        splits[split] = []
        for name in names:
            file = _require(root / name, f"{fmt} split file")
            listing.append(_stat(file, root))
            batch = _unpickle(file)
            data, labels = batch.get(b"data"), batch.get(labels_key)
            if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
                raise DataError(f"{file} is not a CIFAR batch (expected data N x 3072 and labels); re-download it")
            if len(labels) != len(data):
                raise DataError(f"label/class mismatch: {file} has {len(data)} images but {len(labels)} labels")
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            splits[split] += [
                Item(key=f"{name}-{i:05d}", label=int(label), source=f"{file}[{i}]", payload=images[i])
                for i, label in enumerate(labels)
            ]
    return Source(fmt, str(root), classes, splits, listing, minival_fraction=MINIVAL[fmt])


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of a raw or gzip file; a truncated gzip yields what could be decompressed."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    out = io.BytesIO()
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with contextlib.suppress(zlib.error):
        out.write(decompressor.decompress(raw))
    return out.getvalue()


def _idx(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """An IDX file of unsigned bytes: (dimensions from the header, the data present, possibly truncated)."""
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; re-download it (--download)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated; re-download it (--download)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return dims, np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)


def read_fashion_mnist(path: Path, options: dict) -> Source:
    """IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in the path, ``FashionMNIST/raw/`` or
    ``raw/`` (torchvision's layout, and Debian's ``/usr/share/datasets/fashion-mnist``)."""
    _require(path, "Fashion-MNIST folder")
    root = None
    for candidate in (path, path / "FashionMNIST" / "raw", path / "raw"):
        if any((candidate / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")):
            root = candidate
            break
    if root is None:
        raise DataError(
            f"{path} does not hold Fashion-MNIST: train-images-idx3-ubyte[.gz] not found there nor in "
            "FashionMNIST/raw/; point at the folder with the IDX files or pass --download"
        )
    listing: list = []
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = {}
        for kind in ("images-idx3", "labels-idx1"):
            found = [root / f"{prefix}-{kind}-ubyte{ext}" for ext in ("", ".gz")]
            found = [f for f in found if f.exists()]
            if not found:
                raise DataError(f"missing split file: {root / f'{prefix}-{kind}-ubyte[.gz]'} does not exist")
            files[kind] = found[0]
            listing.append(_stat(found[0], root))
        (n, rows, cols), pixels = _idx(files["images-idx3"])
        (n_labels,), labels = _idx(files["labels-idx1"])
        if n_labels != n:
            raise DataError(f"label/class mismatch: {files['images-idx3']} has {n} images, labels say {n_labels}")
        complete = min(len(pixels) // (rows * cols), len(labels), n)
        images = pixels[: complete * rows * cols].reshape(complete, rows, cols)
        items = [
            Item(f"{prefix}-{i:05d}", int(labels[i]), f"{files['images-idx3']}[{i}]", images[i])
            for i in range(complete)
        ]
        items += [
            Item(f"{prefix}-{i:05d}", 0, f"{files['images-idx3']}[{i}]", None, "truncated file: sample missing")
            for i in range(complete, n)
        ]
        splits[split] = items
    return Source("fashion-mnist", str(root), list(FASHION_MNIST_CLASSES), splits, listing, MINIVAL["fashion-mnist"])


DIGITS_TEST = 797  # scikit-learn's 1,797 digits: 1,000 train (VTAB-1k's 800 + 200) and the rest as test


def read_digits(spec: str, options: dict, seed: int) -> Source:
    """scikit-learn's ``load_digits``: 1,797 real 8 x 8 scans of handwritten digits (UCI optdigits' test set,
    16 grey levels), shipped inside the scikit-learn wheel, so they are there offline. No official split: a
    seeded stratified ``test`` of 797 images, the other 1,000 are ``train``. Images are stored at 8 x 8, ink
    bright on black like Fashion-MNIST; the transforms resize them."""
    if spec:
        raise DataError(f"digits: takes no path (the images ship with scikit-learn), got {spec!r}")
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    ids = np.arange(len(images))
    train, test = train_test_split(ids, test_size=DIGITS_TEST, random_state=seed, stratify=digits.target)
    splits = {
        split: [Item(f"digits-{i:04d}", int(digits.target[i]), f"load_digits()[{i}]", images[i]) for i in sorted(part)]
        for split, part in (("train", train), ("test", test))
    }
    listing = [(f"scikit-learn-{sklearn.__version__}/load_digits", int(images.size), 0)]
    return Source("digits", "sklearn.datasets.load_digits", [str(c) for c in range(10)], splits, listing)


# --------------------------------------------------------------------------------------------------------------
# Annotated folders: Pets, Flowers-102, VTAB-1k, list files


def read_pets(path: Path, options: dict) -> Source:
    """Oxford-IIIT Pets: ``images/*.jpg`` and ``annotations/{trainval,test}.txt`` (``Name CLASS-ID SPECIES
    BREED-ID``, class ids 1..37); the path itself or its ``oxford-iiit-pet/`` folder."""
    _require(path, "Oxford-IIIT Pets folder")
    root = _find(path, "annotations", ("oxford-iiit-pet",), "Oxford-IIIT Pets")
    listing: list = []
    names: dict[int, str] = {}
    rows: dict[str, list[tuple[str, int]]] = {}
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        ann = _require(root / "annotations" / file, "split file")
        listing.append(_stat(ann, root))
        rows[split] = []
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise DataError(f"{ann}:{n}: expected 'Name CLASS-ID SPECIES BREED-ID', got {line!r}")
            name, class_id = parts[0], int(parts[1])
            breed = name.rsplit("_", 1)[0]
            if names.setdefault(class_id, breed) != breed:
                raise DataError(
                    f"label/class mismatch: {ann}:{n}: class {class_id} is {names[class_id]!r} elsewhere, "
                    f"{breed!r} here"
                )
            rows[split].append((name, class_id - 1))
    if not names:
        raise DataError(f"{root / 'annotations'}: the split files list no images")
    classes = [names.get(i, f"class_{i}") for i in range(1, max(names) + 1)]
    splits = {
        split: [_file_item(root, root / "images" / f"{name}.jpg", label, listing) for name, label in entries]
        for split, entries in rows.items()
    }
    return Source("pets", str(root), classes, splits, listing, minival_fraction=MINIVAL["pets"])


def read_flowers(path: Path, options: dict) -> Source:
    """Oxford Flowers-102: ``jpg/image_%05d.jpg``, ``imagelabels.mat`` (labels 1..102) and ``setid.mat`` (trnid,
    valid, tstid); the path itself or its ``flowers-102/`` folder. Splits train / val / test."""
    import scipy.io

    _require(path, "Flowers-102 folder")
    root = _find(path, "setid.mat", ("flowers-102",), "Oxford Flowers-102")
    labels_file = _require(root / "imagelabels.mat", "labels file")
    listing = [_stat(labels_file, root), _stat(root / "setid.mat", root)]
    try:
        labels = scipy.io.loadmat(labels_file)["labels"].ravel().astype(int)
        setid = scipy.io.loadmat(root / "setid.mat")
        ids = {split: setid[key].ravel().astype(int) for split, key in (("train", "trnid"), ("val", "valid"))}
        ids["test"] = setid["tstid"].ravel().astype(int)
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"cannot read {root}/imagelabels.mat / setid.mat ({exc}); re-download them") from None
    splits = {}
    for split, image_ids in ids.items():
        if len(image_ids) and (image_ids.min() < 1 or image_ids.max() > len(labels)):
            raise DataError(
                f"label/class mismatch: setid.mat ({split}) names image ids up to {image_ids.max()} but "
                f"imagelabels.mat has {len(labels)} labels"
            )
        splits[split] = [
            _file_item(root, root / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1, listing) for i in image_ids
        ]
    classes = [str(i) for i in range(1, 103)]
    return Source("flowers102", str(root), classes, splits, listing, minival_fraction=MINIVAL["flowers102"])


def read_vtab(path: Path, options: dict) -> Source:
    """A VTAB-1k task folder ``<root>/<task>/`` with ``{train800,val200,train800val200,test}.txt`` (lines
    ``images/<split>/<idx>.jpg <label>``). The task comes from the folder name (either naming variant, e.g.
    ``cifar``/``cifar100``, ``oxford_iiit_pet``/``oxford_pet``) or the option ``task=``."""
    _require(path, "VTAB-1k task folder")
    name = options.pop("task", path.name)
    try:
        task = vtab.task(name)
    except ValueError as exc:
        raise DataError(f"{exc}; pass the task with --option task=NAME when the folder is named differently") from None
    listing: list = []
    splits = {}
    for split in vtab.SPLITS:
        lst = path / f"{split}.txt"
        if not lst.exists():
            raise DataError(f"missing split file: {lst} does not exist (VTAB-1k needs {', '.join(vtab.SPLITS)})")
        listing.append(_stat(lst, path))
        items = []
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{lst}:{n}: expected '<image path> <label>', got {line!r}")
            items.append(_file_item(path, path / parts[0], int(parts[1]), listing))
        splits[split] = items
    info = {"vtab_task": task.name, "vtab_group": task.group, "paper_name": task.paper_name}
    classes = [str(i) for i in range(task.num_classes)]
    return Source("vtab", str(path), classes, splits, listing, info=info)


def read_list(path: Path, options: dict) -> Source:
    """A CSV or parquet list with columns ``path,label`` (and optionally ``split``); paths relative to the list's
    folder. Integer labels are class ids (``num_classes=`` bounds them, default max + 1); text labels are class
    names (sorted)."""
    import pandas as pd

    _require(path, "list file")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        raise DataError(f"cannot read list file {path}: {exc}") from None
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(f"list file {path} lacks column(s) {', '.join(sorted(missing))}: it needs path,label")
    if pd.api.types.is_integer_dtype(table["label"]):
        num_classes = int(options.pop("num_classes", int(table["label"].max()) + 1 if len(table) else 0))
        classes = [str(i) for i in range(num_classes)]
        labels = table["label"].astype(int).tolist()
    else:
        classes = sorted(table["label"].astype(str).unique())
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[str(v)] for v in table["label"]]
    base = path.parent
    listing = [_stat(path, base)]
    splits: dict[str, list[Item]] = {}
    split_column = table["split"].astype(str) if "split" in table.columns else ["train"] * len(table)
    for rel, label, split in zip(table["path"].astype(str), labels, split_column, strict=True):
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        splits.setdefault(split, []).append(_file_item(base, file, label, listing))
    return Source("list", str(path), classes, splits, listing)


# --------------------------------------------------------------------------------------------------------------
# Registry


def _synthetic_args(spec: str, options: dict) -> list[str]:
    """``synthetic-*:tok,key=value,...``: ``key=value`` tokens join the options; the rest are returned."""
    plain = []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        if "=" in token:
            key, value = token.split("=", 1)
            options.setdefault(key.strip(), value.strip())
        else:
            plain.append(token)
    return plain


def _synthetic_upstream(spec: str, options: dict, seed: int) -> Source:
    extra = _synthetic_args(spec, options)
    if extra:
        raise DataError(f"synthetic-upstream takes key=value options only, got {', '.join(extra)}")
    return synthetic.upstream_source(options, seed)


def _synthetic_vtab(spec: str, options: dict, seed: int) -> Source:
    tasks = _synthetic_args(spec, options)
    if len(tasks) != 1:
        raise DataError(f"synthetic-vtab needs one task name, e.g. synthetic-vtab:{next(iter(synthetic.VTAB_TASKS))}")
    return synthetic.vtab_source(tasks[0], options, seed)


def _on_path(reader: Callable[[Path, dict], Source]) -> Callable[[str, dict, int], Source]:
    def read(spec: str, options: dict, seed: int) -> Source:
        if not spec:
            raise DataError("missing path: write the source as FORMAT:PATH")
        return reader(Path(spec).expanduser(), options)

    return read


FORMATS: dict[str, tuple[Callable[[str, dict, int], Source], str]] = {
    "imagenet": (_on_path(read_imagenet), "imagenet:/data/ilsvrc (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, real.json)"),
    "imagenet21k": (
        _on_path(lambda p, o: read_imagefolder(p, o, "imagenet21k")),
        "imagenet21k:/data/imagenet21k (a folder per class)",
    ),
    "imagefolder": (_on_path(read_imagefolder), "imagefolder:/data/x (<class>/* or {train,val,test}/<class>/*)"),
    "cifar10": (_on_path(lambda p, o: read_cifar(p, o, "cifar10")), "cifar10:/data/cifar-10-batches-py"),
    "cifar100": (_on_path(lambda p, o: read_cifar(p, o, "cifar100")), "cifar100:/data/cifar-100-python"),
    "pets": (_on_path(read_pets), "pets:/data/oxford-iiit-pet (images/, annotations/{trainval,test}.txt)"),
    "flowers102": (_on_path(read_flowers), "flowers102:/data/flowers-102 (jpg/, imagelabels.mat, setid.mat)"),
    "fashion-mnist": (_on_path(read_fashion_mnist), "fashion-mnist:/usr/share/datasets/fashion-mnist (IDX, gz or not)"),
    "vtab": (_on_path(read_vtab), "vtab:/data/vtab-1k/dtd (train800/val200/train800val200/test .txt lists)"),
    "list": (_on_path(read_list), "list:/data/files.csv (CSV or parquet with path,label[,split])"),
    "digits": (read_digits, "digits: (scikit-learn's 1,797 8x8 handwritten digits, offline)"),
    "synthetic-upstream": (_synthetic_upstream, "synthetic-upstream: or synthetic-upstream:classes=100,per_class=200"),
    "synthetic-vtab": (
        _synthetic_vtab,
        f"synthetic-vtab:<task>[,test=1000,size=32], task one of {', '.join(synthetic.VTAB_TASKS)}",
    ),
}
ALIASES = {
    "ilsvrc": "imagenet",
    "imagenet1k": "imagenet",
    "imagenet-1k": "imagenet",
    "imagenet-21k": "imagenet21k",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "oxford-iiit-pet": "pets",
    "oxford_iiit_pet": "pets",
    "flowers": "flowers102",
    "flowers-102": "flowers102",
    "oxford_flowers102": "flowers102",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "vtab-1k": "vtab",
    "csv": "list",
    "parquet": "list",
}


def parse_source(source: str) -> tuple[str, str]:
    """``"FORMAT:PATH"`` -> (canonical format, path or spec)."""
    fmt, sep, rest = str(source).partition(":")
    fmt = ALIASES.get(fmt.strip().lower(), fmt.strip().lower())
    if not sep or fmt not in FORMATS:
        raise DataError(
            f"unknown source format in {source!r}: write FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}"
        )
    return fmt, rest.strip()


def read_source(source: str, options: dict, seed: int) -> Source:
    """Read a ``FORMAT:PATH`` source; consumes the format's own entries of ``options``."""
    fmt, spec = parse_source(source)
    return FORMATS[fmt][0](spec, options, seed)
