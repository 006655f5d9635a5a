"""Every source format, from small files written here in exactly that format, corrupt files of each kind, and real
Fashion-MNIST images. The writers are imported by the other data tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from PIL import Image

from vit.data import DataError, open_dataset, prepare_dataset

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------------------------
# Writers: the on-disk formats


def pixels(seed: int, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    """A (h, w, 3) uint8 image with structure (a gradient and a block), distinct per seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1), np.full_like(xs, seed * 37 % 256)], -1)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(seed, size)).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt, size))
    return path


def write_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class=4, splits=("train", "val")) -> Path:
    seed = 0
    for split in splits:
        for name in classes:
            for i in range(per_class):
                seed += 1
                fmt = "PNG" if i % 2 else "JPEG"
                write_image(root / split / name / f"{name}_{i}.{'png' if fmt == 'PNG' else 'jpg'}", seed, fmt)
    return root


def write_ilsvrc(root: Path, wnids=("n01440764", "n01443537"), train=6, val=3) -> Path:
    for wnid in wnids:
        for i in range(train):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", hash((wnid, i)) % 1000)
    number = 0
    for _ in range(val):
        for wnid in wnids:
            number += 1
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", 5000 + number)
    return root


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """n images as CIFAR rows: 1024 red, 1024 green, 1024 blue values each."""
    images = np.stack([pixels(seed * 1000 + i, (32, 32)) for i in range(n)])
    return images.transpose(0, 3, 1, 2).reshape(n, 3072)


