"""Storage faults: the S3 server down in the middle of dataset preparation and checkpoint uploads, a corrupted
checkpoint object, and a full artifact disk. Nothing is lost and nothing incomplete is ever visible as complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.reliability.conftest import SeaweedFS, free_ports, launch_engine, train_config, wait_for
from vit import storage
from vit.engine.config import TrainConfig
from vit.engine.run import train
from vit.engine.train_state import CheckpointManager

OUTAGE_SECONDS = 10


class Watcher(threading.Thread):
    """Polls the bucket while the test runs and records every moment a completion marker (a checkpoint's
    ``latest.json``, a dataset's ``info.json``) was visible before everything it vouches for."""

    def __init__(self, server: SeaweedFS, bucket: str) -> None:
        super().__init__(daemon=True)
        self.s3, self.bucket = server.client(), bucket
        self.violations: list[str] = []
        self.checks = 0
        self.stop = threading.Event()

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self) -> set[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

    def check(self) -> None:
        keys = self.keys()
        for key in sorted(k for k in keys if k.endswith("/latest.json")):
            base = key.rsplit("/", 1)[0]
            step_dir = f"{base}/{json.loads(self.get(key))['path']}"
            manifest = json.loads(self.get(f"{step_dir}/manifest.json"))
            for name, meta in manifest["files"].items():
                if hashlib.sha256(self.get(f"{step_dir}/{name}")).hexdigest() != meta["sha256"]:
                    self.violations.append(f"{step_dir}/{name} does not match its manifest")
        for key in sorted(k for k in keys if k.endswith("/info.json")):
            base = key.rsplit("/", 1)[0]
            info = json.loads(self.get(key))
            shards = {k for k in self.keys() if k.startswith(f"{base}/shards/")}
            if len(shards) != info["shards"] or not {f"{base}/manifest.parquet", f"{base}/classes.json"} <= keys:
                self.violations.append(f"{base}: info.json visible with {len(shards)} of {info['shards']} shards")
        self.checks += 1

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # the server is down, or a key vanished (pruned) mid-check
                self.check()
            time.sleep(0.1)


def verify_dataset(uri: str) -> int:
    """Every sample's bytes match the manifest's sha256; returns the number of samples checked."""
    manifest = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(uri, "manifest.parquet"))))
    shards = {name: storage.read_bytes(storage.join(uri, name)) for name in manifest["shard"].unique()}
    for row in manifest.itertuples():
        data = shards[row.shard][row.offset : row.offset + row.size]
        assert hashlib.sha256(data).hexdigest() == row.sha256, f"{row.shard}@{row.offset}"
    return len(manifest)


