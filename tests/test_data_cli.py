"""``vitflow data prepare`` / ``vitflow data info``: output, exit codes, defaults, help."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.test_data_formats import write_cifar10, write_imagefolder
from vit.data import open_dataset

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_help_reads_like_a_manual():
    top = invoke("--help")
    assert top.exit_code == 0 and "data" in top.output and "VITFLOW_ARTIFACT_ROOT" in top.output
    help_text = invoke("data", "prepare", "--help").output
    for fragment in ("imagenet:/data/ilsvrc", "cifar10:", "fashion-mnist:", "vtab:", "list:", "synthetic-vtab:"):
        assert fragment in help_text
    assert "--max-corrupt-fraction" in help_text and "--download" in help_text and "Examples" in help_text


def test_prepare_prints_the_uri_and_info_shows_the_counts(tmp_path):
    folder = write_cifar10(tmp_path / "data", per_batch=6)
    root = tmp_path / "store"
    result = invoke("data", "prepare", f"cifar10:{folder}", "--name", "c10", "--artifact-root", str(root))
    assert result.exit_code == 0, result.output
    uri = result.stdout.strip().splitlines()[-1]
    assert uri.startswith(f"{root}/datasets/c10/") and open_dataset(uri).count("test") == 6
    assert "prepared c10 (cifar10)" in result.stderr and "quarantined: 0" in result.stderr
    info = invoke("data", "info", uri)
    assert info.exit_code == 0
    assert "airplane" in info.output and "minival" in info.output and "30" in info.output
    assert '"fingerprint"' in invoke("data", "info", uri, "--json").output


def test_default_artifact_root_and_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VITFLOW_ARTIFACT_ROOT", raising=False)
    src = "synthetic-vtab:specialized_gratings"
    args = ("data", "prepare", src, "--name", "g", "-o", "test=10", "-o", "max_train800=16", "-o", "max_val200=8")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    home = Path(str(tmp_path / "vitflow-home"))  # VITFLOW_HOME from the test fixture
    assert result.stdout.strip().startswith(f"{home}/artifacts/datasets/g/")
    monkeypatch.setenv("VITFLOW_ARTIFACT_ROOT", str(tmp_path / "elsewhere"))
    assert invoke(*args).stdout.strip().startswith(f"{tmp_path}/elsewhere/datasets/g/")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nowhere:/x",), "unknown source format"),
        (("imagefolder:/does/not/exist",), "does not exist"),
        (("synthetic-vtab:structured_count", "-o", "broken"), "bad --option 'broken': not path.to.field=value"),
        (("synthetic-vtab:structured_count", "-o", "test=lots"), "option test='lots' is not an integer"),
        (("imagefolder:/tmp", "--download"), "--download supports cifar10"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    result = invoke("data", "prepare", *args, "--name", "x", "--artifact-root", str(tmp_path))
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_corrupt_share_exceeded_exits_1_naming_share_and_list(tmp_path):
    src = write_imagefolder(tmp_path / "src", per_class=2, splits=("train",))
    (src / "train" / "cat" / "zero.jpg").write_bytes(b"")
    result = invoke("data", "prepare", f"imagefolder:{src}", "--name", "x", "--artifact-root", str(tmp_path / "a"))
    assert result.exit_code == 1
    assert "1 of 7 samples (14.29%)" in result.stderr and "quarantine.csv" in result.stderr
    ok = invoke(
        "data", "prepare", f"imagefolder:{src}", "--name", "x", "--artifact-root", str(tmp_path / "a"),
        "--max-corrupt-fraction", "0.2",
    )  # fmt: skip
    assert ok.exit_code == 0 and "quarantined: 1" in ok.stderr


def test_info_of_a_missing_dataset_exits_2(tmp_path):
    result = invoke("data", "info", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "no prepared dataset" in result.stderr
