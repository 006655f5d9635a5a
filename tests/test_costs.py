"""The cost plan: FLOPs per image from the architecture against the published counts, and `vitflow run PRESET
--dry-run` printing every training stage with its steps, images, FLOPs and GPU-hours (no training)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from typer.testing import CliRunner

from flows.cli import app
from vit.configs import model_config
from vit.model import flops_per_image


@pytest.mark.parametrize(
    ("model", "size", "gmacs"),
    # forward GMACs as timm's model cards publish them (fvcore counts)
    [("vit_b_16", 224, 17.58), ("vit_b_16", 384, 55.5), ("vit_l_16", 224, 61.6), ("vit_l_16", 384, 191.2)],
)
def test_flops_per_image_match_the_published_counts(model, size, gmacs):
    cfg = dataclasses.replace(model_config(model), image_size=(size, size), num_classes=1000)
    forward = flops_per_image(cfg, training=False)
    assert forward / 2e9 == pytest.approx(gmacs, rel=0.005)  # 2 FLOPs per multiply-add
    assert flops_per_image(cfg) == 3 * forward  # training: forward + backward


def test_dry_run_prints_every_stage_with_its_cost_and_the_papers_figure(monkeypatch, tmp_path):
    monkeypatch.setenv("VITFLOW_DATA", str(tmp_path / "no-data-yet"))  # a plan is wanted before the data exists
    result = CliRunner().invoke(app, ["run", "paper-l16-i21k", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert '"experiment": "paper-l16-i21k"' in out  # the spec, then the plan
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("pretrain:", "finetune:"))}
    assert "36 training stages of vit_l_16, estimated at 45% MFU on H100 (989 TFLOP/s" in out
    # pre-training: 90 epochs of ImageNet-21k's 14,197,122 images at batch 4096; L/16 at 224 px is 61.6 GMACs
    # forward, so 3 x 2 x 61.6e9 FLOPs per image: 1.278e9 images x 369 GFLOP = 4.72e20 FLOP, at 45% of 989 TFLOP/s
    # 1.06e6 s = 294 H100-hours
    pretrain = rows["pretrain:vit_l_16"]
    assert pretrain[3] == f"{math.ceil(90 * 14_197_122 / 4096):,}"
    assert float(pretrain[-1].replace(",", "")) == pytest.approx(294, rel=0.01)
    # per benchmark: Table 4's sweep (4 learning rates) and a final run per seed (3), steps x batch 512 at 384 px
    for bench, steps in {
        "imagenet": 20_000,
        "cifar10": 10_000,
        "cifar100": 10_000,
        "pets": 500,
        "flowers102": 500,
    }.items():
        runs = [r for name, r in rows.items() if name.startswith(f"finetune:{bench}:")]
        assert len(runs) == 7 and all(r[3] == f"{steps:,}" for r in runs)
    assert "paper (Table 2): pre-training took 0.23k TPUv3-core-days" in out
    a100 = CliRunner().invoke(app, ["run", "paper-l16-i21k", "--dry-run", "--gpu", "A100", "--mfu", "0.3"])
    hours = float(
        next(line for line in a100.output.splitlines() if line.startswith("pretrain:")).split()[-1].replace(",", "")
    )
    assert hours == pytest.approx(294 * (989.4 / 312) * (0.45 / 0.3), rel=0.01)
    unknown = CliRunner().invoke(app, ["run", "paper-l16-i21k", "--dry-run", "--gpu", "TPU"])
    assert unknown.exit_code != 0 and "unknown GPU 'TPU'" in unknown.output
