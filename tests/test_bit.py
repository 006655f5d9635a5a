"""BiT baselines: timm's parameter counts and logits, the official big_transfer .npz layout, the ViT contract."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import vit
from tests.helpers import images, randomize_
from vit.bit import ResNetV2
from vit.checkpoints import CheckpointError, convert_timm, load_npz, save_checkpoint
from vit.configs import BIT_VARIANTS
from vit.data import open_dataset
from vit.engine.losses import mixup, mixup_loss
from vit.engine.optim import lr_at
from vit.engine.recipes import BIT_HYPERRULE, TABLE4, bit_hyperrule, default_finetune_recipe
from vit.engine.transfer import fewshot_on_dataset, finetune_with_sweep
from vit.model import flops_per_image

SIZE = 64
TIMM_NAMES = {name: "resnetv2_" + name.removeprefix("bit_r") + "_bit" for name in BIT_VARIANTS}


def timm_bit(name: str = "resnetv2_50x1_bit", num_classes: int = 10) -> torch.nn.Module:
    return randomize_(timm.create_model(name, pretrained=False, num_classes=num_classes)).eval()


@pytest.fixture(scope="module")
def timm_r50() -> torch.nn.Module:
    return timm_bit()


def big_transfer_npz(timm_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A timm BiT written in big_transfer's .npz naming (TF kernels HWIO, ``unitNN`` counted from 01)."""
    out: dict[str, np.ndarray] = {}
    for key, value in timm_model.state_dict().items():
        a = value.numpy()
        a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
        if key == "stem.conv.weight":
            out["resnet/root_block/standardized_conv2d/kernel"] = a
        elif key.startswith("norm."):
            out[f"resnet/group_norm/{'gamma' if key.endswith('weight') else 'beta'}"] = a
        elif key.startswith("head.fc."):
            out[f"resnet/head/conv2d/{'kernel' if key.endswith('weight') else 'bias'}"] = a
        else:
            s, u, rest = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key).groups()
            unit = f"resnet/block{int(s) + 1}/unit{int(u) + 1:02d}"
            if rest == "downsample.conv.weight":
                out[f"{unit}/a/proj/standardized_conv2d/kernel"] = a
            else:
                kind, n, param = re.match(r"(conv|norm)([123])\.(weight|bias)", rest).groups()
                part = "abc"[int(n) - 1]
                leaf = (
                    "standardized_conv2d/kernel"
                    if kind == "conv"
                    else f"group_norm/{'gamma' if param == 'weight' else 'beta'}"
                )
                out[f"{unit}/{part}/{leaf}"] = a
    return out


@pytest.mark.parametrize("name", BIT_VARIANTS)
def test_every_bit_variant_has_timms_parameter_count(name):
    with torch.device("meta"):
        ours = vit.count_parameters(vit.create_model(name, num_classes=1000))
        theirs = vit.count_parameters(timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000))
    assert ours == theirs
    if name == "bit_r50x1":
        assert ours == 25_549_352


def test_bit_model_offers_the_vit_contract():
    model = vit.create_model("bit_micro", num_classes=7, image_size=32).eval()
    x = images(3, 32)
    assert model(x).shape == (3, 7)
    features = model.forward_pre_logits(x)
    assert features.shape == (3, model.cfg.num_features) == (3, 512)
    assert bool((features >= 0).all())  # pooled after the final GroupNorm + ReLU
    model.reset_classifier(4)
    assert torch.count_nonzero(model.head.weight) == 0 and model(x).abs().max() == 0
    model.set_image_size(48)
    assert model.cfg.image_size == (48, 48) and model(images(1, 48)).shape == (1, 4)


def test_bit_ignores_vit_only_options_but_refuses_a_pre_logits_layer():
    model = vit.create_model("bit_micro", num_classes=3, image_size=32, pooling="token", gelu_approximate="none")
    assert isinstance(model, ResNetV2)
    with pytest.raises(ValueError, match="representation_size"):
        vit.create_model("bit_micro", representation_size=64)


def test_official_big_transfer_npz_gives_timms_logits(tmp_path, timm_r50):
    theirs = timm_r50
    path = tmp_path / "BiT-M-R50x1.npz"
    np.savez(path, **big_transfer_npz(theirs))
    ours = vit.load_pretrained(path, image_size=SIZE).eval()
    assert isinstance(ours, ResNetV2) and ours.cfg.layers == (3, 4, 6, 3) and ours.cfg.num_classes == 10
    x = images(2, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            ours.forward_pre_logits(x),
            theirs.forward_head(theirs.forward_features(x), pre_logits=True),
            atol=1e-4,
            rtol=0,
        )


def test_timm_bit_state_dict_converts_and_loads_from_a_file(tmp_path, timm_r50):
    theirs = timm_r50
    model = vit.create_model("bit_r50x1", num_classes=10, image_size=SIZE).eval()
    model.load_state_dict(convert_timm(theirs.state_dict()))
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    loaded = vit.load_pretrained(tmp_path / "timm.pth").eval()
    x = images(2, SIZE)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=0)