def write_cifar10(root: Path, per_batch: int = 10, labels: dict[int, int] | None = None) -> Path:
    """``cifar-10-batches-py`` under ``root``; ``labels`` overrides {row of data_batch_1: label}."""
    folder = root / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch_labels = [(i + b) % 10 for i in range(per_batch)]
        for row, label in (labels or {}).items() if name == "data_batch_1" else ():
            batch_labels[row] = label
        _pickle(folder / name, {b"data": cifar_rows(per_batch, b), b"labels": batch_labels, b"batch_label": b"x"})
    return folder


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    _pickle(
        folder / "meta",
        {b"fine_label_names": [f"fine{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20},
    )
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [i % 100 for i in range(n)]
        _pickle(folder / name, {b"data": cifar_rows(n, seed), b"fine_labels": fine, b"coarse_labels": [0] * n})
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(root: Path, n_train=12, n_test=6, gz=True, train_labels=None) -> Path:
    rng = np.random.default_rng(3)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10 if train_labels is None or prefix == "t10k" else np.asarray(train_labels)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            path = root / f"{prefix}-{kind}-ubyte" if not gz else root / f"{prefix}-{kind}-ubyte.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(data) if gz else data)
    return root


def write_pets(root: Path, breeds=("Abyssinian", "american_bulldog", "Bengal"), per_breed=5) -> Path:
    folder = root / "oxford-iiit-pet"
    lines = {"trainval.txt": ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids"], "test.txt": []}
    for class_id, breed in enumerate(breeds, 1):
        for i in range(1, per_breed + 1):
            name = f"{breed}_{i}"
            write_image(folder / "images" / f"{name}.jpg", class_id * 100 + i, size=(30, 26))
            split = "test.txt" if i == per_breed else "trainval.txt"
            lines[split].append(f"{name} {class_id} {1 + class_id % 2} {i}")
    for file, content in lines.items():
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / file).write_text("\n".join(content) + "\n")
    return folder


def write_flowers(root: Path, num_images=12) -> Path:
    folder = root / "flowers-102"
    for i in range(1, num_images + 1):
        write_image(folder / "jpg" / f"image_{i:05d}.jpg", 300 + i)
    labels = np.array([[(i % 4) + 1 for i in range(num_images)]])  # 1-based class ids
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, num_images + 1)
    scipy.io.savemat(
        folder / "setid.mat", {"trnid": ids[None, 0::3], "valid": ids[None, 1::3], "tstid": ids[None, 2::3]}
    )
    return folder


def write_vtab(root: Path, task: str = "dsprites_loc", counts=None, labels=16) -> Path:
    """The common PyTorch VTAB-1k layout: images/<split>/%06d.jpg and <split>.txt."""
    folder = root / task
    counts = counts or {"train800": 8, "val200": 4, "train800val200": 12, "test": 6}
    for split, n in counts.items():
        lines = []
        for i in range(n):
            write_image(folder / "images" / split / f"{i:06d}.jpg", hash((split, i)) % 997)
            lines.append(f"images/{split}/{i:06d}.jpg {i % labels}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------------------
# Helpers


def prepare(source: str, root: Path, name: str = "ds", **kwargs):
    uri = prepare_dataset(source, name, str(root / "artifacts"), progress=False, **kwargs)
    return open_dataset(uri)


def by_key(ds, split: str) -> pd.DataFrame:
    return ds.manifest(split).set_index("key")


def decoded(ds, split: str, keys: list[str]) -> list[np.ndarray]:
    """The stored pixels of ``keys`` (HWC uint8), through the map-style dataset with no transform."""
    manifest = ds.manifest(split)
    rows = [int(manifest.index[manifest["key"] == k][0]) for k in keys]
    mapped = ds.map_dataset(split, indices=rows)
    return [mapped[i][0].permute(1, 2, 0).numpy() for i in range(len(rows))]


def quarantine(ds_or_uri) -> pd.DataFrame:
    from vit import storage

    uri = ds_or_uri if isinstance(ds_or_uri, str) else ds_or_uri.uri
    return pd.read_csv(io.StringIO(storage.read_text(f"{uri}/quarantine.csv")))


# --------------------------------------------------------------------------------------------------------------
# Folder formats


def test_imagefolder_keeps_classes_splits_and_exact_bytes(tmp_path):
    src = write_imagefolder(tmp_path / "src")
    ds = prepare(f"imagefolder:{src}", tmp_path)
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.splits == ["train", "val"] and ds.count("train") == 12 and ds.count("val") == 12
    train = by_key(ds, "train")
    assert train.loc["train/dog/dog_1", "label"] == 1
    assert (train.loc["train/dog/dog_1", "width"], train.loc["train/dog/dog_1", "height"]) == (24, 20)
    # JPEG and PNG files are stored byte for byte: the stored PNG decodes to the source pixels exactly
    source_png = np.asarray(Image.open(src / "train" / "dog" / "dog_1.png").convert("RGB"))
    np.testing.assert_array_equal(decoded(ds, "train", ["train/dog/dog_1"])[0], source_png)
    digest = hashlib.sha256((src / "train/cat/cat_0.jpg").read_bytes()).hexdigest()
    assert train.loc["train/cat/cat_0", "sha256"] == digest


def test_imagefolder_without_split_folders_is_one_train_split(tmp_path):
    src = write_imagefolder(tmp_path / "src", splits=("train",)) / "train"
    ds = prepare(f"imagefolder:{src}", tmp_path, minival="0.25")
    assert ds.splits == ["train", "minival", "train_minus_minival"]
    assert ds.count("minival") == 3 and sorted(ds.manifest("minival")["label"]) == [0, 1, 2]  # one per class


def test_imagenet_ilsvrc_layout_minival_and_real_labels(tmp_path):
    src = write_ilsvrc(tmp_path / "ilsvrc")
    real = [[0], [], [1, 0], [1], [0], [1]]  # one list per val image, sorted by file name
    (src / "real.json").write_text(json.dumps(real))
    ds = prepare(f"imagenet:{src}", tmp_path, name="imagenet")
    assert ds.classes == ["n01440764", "n01443537"]
    assert set(ds.splits) == {"train", "val", "train_minus_minival", "minival"}
    assert ds.count("train") == 12 and ds.count("val") == 6
    assert ds.count("minival") == 2 and ds.count("train_minus_minival") == 10  # >= 1 per class, stratified
    assert set(ds.manifest("minival")["label"]) == {0, 1}
    val = ds.manifest("val")
    by_number = {k.rsplit("_", 1)[1]: list(v) for k, v in zip(val["key"], val["real_labels"], strict=True)}
    assert [by_number[f"{i:08d}"] for i in range(1, 7)] == real
    assert all(len(v) == 0 for v in ds.manifest("train")["real_labels"])


def test_imagenet_bad_layouts_are_clear_errors(tmp_path):
    src = write_ilsvrc(tmp_path / "ilsvrc")
    (src / "real.json").write_text(json.dumps([[0]] * 5))
    with pytest.raises(DataError, match="real.json has 5 entries but val/ has 6 images"):
        prepare(f"imagenet:{src}", tmp_path)
    (src / "real.json").unlink()
    write_image(src / "val" / "n99999999" / "ILSVRC2012_val_00000099.JPEG", 1)
    with pytest.raises(DataError, match="label/class mismatch.*n99999999"):
        prepare(f"imagenet:{src}", tmp_path)
    flat = tmp_path / "flat"
    write_image(flat / "train" / "n1" / "a.JPEG", 1)
    write_image(flat / "val" / "ILSVRC2012_val_00000001.JPEG", 2)
    with pytest.raises(DataError, match="val/<wnid>/ folders"):
        prepare(f"imagenet:{flat}", tmp_path)
    with pytest.raises(DataError, match="missing split"):
        prepare(f"imagenet:{tmp_path / 'ilsvrc' / 'train'}", tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Array formats


def test_cifar10_pickles_pixels_labels_minival_and_bad_labels(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=10, labels={3: 10, 4: -1})
    ds = prepare("cifar10:" + str(tmp_path / "data"), tmp_path, max_corrupt_fraction=0.05)  # parent folder works
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.num_classes == 10
    assert ds.count("train") == 48 and ds.count("test") == 10 and ds.info["quarantined"] == 2
    assert ds.count("minival") == 10  # 2% of 48 rounds to 0: at least one of every class
    q = quarantine(ds)
    assert sorted(q["reason"]) == ["label -1 out of range [0, 10)", "label 10 out of range [0, 10)"]
    assert q["source"].str.endswith("data_batch_1[3]").any()
    row = by_key(ds, "train").loc["data_batch_2-00007"]
    assert row["label"] == (7 + 1) % 10
    expected = cifar_rows(10, 1)[7].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(decoded(ds, "train", ["data_batch_2-00007"])[0], expected)


def test_cifar100_fine_labels(tmp_path):
    folder = write_cifar100(tmp_path)
    ds = prepare(f"cifar100:{folder}", tmp_path)
    assert ds.num_classes == 100 and ds.classes[5] == "fine5"
    assert ds.count("train") == 200 and ds.count("minival") == 100  # 2% of 2 per class: one each
    assert by_key(ds, "test").loc["test-00042", "label"] == 42


def test_corrupt_cifar_batch_and_missing_batch_are_bad_input(tmp_path):
    folder = write_cifar10(tmp_path, per_batch=4)
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch"):
        prepare(f"cifar10:{folder}", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing cifar10 split file.*data_batch_3"):
        prepare(f"cifar10:{folder}", tmp_path)


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_cifar10(tmp_path, per_batch=4)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        prepare(f"cifar10:{folder}", tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_raw_and_gzip(tmp_path, gz):
    root = write_fashion_mnist(tmp_path / "fm" / "FashionMNIST" / "raw", gz=gz, train_labels=list(range(10)) + [3, 12])
    ds = prepare(f"fashion-mnist:{tmp_path / 'fm'}", tmp_path, max_corrupt_fraction=0.1)  # torchvision's layout
    assert ds.classes[0] == "T-shirt/top" and ds.count("train") == 11 and ds.count("test") == 6
    assert quarantine(ds)["reason"].tolist() == ["label 12 out of range [0, 10)"]
    raw = (root / "t10k-images-idx3-ubyte.gz").read_bytes() if gz else (root / "t10k-images-idx3-ubyte").read_bytes()
    images = np.frombuffer(gzip.decompress(raw) if gz else raw, np.uint8, offset=16).reshape(-1, 28, 28)
    got = decoded(ds, "test", ["t10k-00004"])[0]
    assert got.shape == (28, 28, 3)  # grayscale decodes to RGB
    np.testing.assert_array_equal(got[..., 0], images[4])


def test_truncated_idx_quarantines_the_missing_images(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=20, gz=True)
    path = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data)[:-40])  # a cut-off download: the gzip stream ends early
    with pytest.raises(DataError, match="corrupt or unusable"):
        prepare(f"fashion-mnist:{root}", tmp_path)
    ds = prepare(f"fashion-mnist:{root}", tmp_path, max_corrupt_fraction=0.5)
    reasons = quarantine(ds)["reason"]
    assert len(reasons) >= 1 and (reasons == "truncated file: sample missing").all()
    assert ds.count("train") == 20 - len(reasons)


def test_fashion_mnist_real_images(tmp_path):
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST IDX files not installed in {FASHION_MNIST} (Debian package dataset-fashion-mnist)")
    ds = prepare(f"fashion-mnist:{FASHION_MNIST}", tmp_path, max_train=300, max_test=100)
    assert ds.count("train") == 300 and ds.count("test") == 100 and ds.count("minival") >= 10
    assert ds.info["quarantined"] == 0
    raw = gzip.decompress((FASHION_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = np.frombuffer(
        gzip.decompress((FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    test = by_key(ds, "test")
    for i in (0, 57, 99):
        assert test.loc[f"t10k-{i:05d}", "label"] == labels[i]
        np.testing.assert_array_equal(decoded(ds, "test", [f"t10k-{i:05d}"])[0][..., 1], images[i])


def test_fashion_mnist_held_out_classes_in_vtab1k_splits(tmp_path):
    """The demo's downstream task: real IDX files, its held-out classes relabelled 0-4, VTAB-1k's 800 + 200 from
    train, the official test images of those classes; fewer labels cut from the same draws."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST IDX files not installed in {FASHION_MNIST} (Debian package dataset-fashion-mnist)")
    held_out = [2, 4, 6, 8, 9]
    ds = prepare(f"fashion-mnist:{FASHION_MNIST}", tmp_path, keep_classes="2,4,6,8,9", vtab1k=True, max_test=500)
    assert ds.classes == ["Pullover", "Coat", "Shirt", "Bag", "Ankle boot"]
    assert (ds.count("train800"), ds.count("val200"), ds.count("train800val200"), ds.count("test")) == (
        800,
        200,
        1000,
        500,
    )
    assert "train" not in ds.splits and "minival" not in ds.splits
    train = set(ds.manifest("train800")["key"])
    assert train.isdisjoint(ds.manifest("val200")["key"]) and all(k.startswith("train-") for k in train)
    labels = np.frombuffer(
        gzip.decompress((FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    test = by_key(ds, "test")
    assert set(test["label"]) == set(range(5))
    for key, row in test.head(20).iterrows():
        assert labels[int(key.split("-")[1])] == held_out[row["label"]]  # relabelled in order, from the real labels
    again = prepare(f"fashion-mnist:{FASHION_MNIST}", tmp_path, keep_classes="2,4,6,8,9", vtab1k=True, max_test=500)
    assert again.uri == ds.uri  # seeded: the same splits, found by fingerprint
    small = prepare(
        f"fashion-mnist:{FASHION_MNIST}",
        tmp_path,
        keep_classes="2,4,6,8,9",
        vtab1k=True,
        max_train800=80,
        max_val200=20,
    )  # a 100-label task: the first 80 + 20 of the same draws, the union cut with them
    assert (small.count("train800"), small.count("val200"), small.count("train800val200")) == (80, 20, 100)
    assert set(small.manifest("train800val200")["key"]) <= train | set(ds.manifest("val200")["key"])
    other = prepare(f"fashion-mnist:{FASHION_MNIST}", tmp_path, keep_classes="0,1,3,5,7", max_train=100, max_test=10)
    assert other.classes == ["T-shirt/top", "Trouser", "Dress", "Sandal", "Sneaker"]
    assert set(other.manifest("train")["label"]) <= set(range(5))


def test_class_subset_and_vtab1k_refuse_what_they_cannot_do(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=30)
    with pytest.raises(DataError, match="classes 0-9, not 12"):
        prepare(f"fashion-mnist:{root}", tmp_path, keep_classes="8-12")
    with pytest.raises(DataError, match="e.g. 5-9"):
        prepare(f"fashion-mnist:{root}", tmp_path, keep_classes="five")
    with pytest.raises(DataError, match="train split of at least 1000"):
        prepare(f"fashion-mnist:{root}", tmp_path, vtab1k=True)
    with pytest.raises(DataError, match="give one of them"):
        prepare("digits:", tmp_path, vtab1k=True, minival=0.1)


def test_scikit_learn_digits_are_real_scans_in_vtab1k_splits(tmp_path):
    from sklearn.datasets import load_digits

    ds = prepare("digits:", tmp_path, vtab1k=True)
    assert ds.classes == [str(d) for d in range(10)]
    assert (ds.count("train800"), ds.count("val200"), ds.count("test")) == (800, 200, 797)
    keys = set(ds.manifest("train800val200")["key"])
    assert keys.isdisjoint(ds.manifest("test")["key"]) and len(keys | set(ds.manifest("test")["key"])) == 1797
    assert ds.manifest("test")["label"].value_counts().min() >= 75  # stratified
    digits = load_digits()
    test = by_key(ds, "test")
    for key in test.index[:5]:
        i = int(key.split("-")[1])
        assert test.loc[key, "label"] == digits.target[i]
        got = decoded(ds, "test", [key])[0]
        assert got.shape == (8, 8, 3)
        np.testing.assert_array_equal(got[..., 0], np.rint(digits.images[i] * 255 / 16).astype(np.uint8))
    with pytest.raises(DataError, match="takes no path"):
        prepare("digits:/somewhere", tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Annotated formats


def test_pets_annotations_classes_and_missing_image(tmp_path):
    folder = write_pets(tmp_path / "pets")
    (folder / "images" / "Bengal_2.jpg").unlink()
    ds = prepare(f"pets:{tmp_path / 'pets'}", tmp_path, max_corrupt_fraction=0.1)
    assert ds.classes == ["Abyssinian", "american_bulldog", "Bengal"]
    assert ds.count("train") == 11 and ds.count("test") == 3 and ds.count("minival") == 3  # 10%: >= 1 per class
    assert quarantine(ds).to_dict("records") == [
        {"source": str(folder / "images" / "Bengal_2.jpg"), "reason": "file not found"}
    ]
    assert by_key(ds, "test").loc["images/american_bulldog_5", "label"] == 1
    (folder / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match="missing split file.*test.txt"):
        prepare(f"pets:{folder}", tmp_path)


def test_flowers102_mat_files_and_official_splits(tmp_path):
    folder = write_flowers(tmp_path)
    ds = prepare(f"flowers102:{tmp_path}", tmp_path)
    assert ds.num_classes == 102 and ds.classes[0] == "1"
    assert {s: ds.count(s) for s in ("train", "val", "test")} == {"train": 4, "val": 4, "test": 4}
    assert by_key(ds, "val").loc["jpg/image_00002", "label"] == 1  # imagelabels.mat says 2 (1-based)
    scipy.io.savemat(folder / "setid.mat", {"trnid": np.array([[1, 40]]), "valid": np.array([[2]]), "tstid": [[3]]})
    with pytest.raises(DataError, match="image ids up to 40"):
        prepare(f"flowers102:{folder}", tmp_path)


@pytest.mark.parametrize("folder_name", ["oxford_pet", "oxford_iiit_pet"])
def test_vtab_both_naming_variants_and_all_splits(tmp_path, folder_name):
    folder = write_vtab(tmp_path / "vtab-1k", folder_name, labels=37)
    ds = prepare(f"vtab:{folder}", tmp_path)
    assert ds.info["vtab_task"] == "oxford_iiit_pet" and ds.info["vtab_group"] == "natural"
    assert ds.num_classes == 37
    assert {s: ds.count(s) for s in ds.splits} == {"train800": 8, "val200": 4, "train800val200": 12, "test": 6}


def test_vtab_out_of_range_label_missing_split_and_unknown_task(tmp_path):
    folder = write_vtab(tmp_path, "smallnorb_ele")  # 9 classes: labels 9..15 are out of range
    with pytest.raises(DataError, match=r"\d+ of 30 samples .* more than --max-corrupt-fraction 1.00%"):
        prepare(f"vtab:{folder}", tmp_path)
    ds = prepare(f"vtab:{folder}", tmp_path, max_corrupt_fraction=0.5)
    assert set(quarantine(ds)["reason"]) == {f"label {n} out of range [0, 9)" for n in range(9, 12)}
    (folder / "val200.txt").unlink()
    with pytest.raises(DataError, match="missing split file.*val200.txt"):
        prepare(f"vtab:{folder}", tmp_path)
    other = write_vtab(tmp_path, "my_task")
    with pytest.raises(DataError, match="unknown VTAB-1k task 'my_task'.*--option task=NAME"):
        prepare(f"vtab:{other}", tmp_path)
    assert prepare(f"vtab:{other}", tmp_path, task="dsprites_ori").info["vtab_task"] == "dsprites_ori"


def test_list_files_csv_and_parquet(tmp_path):
    for i in range(6):
        write_image(tmp_path / "imgs" / f"{i}.jpg", i)
    table = pd.DataFrame({"path": [f"imgs/{i}.jpg" for i in range(6)] + ["imgs/gone.jpg"], "label": list("abcabca")})
    table.to_csv(tmp_path / "files.csv", index=False)
    ds = prepare(f"list:{tmp_path / 'files.csv'}", tmp_path, max_corrupt_fraction=0.2)
    assert ds.classes == ["a", "b", "c"] and ds.count("train") == 6
    assert quarantine(ds)["reason"].tolist() == ["file not found"]
    ints = pd.DataFrame({"path": [str(tmp_path / f"imgs/{i}.jpg") for i in range(6)], "label": [0, 1, 2, 3, 4, 5]})
    ints["split"] = ["train"] * 4 + ["test"] * 2
    ints.to_parquet(tmp_path / "files.parquet")
    ds = prepare(f"list:{tmp_path / 'files.parquet'}", tmp_path, name="ints", num_classes=5, max_corrupt_fraction=0.2)
    assert ds.num_classes == 5 and ds.count("train") == 4 and ds.count("test") == 1
    with pytest.raises(DataError, match="lacks column.*label"):
        pd.DataFrame({"path": ["a.jpg"]}).to_csv(tmp_path / "bad.csv", index=False)
        prepare(f"list:{tmp_path / 'bad.csv'}", tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Corrupt files and bad input


def test_corrupt_files_of_each_kind_go_to_quarantine(tmp_path):
    src = write_imagefolder(tmp_path / "src", per_class=10, splits=("train",))
    good = (src / "train/cat/cat_0.jpg").read_bytes()
    (src / "train/cat/empty.jpg").write_bytes(b"")
    (src / "train/cat/truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "train/dog/random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (src / "train/dog/notes.txt").write_text("not an image")
    cmyk = io.BytesIO()
    Image.fromarray(pixels(7)).convert("CMYK").save(cmyk, format="JPEG")
    (src / "train/eel/cmyk.jpg").write_bytes(cmyk.getvalue())  # valid, unusual: stored as RGB PNG
    ds = prepare(f"imagefolder:{src}", tmp_path, max_corrupt_fraction=0.2)
    reasons = dict(zip(quarantine(ds)["source"].map(lambda s: Path(s).name), quarantine(ds)["reason"], strict=True))
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["truncated.jpg"].startswith("corrupt or truncated image")
    assert reasons["random.jpg"] == "not an image" and reasons["notes.txt"] == "not an image"
    assert ds.info["quarantined"] == 4 and ds.count("train") == 31
    image = ds.map_dataset("train", indices=[int(np.flatnonzero(ds.manifest("train")["key"] == "train/eel/cmyk")[0])])
    assert image[0][0].shape == (3, 20, 24) and image[0][0].dtype == torch.uint8


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("imagefolder:{tmp}/nowhere", "missing image folder: .*nowhere does not exist"),
        ("tiff:{tmp}", "unknown source format in 'tiff:.*imagenet, imagenet21k"),
        ("{tmp}", "unknown source format"),
        ("cifar10:{tmp}", "does not look like CIFAR-10.*--download"),
        ("fashion-mnist:{tmp}", "does not hold Fashion-MNIST"),
        ("imagefolder:{tmp}/empty", "empty dataset: .* has no samples"),
        ("synthetic-vtab:nope", "unknown synthetic VTAB task 'nope'"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, source, message):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=message):
        prepare(source.format(tmp=tmp_path), tmp_path)


def test_unknown_options_and_bad_names_are_refused(tmp_path):
    with pytest.raises(DataError, match="unknown option.*colour"):
        prepare("synthetic-vtab:structured_count", tmp_path, colour="red")
    with pytest.raises(DataError, match="bad dataset name"):
        prepare("synthetic-vtab:structured_count", tmp_path, name="../up")
    with pytest.raises(DataError, match="max_val: .* has no split 'val'"):
        prepare("synthetic-vtab:structured_count", tmp_path, max_val=3)
