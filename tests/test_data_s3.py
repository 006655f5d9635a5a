"""The artifact store on S3: a real S3 server on loopback (moto's ThreadedMotoServer), no mocks."""

from __future__ import annotations

import pytest
import torch

from tests.test_data_formats import quarantine, write_imagefolder
from vit import storage
from vit.data import CorruptDataError, DataError, build_transform, open_dataset, prepare_dataset

SOURCE = "synthetic-vtab:structured_orientation,test=24"
OPTIONS = {"max_train800": 64, "max_val200": 16, "shard_samples": 16}


def test_prepare_to_s3_and_stream_back_the_same_batches_as_local(s3_bucket, tmp_path):
    uri = prepare_dataset(SOURCE, "orient", f"{s3_bucket}/vitflow", progress=False, **OPTIONS)
    assert uri.startswith(f"{s3_bucket}/vitflow/datasets/orient/")
    local = open_dataset(prepare_dataset(SOURCE, "orient", str(tmp_path), progress=False, **OPTIONS))
    remote = open_dataset(uri)
    assert remote.fingerprint == local.fingerprint and remote.info["vtab_group"] == "structured"
    assert storage.exists(f"{uri}/info.json") and len(storage.list_files(f"{uri}/shards")) == 4 + 1 + 2
    tf = build_transform("vtab", 16)
    for workers in (0, 2):  # worker processes open their own S3 connections
        a = list(remote.loader("train800", 10, tf, repeat=False, num_workers=workers, seed=4))
        b = list(local.loader("train800", 10, tf, repeat=False, num_workers=workers, seed=4))
        assert [x.index.tolist() for x in a] == [x.index.tolist() for x in b]
        assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))
    subset = remote.map_dataset("train800", tf, indices=[3, 40])  # sparse rows: ranged reads
    full = local.map_dataset("train800", tf)
    assert torch.equal(subset[1][0], full[40][0])
    # unchanged source: nothing is prepared twice, on S3 either
    assert prepare_dataset(SOURCE, "orient", f"{s3_bucket}/vitflow", progress=False, **OPTIONS) == uri


def test_s3_resume_mid_epoch(s3_bucket):
    ds = open_dataset(prepare_dataset(SOURCE, "orient", s3_bucket, progress=False, **OPTIONS))
    tf = build_transform("pretrain", 16)
    full = [b.index.tolist() for _, b in zip(range(12), ds.loader("train800", 8, tf, seed=2), strict=False)]
    first = ds.loader("train800", 8, tf, seed=2)
    head = [b.index.tolist() for _, b in zip(range(5), first, strict=False)]
    resumed = ds.loader("train800", 8, tf, seed=2)
    resumed.load_state_dict(first.state_dict())
    tail = [b.index.tolist() for _, b in zip(range(7), resumed, strict=False)]
    assert head + tail == full


def test_missing_bucket_is_a_clear_error_before_any_work(s3_bucket):
    with pytest.raises(DataError, match="cannot write to the artifact root s3://no-such-bucket.*bucket does not exist"):
        prepare_dataset(SOURCE, "orient", "s3://no-such-bucket/x", progress=False)
    with pytest.raises(DataError, match="no prepared dataset at s3://"):
        open_dataset(f"{s3_bucket}/datasets/none/0123")


def test_corrupt_share_on_s3_publishes_nothing(s3_bucket, tmp_path):
    src = write_imagefolder(tmp_path / "src", per_class=2, splits=("train",))
    (src / "train" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptDataError) as failure:
        prepare_dataset(f"imagefolder:{src}", "bad", s3_bucket, progress=False, max_corrupt_fraction=0.0)
    dataset = str(failure.value).split("The list is at ")[1].rsplit("/", 1)[0]
    assert dataset.startswith(f"{s3_bucket}/datasets/bad/")
    assert storage.list_files(dataset) == [f"{dataset}/quarantine.csv"]
    assert quarantine(dataset)["reason"].tolist() == ["not an image"]


def test_ranged_and_offset_reads(s3_bucket):
    uri = f"{s3_bucket}/blob.bin"
    storage.write_bytes(uri, bytes(range(256)) * 4)
    assert storage.read_range(uri, 250, 10) == bytes(range(250, 256)) + bytes(range(4))
    with storage.open_stream_at(uri, 1000) as stream:
        assert stream.read(100) == bytes(range(232, 256))