def test_vitflow_checkpoint_of_a_bit_round_trips_with_its_config(tmp_path):
    model = randomize_(vit.create_model("bit_micro", num_classes=6, image_size=40)).eval()
    save_checkpoint(tmp_path / "bit.safetensors", model, {"step": 3})
    loaded = vit.load_pretrained(tmp_path / "bit.safetensors", num_classes=2, dropout=0.0).eval()
    assert loaded.cfg.base_width == 32 and loaded.cfg.image_size == (40, 40) and loaded.cfg.num_classes == 2
    x = images(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_pre_logits(x), model.forward_pre_logits(x))


def test_bit_npz_with_a_foreign_key_is_refused(tmp_path, timm_r50):
    arrays = big_transfer_npz(timm_r50)
    arrays["resnet/block1/unit01/a/extra/kernel"] = np.zeros(1, np.float32)
    np.savez(tmp_path / "odd.npz", **arrays)
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_npz(tmp_path / "odd.npz")


def test_bit_flops_count_every_convolution():
    with torch.device("meta"):
        model = vit.create_model("bit_r50x1", num_classes=1000, image_size=224)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 3 * 16 + 4
    gmacs = flops_per_image(model.cfg, training=False) / 2 / 1e9
    assert 4.0 < gmacs < 4.2  # timm lists 4.3 GMACs for resnetv2_50x1_bit, GroupNorms included


# --------------------------------------------------------------------------------------------------------------
# BiT-HyperRule, MixUp, training and few-shot through the engine


@pytest.mark.parametrize(
    ("count", "hw", "steps", "warmup", "crop", "alpha"),
    [
        (3_680, (224, 224), 500, 100, 384, 0.0),  # Pets: small set, large images
        (50_000, (32, 32), 10_000, 500, 128, 0.1),  # CIFAR: < 500k, images below 96x96
        (1_281_167, (224, 224), 20_000, 500, 384, 0.1),  # ImageNet
    ],
)
def test_bit_hyperrule_picks_steps_resolution_and_mixup_by_dataset_size(count, hw, steps, warmup, crop, alpha):
    recipe = bit_hyperrule(count, hw)
    assert (recipe.steps, recipe.warmup_steps, recipe.image_size, recipe.mixup_alpha) == (steps, warmup, crop, alpha)
    assert recipe.lrs == (0.003,) and recipe.batch_size == 512
    cfg = recipe.train_config("init.npz", "file:///data", 0.003, "train", None, None, seed=3)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.decay, cfg.optim.grad_clip) == ("sgd", 0.9, "step", None)
    assert cfg.optim.weight_decay == 0.0 and cfg.mixup_alpha == alpha and cfg.seed == 3


def test_bit_step_schedule_matches_big_transfers_supports():
    """big_transfer's bit_hyperrule.get_lr: linear warmup to the first support, then /10 past each later one."""

    def official(step: int, supports: list[int], base: float = 0.003) -> float:
        if step < supports[0]:
            return base * step / supports[0]
        return base / 10 ** sum(s < step for s in supports[1:-1])

    for count in (1_000, 50_000):
        recipe = bit_hyperrule(count, (32, 32))
        total, warmup = recipe.steps, recipe.warmup_steps
        supports = [warmup, *(round(f * total) for f in recipe.decay_at), total]
        assert supports in ([100, 200, 300, 400, 500], [500, 3000, 6000, 9000, 10_000])
        for step in range(1, total):
            ours = lr_at(step, 0.003, total, warmup, "step", 0.0, recipe.decay_at)
            assert ours == pytest.approx(official(step, supports), rel=1e-9)


def test_default_recipe_is_the_hyperrule_for_bit_and_table4_for_vit():
    assert default_finetune_recipe("cifar10", bit=True) is BIT_HYPERRULE["cifar10"]
    assert default_finetune_recipe("cifar10") is TABLE4["cifar10"]
    with pytest.raises(ValueError, match="unknown protocol"):
        default_finetune_recipe("mnist", bit=True)


def test_mixup_blends_each_image_with_a_partner_and_their_labels():
    x, y = images(6, 8), torch.arange(6)
    torch.manual_seed(5)
    mixed, partners, lam = mixup(x, y, 0.1)
    order = torch.tensor([int(p) for p in partners])
    assert 0.0 <= lam <= 1.0 and sorted(order.tolist()) == list(range(6))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[order])
    model = vit.create_model("bit_micro", num_classes=6, image_size=8)
    randomize_(model)
    torch.manual_seed(5)
    loss = mixup_loss("softmax", model, x, y, 0.1, 0.0)
    logits = model(mixed)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, order)
    torch.testing.assert_close(loss, expected)


@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory) -> str:
    from vit.data import prepare_dataset

    root = str(tmp_path_factory.mktemp("bitdata"))
    return prepare_dataset("synthetic-vtab:natural_fine,test=64", "fine", root, progress=False)


