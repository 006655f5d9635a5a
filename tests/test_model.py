"""The model: exact parameter counts, architecture details, resizing, attention maps, compile and autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

import vit
from tests.helpers import images, randomize_
from vit.configs import PAPER_VARIANTS
from vit.model import count_parameters, create_model, flops_per_image, resample_pos_embed

# vision_transformer/vit_jax/models_test.py: 224 px, 1000-way head, no pre-logits (paper-facts §1.2).
OFFICIAL_PARAMS = {
    "vit_ti_16": 5_717_416,
    "vit_s_16": 22_050_664,
    "vit_s_32": 22_878_952,
    "vit_b_16": 86_567_656,
    "vit_b_32": 88_224_232,
    "vit_b_8": 86_576_872,
    "vit_l_16": 304_326_632,
    "vit_l_32": 306_535_400,
    "vit_h_14": 632_045_800,
    "r50_vit_b_16": 98_659_112,
    "r50_vit_l_32": 328_994_856,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000, image_size=224)
    assert count_parameters(model) == OFFICIAL_PARAMS[name]


def test_every_paper_variant_is_registered_and_counted():
    assert set(PAPER_VARIANTS) == set(OFFICIAL_PARAMS)
    assert set(OFFICIAL_PARAMS) <= set(vit.list_models())


def test_gap_and_representation_counts():
    with torch.device("meta"):
        gap = create_model("vit_b_16", pooling="gap")
        i21k = create_model("vit_b_16", num_classes=21843, representation_size=768)
    assert count_parameters(gap) == 86_566_120  # ViT-B_16-gap-norep
    assert count_parameters(i21k) == 103_186_515  # paper-facts §1.2, DERIVED


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("ViT-B/16", "vit_b_16"),
        ("R50+ViT-B/16", "r50_vit_b_16"),
        ("ViT-B_16", "vit_b_16"),
        ("vit-h/14", "vit_h_14"),
        ("R50+ViT-L/32", "r50_vit_l_32"),
    ],
)
def test_paper_names_are_aliases(alias, key):
    assert vit.resolve_model_name(alias) == key
    assert (
        vit.create_model(alias, image_size=32, num_classes=3, depth=1).cfg
        == vit.create_model(key, image_size=32, num_classes=3, depth=1).cfg
    )


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'vit_q_99'.*vit_b_16"):
        create_model("vit_q_99")


def test_official_initialisation():
    model = create_model("vit_s_16", image_size=64, num_classes=10)
    assert torch.count_nonzero(model.cls_token) == 0
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    block = model.blocks[0]
    assert block.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)) per (D, D) kernel
    bound = math.sqrt(6 / (384 + 384))
    assert block.attn.qkv.weight.abs().max().item() <= bound
    assert block.attn.qkv.weight.abs().max().item() > 0.9 * bound
    assert torch.count_nonzero(block.attn.qkv.bias) == 0
    assert block.mlp.fc1.bias.abs().max().item() < 1e-5  # normal(1e-6)
    # lecun normal on the patch embedding: std ~ sqrt(1 / fan_in), fan_in = 16 * 16 * 3
    assert model.patch_embed.proj.weight.std().item() == pytest.approx(math.sqrt(1 / 768), rel=0.1)


def test_head_bias_init_and_pre_logits_tanh():
    model = create_model("vit_micro_4", image_size=32, num_classes=7, representation_size=64, head_bias_init=-10.0)
    assert torch.all(model.head.bias == -10.0)
    feats = model.eval().forward_pre_logits(images(3, 32))
    assert feats.shape == (3, 64)
    assert feats.abs().max() <= 1.0  # tanh
    assert torch.allclose(model(images(3, 32)), torch.full((3, 7), -10.0))  # zero kernel + bias


def test_forward_shapes_token_and_gap():
    for pooling in ("token", "gap"):
        model = create_model("vit_micro_4", image_size=32, num_classes=5, pooling=pooling).eval()
        assert model(images(2, 32)).shape == (2, 5)
        assert model.forward_pre_logits(images(2, 32)).shape == (2, 64)
        assert model.pos_embed.shape[1] == 64 + (pooling == "token")


def test_valid_patching_drops_leftover_pixels():
    small = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3)).eval()
    large = create_model("vit_micro_4", image_size=35, num_classes=3).eval()
    large.load_state_dict(small.state_dict())
    x = images(2, 35)
    assert large.grid_size == (8, 8)
    torch.testing.assert_close(large(x), small(x[..., :32, :32]))


def test_gelu_variants_differ_and_match_torch():
    tanh = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3, gelu_approximate="tanh")).eval()
    erf = create_model("vit_micro_4", image_size=32, num_classes=3, gelu_approximate="none").eval()
    erf.load_state_dict(tanh.state_dict())
    x = images(2, 32)
    assert not torch.allclose(tanh(x), erf(x))
    assert tanh.blocks[0].mlp.act.approximate == "tanh" and erf.blocks[0].mlp.act.approximate == "none"


def test_dropout_active_only_in_training():
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3, dropout=0.1))
    x = images(2, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    # dropout after the position add and after every dense layer except q/k/v
    drops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert drops[0] == "pos_drop"
    assert {n.split(".")[-1] for n in drops[1:]} == {"proj_drop", "drop1", "drop2"}


def test_hybrid_forward_and_grid():
    model = create_model("r50_vit_b_16", image_size=64, num_classes=4, depth=2).eval()
    assert model.grid_size == (4, 4)
    assert model(images(2, 64)).shape == (2, 4)
    assert model.patch_embed.backbone.stages[0][0].gn3.weight.abs().sum() == 0  # zero-init last GN scale
    l32 = create_model("r50_vit_l_32", image_size=64, num_classes=4, depth=1)
    assert l32.grid_size == (2, 2) and l32.patch_embed.backbone.out_channels == 2048


@pytest.mark.parametrize(("old", "new"), [((14, 14), (24, 24)), ((7, 7), (12, 12)), ((4, 6), (7, 5))])
def test_posemb_resample_equals_scipy_zoom(old, new):
    dim = 8
    pos = torch.randn(1, 1 + old[0] * old[1], dim, dtype=torch.float64)
    ours = resample_pos_embed(pos, old, new)
    grid = pos[0, 1:].numpy().reshape(old[0], old[1], dim)
    ref = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert ref.shape[:2] == new
    np.testing.assert_allclose(ours[0, 1:].numpy().reshape(*new, dim), ref, atol=1e-10)
    torch.testing.assert_close(ours[:, :1], pos[:, :1])  # class-token entry kept


def test_set_image_size_resamples_and_runs():
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3)).eval()
    before = model.pos_embed.detach().clone()
    model.set_image_size((48, 40))
    assert model.grid_size == (12, 10) and model.pos_embed.shape == (1, 121, 64)
    torch.testing.assert_close(model.pos_embed[:, 0], before[:, 0])
    assert model(images(2, (48, 40))).shape == (2, 3)
    with pytest.raises(ValueError, match="call set_image_size"):
        model(images(1, 32))


@pytest.mark.parametrize("size", [2, 0, -5, (32, 0)])
def test_bad_image_sizes_are_clear_errors(size):
    model = create_model("vit_micro_4", image_size=32, num_classes=3)
    with pytest.raises(ValueError, match="image size"):
        model.set_image_size(size)


def test_reset_classifier_drops_pre_logits_with_zero_head():
    model = create_model("vit_micro_4", image_size=32, num_classes=100, representation_size=64, head_bias_init=-10)
    model.reset_classifier(5)
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.weight.shape == (5, 64) and torch.count_nonzero(model.head.weight) == 0
    assert torch.count_nonzero(model.head.bias) == 0
    assert model.cfg.num_classes == 5 and model.cfg.representation_size is None


def test_attention_maps_match_the_fast_path():
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3)).eval()
    x = images(2, 32)
    maps = model.attention_maps(x)
    assert len(maps) == 4 and maps[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 65))
    # the explicit-softmax path computes the same tokens as scaled_dot_product_attention
    tokens = model._prepare_tokens(model.embed_patches(x))
    for block in model.blocks:
        slow, _ = block.forward_with_weights(tokens)
        torch.testing.assert_close(slow, block(tokens), atol=1e-5, rtol=1e-5)
        tokens = slow


def test_gradient_checkpointing_gives_identical_gradients():
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3)).train()
    x = images(4, 32)

    def grads(enable: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_forward_and_backward():
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3))
    x = images(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.float(), model(x), atol=0.1, rtol=0.05)


def test_compiled_forward_equals_eager():
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3)).eval()
    x = images(2, 32)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_flops_per_image_b16():
    cfg = vit.model_config("vit_b_16")
    # 17.58 GMACs forward for ViT-B/16 at 224 (stack-notes), i.e. ~35.2 GFLOPs; training = 3x forward
    assert flops_per_image(cfg, training=False) / 2 == pytest.approx(17.58e9, rel=0.01)
    assert flops_per_image(cfg) == pytest.approx(3 * flops_per_image(cfg, training=False))
