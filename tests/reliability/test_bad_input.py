"""Bad input refused before any compute with an error naming the field; untrusted files (checkpoints, dataset
files, shards) refused without executing or reading anything they smuggle in.

Corrupt images, truncated files and bad labels going to quarantine are covered where the formats are:
tests/test_data_formats.py (test_corrupt_files_of_each_kind_go_to_quarantine, ...) and tests/test_data_cli.py.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from vit import storage
from vit.checkpoints import CheckpointError, load_checkpoint, load_npz, load_pretrained, save_checkpoint
from vit.model import create_model

BAD_SPECS = [  # (--set overrides on the demo preset, what the error must name)
    (["pretrain.steps=abc"], "pretrain.steps"),
    (["pretrain.steps=-5"], "pretrain.steps"),
    (["pretrain.steps=1.5"], "pretrain.steps"),
    (["pretrain.lr=.inf"], "pretrain.lr"),
    (["pretrain.lr=.nan"], "pretrain.lr"),
    (["pretrain.weight_decay=-1"], "pretrain.weight_decay"),
    (["model.name=vit_zz_99"], "model.name"),
    (["pretrain.dataset.source=bogus:/data"], "pretrain.dataset.source"),
    (["pretrain.dataset.source=no-format"], "pretrain.dataset.source"),
    (["pretrain.dataset.name=../evil"], "pretrain.dataset.name"),
    (["pretrain.dataset.max_corrupt_fraction=2"], "pretrain.dataset.max_corrupt_fraction"),
    (["pretrain.image_size=33"], "pretrain.image_size 33 is not a multiple of the patch size 4"),
    (["pretrain.batch_size=100", "compute.accum_steps=3"], "pretrain.batch_size 100 is not divisible"),
    (
        ["compute.nproc_per_node=3", "transfer.finetune.batch_size=32"],
        "transfer.finetune.batch_size 32 is not divisible by devices (3)",
    ),
    (["compute.accum_steps=0"], "compute.accum_steps"),
    (["compute.device=tpu"], "compute.device"),
    (["compute.nnodes=2"], "compute.rdzv_endpoint"),
    (["pretrain.epochs=3"], "pretrain: give exactly one of steps and epochs"),
    (["pretrain=null"], "give exactly one of pretrain and init"),
    (["artifact_root=ftp://host/x"], "artifact_root"),
    (["artifact_root=s3://"], "artifact_root"),
    (["tracking_uri=mysql://host/db"], "tracking_uri"),
    (["pretrain=null", "init=gs://bucket/model.npz"], "init"),
    (["seed=-1"], "seed"),
    (["transfer.fewshot.seeds=[-1]"], "transfer.fewshot.seeds.0"),
    (["transfer.fewshot.shots=[0]"], "transfer.fewshot.shots"),
    (["transfer.finetune.lrs=[]"], "transfer.finetune.lrs"),
    (["transfer.benchmarks.0.protocol=imagenet22k"], "transfer.benchmarks.0.protocol"),
    (["transfer.benchmarks.0.name=a/../../b"], "transfer.benchmarks.0.name"),
    (["analysis.num_images=1000"], "analysis.num_images"),
    (["experiment="], "experiment"),
    (["pretrain.nosuch=1"], "pretrain.nosuch"),
    (["seed.x=1"], "seed is a value"),
    (["pretrain..steps=3"], "empty field name"),
    (["transfer.benchmarks.99.name=x"], "transfer.benchmarks.99.name"),
    (["pretrain.steps"], "not path.to.field=value"),
    (["pretrain.dataset.source=cifar10:/no/such/dir"], "pretrain.dataset.source: dataset path '/no/such/dir'"),
    (["pretrain=null", "init=/no/such/model.npz"], "init: checkpoint '/no/such/model.npz' does not exist"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD_SPECS, ids=[" ".join(o) for o, _ in BAD_SPECS])
def test_malformed_spec_is_refused_naming_the_field(overrides, names):
    from flows.presets import build_spec

    with pytest.raises(ValueError) as err:
        build_spec("demo", overrides).check_inputs()
    assert names in str(err.value)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["run", "nope"], "unknown preset 'nope'"),
        (["run", "demo", "--set", "pretrain.steps=-1"], "pretrain.steps"),
        (["run", "demo", "--set", "seed.x=1"], "seed is a value"),
        (["run", "demo", "--set", "pretrain.dataset.source=bogus:/x"], "pretrain.dataset.source"),
    ],
)
def test_vitflow_run_exits_2_before_any_work(args, names, tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.setenv("VITFLOW_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and names in result.output
    assert not (tmp_path / "artifacts").exists()  # nothing was prepared, trained or written


class WritesAFile:
    """A pickle payload: unpickling it would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_payload_in_a_checkpoint_is_never_executed(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    torch.save({"weight": torch.zeros(2), "payload": WritesAFile(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused: not a plain weights file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_pretrained(path)
    (tmp_path / "fake.safetensors").write_bytes(pickle.dumps(WritesAFile(str(marker))))  # a pickle in disguise
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "fake.safetensors")
    assert not marker.exists()


def test_malicious_cifar_batch_is_never_executed(tmp_path):
    from vit.data import DataError, prepare_dataset

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps(WritesAFile(str(marker))))
    with pytest.raises(DataError, match="refusing to load"):
        prepare_dataset(f"cifar10:{folder}", "c10", str(tmp_path / "artifacts"), progress=False)
    assert not marker.exists()


@pytest.fixture
def saved(tmp_path):
    model = create_model("vit_micro_4", num_classes=3, image_size=16, depth=2)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model)
    return path, model


def test_malformed_checkpoints_are_clear_errors(saved, tmp_path):
    path, model = saved
    data = path.read_bytes()
    cases = {
        "truncated.safetensors": (data[: len(data) // 2], "truncated"),
        "empty.safetensors": (b"", "header too small"),
        "huge-header.safetensors": (struct.pack("<Q", 1 << 60) + b"{}", "header too large"),
        "bad-json.safetensors": (struct.pack("<Q", 4) + b"{{{{", "invalid JSON in header"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    # wrong shapes: a head of 5 classes under a config of 3
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.zeros(5, sd["head.weight"].shape[1]), torch.zeros(5)
    save_checkpoint(tmp_path / "shapes.safetensors", sd, {"config": model.cfg.to_dict()})
    with pytest.raises(CheckpointError, match="num_classes 3 vs 5"):
        load_pretrained(tmp_path / "shapes.safetensors")
    # a forged config that would build an enormous model is refused before any model is built
    forged = {**model.cfg.to_dict(), "depth": 100_000, "hidden_size": 65_536}
    save_checkpoint(tmp_path / "forged.safetensors", model.state_dict(), {"config": forged})
    with pytest.raises(CheckpointError, match="does not match the tensors: hidden_size 65536 vs 64, depth 100000 vs 2"):
        load_pretrained(tmp_path / "forged.safetensors")
    # wrong shapes without metadata: the strict load names the key
    torch.save(sd, tmp_path / "shapes.pt")
    target = create_model("vit_micro_4", num_classes=3, image_size=16, depth=2)
    from vit.checkpoints import load_state_dict_strict

    with pytest.raises(CheckpointError, match=r"wrong shapes: \['head.weight: file \(5, 64\) vs model \(3, 64\)"):
        load_state_dict_strict(target, load_checkpoint(tmp_path / "shapes.pt")[0])
    # an .npz with object arrays would need pickle: refused
    np.savez(tmp_path / "objects.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_npz(tmp_path / "objects.npz")


def _forge_shard(ds_uri: str, shard: str, member: tarfile.TarInfo) -> None:
    """Rewrite the tar header in front of the first sample of ``shard`` with ``member``'s."""
    path = storage.local_path(storage.join(ds_uri, shard))
    manifest = pd.read_parquet(storage.local_path(storage.join(ds_uri, "manifest.parquet")))
    offset = int(manifest.loc[manifest["shard"] == shard, "offset"].min())
    data = bytearray(path.read_bytes())
    data[offset - 512 : offset] = member.tobuf(tarfile.USTAR_FORMAT)
    path.write_bytes(bytes(data))


def test_shards_with_traversal_absolute_names_or_links_are_refused(tmp_path):
    import shutil

    from vit.data import DataError, build_transform, open_dataset, prepare_dataset

    clean = prepare_dataset("synthetic-upstream:", "s", str(tmp_path / "clean"), progress=False, classes=2,
                            per_class=4, test_per_class=1, size=16)  # fmt: skip
    transform = build_transform("eval", 16)
    shard = pd.read_parquet(storage.join(clean, "manifest.parquet"))["shard"].iloc[0]
    size = int(pd.read_parquet(storage.join(clean, "manifest.parquet"))["size"].iloc[0])

    def member(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.linkname = (size if kind == tarfile.REGTYPE else 0), kind, "/etc/passwd"
        return info

    forged = {
        "traversal": member("../../etc/cron.d/x.png"),
        "absolute": member("/etc/x.png"),
        "symlink": member("x.png", tarfile.SYMTYPE),
        "hardlink": member("x.png", tarfile.LNKTYPE),
    }
    for case, info in forged.items():
        uri = str(tmp_path / case)
        shutil.copytree(clean, uri)
        _forge_shard(uri, shard, info)
        with pytest.raises(DataError, match="refused member"):
            open_dataset(uri).map_dataset("train", transform)
    # a manifest that names a file outside the dataset's shards/ folder
    uri = str(tmp_path / "manifest")
    shutil.copytree(clean, uri)
    manifest = pd.read_parquet(f"{uri}/manifest.parquet")
    manifest["shard"] = manifest["shard"].str.replace("shards/", "shards/../../../", regex=False)
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    storage.write_bytes(f"{uri}/manifest.parquet", buf.getvalue())
    with pytest.raises(DataError, match="outside shards/: refused"):
        open_dataset(uri).map_dataset("train", transform)
    assert (
        len(open_dataset(clean).map_dataset("train", transform))
        == json.loads(storage.read_text(f"{clean}/info.json"))["counts"]["train"]
    )