def test_bit_fine_tunes_with_the_hyperrule_and_mixup_and_few_shots_on_pooled_features(vtab_task, tmp_path):
    init = tmp_path / "bit.safetensors"
    save_checkpoint(init, vit.create_model("bit_micro", num_classes=0, image_size=32))
    recipe = replace(BIT_HYPERRULE["vtab"], image_size=32)
    result = finetune_with_sweep(
        recipe, str(init), vtab_task, str(tmp_path / "out"), steps=4, batch_size=16, mixup_alpha=0.1
    )
    assert result.test["count"] == 64 and 0 <= result.test["top1"] <= 1
    trained = vit.load_pretrained(result.model_uri)
    assert isinstance(trained, ResNetV2) and trained.cfg.num_classes == open_dataset(vtab_task).num_classes
    shots = fewshot_on_dataset(trained.eval(), vtab_task, "train800val200", "test", shots=[2], seeds=[0])
    assert len(shots) == 1 and 0 <= shots["accuracy"].iloc[0] <= 1


# --------------------------------------------------------------------------------------------------------------
# The bit-vs-vit preset and the side-by-side report


def test_bit_vs_vit_preset_trains_matched_models_on_the_same_data_each_with_its_protocol():
    from flows import plan
    from flows.scaling_presets import BIT_VS_VIT_MODELS, build_scaling_spec

    study = build_scaling_spec("bit-vs-vit")
    assert tuple(study.models) == BIT_VS_VIT_MODELS and study.upstream_sizes == ["full"] and study.finetune
    specs = [study.arm_spec(name, None, study.base.pretrain.steps) for name in BIT_VS_VIT_MODELS]
    assert [s.model.name for s in specs] == list(BIT_VS_VIT_MODELS)
    assert specs[0].pretrain.model_copy(update={"registered_model": None}) == specs[1].pretrain.model_copy(
        update={"registered_model": None}
    )
    assert specs[0].transfer == specs[1].transfer and all(
        b.finetune and b.fewshot for b in specs[0].transfer.benchmarks
    )
    flops = [
        flops_per_image(vit.model_config(n, image_size=32, num_classes=100), training=False) for n in BIT_VS_VIT_MODELS
    ]
    assert abs(flops[0] / flops[1] - 1) < 0.05
    bench = specs[0].transfer.benchmarks[0]
    vit_cfg, _, _ = plan.finetune_config(specs[0], bench, "file:///d", "file:///i.safetensors", 0.01, 0, True)
    bit_cfg, _, _ = plan.finetune_config(specs[1], bench, "file:///d", "file:///i.safetensors", 0.003, 0, True)
    assert (vit_cfg.optim.decay, bit_cfg.optim.decay) == ("cosine", "step")
    assert plan.finetune_recipe(specs[1], bench).lrs == (0.003,)
    with_pre_logits = specs[1].model_copy(
        update={"pretrain": specs[1].pretrain.model_copy(update={"pre_logits": True})}
    )
    pretrain_cfg, _ = plan.pretrain_config(with_pre_logits, "file:///up")
    assert pretrain_cfg.model.name == "bit_micro" and pretrain_cfg.model.representation_size is None


def test_paper_numbers_of_bit_l_find_a_bit_r152x4_result():
    from tasks.results import paper_table, results_frame

    row = {"run": "r", "model": "bit_r152x4", "pretrain": "JFT-300M", "benchmark": "cifar10", "split": "test"}
    table = paper_table(results_frame([{**row, "metric": "top1", "value": 99.0}]))
    assert table.loc["CIFAR-10"].tolist() == ["99.00", "99.37 ± 0.06 (T2)", "-0.37"]


def test_report_of_a_vit_run_and_a_bit_run_puts_them_side_by_side(tmp_path):
    from mlflow import MlflowClient

    from tasks.reports import rebuild_report
    from tasks.results import results_frame, write_results

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bit-vs-vit", artifact_location=str(tmp_path / "mlruns"))
    run_ids = []
    for model, value in (("vit_micro_4", 61.0), ("bit_micro", 57.5)):
        run = client.create_run(experiment, run_name=f"benchmark:{model}").info.run_id
        rows = [
            {"run": run, "model": model, "pretrain": "synthetic-upstream", "benchmark": "synth/natural_fine"}
            | {"split": "test", "metric": "top1", "value": value + seed, "seed": seed}
            for seed in (0, 1)
        ]
        paths = write_results(results_frame(rows), tmp_path / run)
        client.set_tag(run, "vitflow.results_uri", str(paths["parquet"]))
        run_ids.append(run)
    paths = rebuild_report(uri, run_ids, tmp_path / "report")
    markdown = paths["markdown"].read_text()
    header = next(line for line in markdown.splitlines() if "ViT-micro/4" in line and "BiT-micro" in line)
    assert header.index("ViT-micro/4 (synthetic-upstream)") < header.index("BiT-micro (synthetic-upstream)")
    assert "61.50 ± 0.71" in markdown and "58.00 ± 0.71" in markdown
    assert f"| MLflow run | {run_ids[0]}, {run_ids[1]} |" in markdown and "| experiment | bit-vs-vit |" in markdown
    assert f"| artifacts | {tmp_path / run_ids[0]}, {tmp_path / run_ids[1]} |" in markdown
    assert "](http" not in markdown and "href=" not in paths["html"].read_text()  # SQLite: no MLflow UI to link to