def test_s3_outage_during_preparation_and_checkpoint_upload(seaweedfs, tiny_dataset, tmp_path):
    """SeaweedFS (persistent, keys enforced) is stopped while a dataset is being prepared into it and a training
    run is uploading checkpoints to it, and started again 10 s later: both finish, with every byte intact."""
    from vit.data import prepare_dataset

    root = "s3://data/vitflow"
    ckpt = f"{root}/checkpoints/run"
    watcher = Watcher(seaweedfs, "data")
    watcher.start()
    training = launch_engine(train_config(tiny_dataset, ckpt, steps=60, every=2, keep=3), tmp_path / "train")
    s3 = seaweedfs.client()

    def visible(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix=prefix).get("Contents", [])]

    wait_for(lambda: visible("vitflow/checkpoints/run/latest.json"), "the first checkpoint", proc=training)
    prepared: dict[str, object] = {}

    def prepare() -> None:
        try:
            prepared["uri"] = prepare_dataset(
                "synthetic-upstream:", "up", root, progress=False, classes=10, per_class=100, size=24,
                shard_samples=4, workers=1,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            prepared["error"] = exc

    preparing = threading.Thread(target=prepare)
    preparing.start()
    wait_for(lambda: any("/shards/" in k for k in visible("vitflow/datasets/")), "the first shard")
    seaweedfs.stop()
    down_at = time.monotonic()
    assert preparing.is_alive() and training.poll() is None, "the outage must hit both mid-way"
    time.sleep(OUTAGE_SECONDS)
    seaweedfs.start()
    preparing.join(timeout=300)
    assert training.wait(timeout=300) == 0, (tmp_path / "train" / "engine.log").read_text()[-3000:]
    watcher.stop.set()
    watcher.join()
    assert "error" not in prepared, prepared.get("error")
    assert time.monotonic() - down_at >= OUTAGE_SECONDS
    assert watcher.violations == [] and watcher.checks > 10

    uri = str(prepared["uri"])
    info = json.loads(storage.read_text(storage.join(uri, "info.json")))
    assert verify_dataset(uri) == sum(info["counts"][s] for s in info["splits"]) > 0
    assert not storage.exists(f"{uri}.lock")  # released
    manager = CheckpointManager(ckpt, keep=3)
    assert manager.latest_step() == 60 and manager.load_latest().step == 60
    assert storage.exists(f"{ckpt}/model.safetensors")

    # A checksum mismatch in the newest checkpoint object is detected; the previous good one is used.
    newest = f"{ckpt}/step-00000060/__0_0.distcp"
    data = storage.read_bytes(newest)
    storage.write_bytes(newest, data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    skipped: list[str] = []
    loaded = manager.load_latest(on_skip=skipped.append)
    assert loaded is not None and loaded.step == 58
    assert len(skipped) == 1 and "step-00000060/__0_0.distcp: checksum mismatch" in skipped[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (we are root in CI). Where mounting is not permitted, the same ENOSPC is injected in the
    storage layer's file writes instead - the one place this fault can then be produced."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    try:
        real = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    except OSError:  # no mount program
        real = None
    yield mount, bool(real and real.returncode == 0)
    if real and real.returncode == 0:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_artifact_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(small_disk, tiny_dataset, monkeypatch):
    mount, real = small_disk
    ckpt = mount / "ckpt"
    cfg = TrainConfig.from_dict(train_config(tiny_dataset, str(ckpt), steps=4, every=2, keep=2))
    cfg.deterministic = False  # in-process: leave torch's global determinism setting alone
    train(cfg)  # checkpoints at 2 and 4, then the final weights
    manager = CheckpointManager(str(ckpt))
    assert manager.latest_step() == 4
    if real:
        filler = mount / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    else:
        real_fsync = storage.os.fsync

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(storage.os, "fsync", full)
    cfg.steps = 8
    with pytest.raises(storage.StorageError, match=r"no space left writing .*step-00000006.*: free space on"):
        train(cfg)
    if not real:
        monkeypatch.setattr(storage.os, "fsync", real_fsync)
    assert manager.latest_step() == 4
    loaded = manager.load_latest()
    assert loaded.step == 4 and all(torch.isfinite(t).all() for t in loaded.tensors["model"].values())
    assert not [p for p in Path(ckpt).rglob("*.tmp")]  # no half-written temporary file left behind


@pytest.mark.timeout(120)
def test_a_misconfigured_s3_root_is_refused_at_start_naming_endpoint_and_bucket(seaweedfs, monkeypatch):
    """A configuration error is not transient: an unreachable endpoint, an unknown bucket and a wrong secret
    key make `vitflow run` exit 2 at once with a message that names the endpoint or the bucket, instead of being
    retried for minutes (SeaweedFS checks the signatures, so the wrong key is really refused)."""
    from typer.testing import CliRunner

    from flows.cli import app

    nowhere = f"http://127.0.0.1:{free_ports(1)}"  # nothing listens there
    cases = [
        ({"AWS_ENDPOINT_URL_S3": nowhere}, "s3://data/x", f"cannot reach the S3 endpoint {nowhere}"),
        ({}, "s3://no-such-bucket/x", f"bucket does not exist: 'no-such-bucket' at {seaweedfs.endpoint}"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://data/x", f"{seaweedfs.endpoint} refused the signature"),
    ]
    for env, root, message in cases:
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            result = CliRunner().invoke(app, ["run", "demo", "--set", f"artifact_root={root}"])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
