"""BiT baselines: timm's parameter counts and logits, the official big_transfer .npz layout, the ViT contract."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch

import vit
from tests.helpers import images, randomize_
from vit.bit import ResNetV2
from vit.checkpoints import CheckpointError, convert_timm, load_npz, save_checkpoint
from vit.configs import BIT_VARIANTS
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
    features = model.forward_features(x)
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
            ours.forward_features(x),
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
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x))


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
