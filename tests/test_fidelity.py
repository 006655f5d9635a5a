"""The training and evaluation protocol against the official code's behaviour.

Each reference below is written in this file from the official code's documented semantics, in numpy (no
TensorFlow or JAX): TF's ``sample_distorted_bounding_box`` kernel (sample_distorted_bounding_box_op.cc), its
``tf.image.resize`` bilinear (half-pixel centres, no antialiasing, float output), vit_jax's fine-tuning input
pipeline and learning-rate schedule, big_vision's few-shot preprocessing, weight-decay mask and checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flows import plan
from flows.presets import build_spec
from vit.checkpoints import CheckpointError, export_npz, load_npz, load_pretrained, save_checkpoint
from vit.data import build_transform
from vit.engine.config import OptimConfig, TrainConfig
from vit.engine.distributed import DistInfo
from vit.engine.losses import classification_loss
from vit.engine.memory import InMemoryBatches
from vit.engine.optim import build_optimizer
from vit.engine.recipes import TABLE4
from vit.engine.trainer import Trainer
from vit.model import create_model

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ATTEMPTS = 100


# --------------------------------------------------------------------------------------------------------------
# References


def tf_random_crop(height: int, width: int, aspect: np.float32, u_height: float, u_top: float, u_left: float):
    """One GenerateRandomCrop of TF's kernel in float32 (area 0.05-1), with ``Uniform(n)`` = floor(u * n)."""
    f = np.float32
    min_area, max_area = f(0.05) * f(width) * f(height), f(1.0) * f(width) * f(height)
    h = int(np.rint(np.sqrt(min_area / aspect)))
    max_h = int(np.rint(np.sqrt(max_area / aspect)))
    if np.rint(f(max_h) * aspect) > width:
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if np.rint(f(max_h) * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    if h >= max_h:
        h = max_h
    if h < max_h:
        h += int(u_height * (max_h - h + 1))
    w = int(np.rint(f(h) * aspect))
    area = f(w * h)
    if area < min_area:
        h += 1
        w = int(np.rint(f(h) * aspect))
        area = f(w * h)
    if area > max_area:
        h -= 1
        w = int(np.rint(f(h) * aspect))
        area = f(w * h)
    if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
        return None
    top = int(u_top * (height - h)) if h < height else 0
    left = int(u_left * (width - w)) if w < width else 0
    return top, left, h, w


def tf_sample_distorted_bounding_box(height: int, width: int, draws) -> tuple[int, int, int, int]:
    """The op with vit_jax's arguments: no boxes (the whole image is the box), min_object_covered 0, aspect ratio
    uniform in (3/4, 4/3), area (0.05, 1), max_attempts 100; the whole image when every attempt fails."""
    lo, hi = np.float32(3 / 4), np.float32(4 / 3)
    for u_aspect, u_height, u_top, u_left in draws[:ATTEMPTS]:
        aspect = np.float32(u_aspect) * (hi - lo) + lo
        box = tf_random_crop(height, width, aspect, u_height, u_top, u_left)
        if box is not None and box[2] * box[3] >= 1:  # SatisfiesOverlapConstraints with min_object_covered 0
            return box
    return 0, 0, height, width


def tf_resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``tf.image.resize(image, (out_h, out_w))`` (bilinear, antialias False, half-pixel centres) on HWC, float."""

    def axis(in_size: int, out_size: int):
        src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        floor = np.floor(src)
        lower = np.maximum(floor, 0).astype(int)
        upper = np.minimum(np.ceil(src), in_size - 1).astype(int)
        return lower, upper, (src - floor).astype(np.float32)

    x = image.astype(np.float32)
    (ly, uy, fy), (lx, ux, fx) = axis(x.shape[0], out_h), axis(x.shape[1], out_w)
    top = x[ly][:, lx] + (x[ly][:, ux] - x[ly][:, lx]) * fx[None, :, None]
    bottom = x[uy][:, lx] + (x[uy][:, ux] - x[uy][:, lx]) * fx[None, :, None]
    return top + (bottom - top) * fy[:, None, None]


def value_range(x: np.ndarray) -> torch.Tensor:
    """HWC float in [0, 255] -> CHW in [-1, 1], the official ``(im - 127.5) / 127.5``."""
    return torch.from_numpy((x - 127.5) / 127.5).permute(2, 0, 1).float()


def optax_schedule(count: int, base: float, total: int, warmup: int) -> float:
    """vit_jax's create_learning_rate_schedule (cosine) evaluated, as optax does, at the update count."""
    progress = min(max((count - warmup) / (total - warmup), 0.0), 1.0)
    return base * 0.5 * (1 + math.cos(math.pi * progress)) * min(1.0, count / warmup)


def natural_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 CHW with smooth structure and fine detail, so resize numerics show."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = 127 + 100 * np.sin(xs / 7.0 + seed)[..., None] * np.cos(ys / 11.0)[..., None]
    img = smooth + rng.normal(0, 30, (height, width, 3))
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------------------------
# 5. The Inception-crop sampler is TF's


@pytest.mark.parametrize(("height", "width"), [(375, 500), (300, 1000), (1000, 300), (32, 32), (7, 5), (1, 40)])
def test_inception_crop_box_is_tfs_sample_distorted_bounding_box(height, width):
    tf = build_transform("finetune", 24)
    for seed in range(200):
        torch.manual_seed(seed)
        draws = torch.rand(ATTEMPTS, 4).tolist()
        torch.manual_seed(seed)
        assert tf.plan(width, height).box == tf_sample_distorted_bounding_box(height, width, draws), seed


def test_inception_crop_statistics_are_tfs():
    """TF's sampler never falls back on 300x1000 (it caps the height instead), and on 375x500 its crops are
    smaller than a log-uniform-aspect, area-uniform sampler's (median area 0.30 vs 0.41)."""
    tf = build_transform("pretrain", 24)
    torch.manual_seed(0)
    wide = [tf.plan(1000, 300).box for _ in range(2000)]
    assert sum(box == (0, 0, 300, 1000) for box in wide) == 0
    torch.manual_seed(1)
    areas = [h * w / (375 * 500) for _, _, h, w in (tf.plan(500, 375).box for _ in range(2000))]
    rng = np.random.default_rng(0)
    reference = [
        h * w / (375 * 500)
        for _, _, h, w in (tf_sample_distorted_bounding_box(375, 500, rng.random((ATTEMPTS, 4))) for _ in range(2000))
    ]
    assert abs(np.median(areas) - np.median(reference)) < 0.03
    assert 0.26 < np.median(areas) < 0.34


# --------------------------------------------------------------------------------------------------------------
# 1. and 3. Fine-tune crop and resize numerics follow vit_jax's input pipeline


def test_finetune_trains_on_the_inception_crop_resized_and_flipped():
    """vit_jax's train pipeline: crop the sampled box, tf.image.resize to the resolution, random flip, (x-127.5)/
    127.5 — computed here step by step with the same random draws."""
    image, size = natural_image(90, 120), 24
    tf = build_transform("finetune", size)
    flipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        draws, u_flip = torch.rand(ATTEMPTS, 4).tolist(), float(torch.rand(()))
        top, left, h, w = tf_sample_distorted_bounding_box(90, 120, draws)
        expected = value_range(tf_resize_bilinear(hwc(image)[top : top + h, left : left + w], size, size))
        if u_flip < 0.5:
            expected, flipped = expected.flip(-1), flipped + 1
        torch.manual_seed(seed)
        torch.testing.assert_close(tf(image), expected, atol=2e-5, rtol=0)
    assert 0 < flipped < 20


@pytest.mark.parametrize("kind", ["eval", "vtab"])
@pytest.mark.parametrize(("height", "width", "size"), [(90, 120, 24), (20, 30, 64), (48, 17, (20, 40))])
def test_eval_resize_is_tf_image_resize_in_float(kind, height, width, size):
    image = natural_image(height, width, seed=height)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    expected = value_range(tf_resize_bilinear(hwc(image), out_h, out_w))
    torch.testing.assert_close(build_transform(kind, size)(image), expected, atol=2e-5, rtol=0)


def test_antialiased_resize_stays_an_option_and_differs_from_the_official():
    image = natural_image(300, 400)
    expected = value_range(tf_resize_bilinear(hwc(image), 32, 32))
    official = build_transform("eval", 32)(image)
    smoothed = build_transform("eval", 32, resize="antialias")(image)
    assert (official - expected).abs().max() < 2e-5
    assert (smoothed - expected).abs().mean() > 0.05  # antialiasing averages away the detail TF samples
    assert build_transform("eval", 32).plan(400, 300).scale == 1.0  # decoded at full size, as TF does
    assert build_transform("eval", 32, resize="antialias").plan(400, 300).scale < 0.5


# --------------------------------------------------------------------------------------------------------------
# 4. Few-shot preprocessing is big_vision's


@pytest.mark.parametrize(("size", "resized"), [(224, 256), (32, 37), (384, 439)])
def test_fewshot_resizes_then_centre_crops_as_big_vision(size, resized):
    image = natural_image(300, 200)
    offset = (resized - size) // 2
    full = tf_resize_bilinear(hwc(image), resized, resized)
    expected = value_range(full[offset : offset + size, offset : offset + size])
    torch.testing.assert_close(build_transform("fewshot", size)(image), expected, atol=2e-5, rtol=0)


def test_fewshot_evaluation_uses_the_fewshot_preprocessing(tmp_path):
    from vit.data import prepare_dataset
    from vit.engine.transfer import fewshot_on_dataset

    uri = prepare_dataset("synthetic-vtab:natural_fine,test=40", "fine", str(tmp_path), progress=False)
    torch.manual_seed(0)
    model = create_model("vit_micro_4", image_size=32, num_classes=0, depth=1).eval()
    default = fewshot_on_dataset(model, uri, "test", "test", shots=[1], seeds=[0], batch_size=64)
    explicit = fewshot_on_dataset(model, uri, "test", "test", shots=[1], seeds=[0], batch_size=64, transform="fewshot")
    assert default["accuracy"].tolist() == explicit["accuracy"].tolist()


def test_fewshot_stage_without_a_resolution_keeps_the_checkpoints_own(tmp_path):
    """Without a pre-training stage the few-shot stage gets no resolution and evaluates the checkpoint at the
    resolution it was trained at (big_vision's few-shot runs at the pre-training resolution), not at 384."""
    from tasks.common import TrackingContext
    from tasks.fewshot import _evaluate
    from tasks.prepare import dataset_ref
    from tasks.stages import FewshotStage
    from vit.data import prepare_dataset

    uri = prepare_dataset("synthetic-vtab:natural_fine,test=20", "fine", str(tmp_path), progress=False)
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(path, create_model("vit_micro_4", image_size=16, num_classes=0, depth=1))
    stage = FewshotStage(
        uri=str(tmp_path / "stage"),
        benchmark="fine",
        model_label="pretrained",
        model_uri=path,
        dataset=dataset_ref(uri),
        train_split="train800val200",
        test_split="test",
        shots=[1],
        seeds=[0],
        l2=1024.0,
        image_size=None,
        tracking=TrackingContext("sqlite:///unused.db", "0", None, {}),
    )
    assert set(_evaluate(stage).mean) == {"1"}
    spec = build_spec("demo", ["pretrain=null", f"init={path}"])
    assert spec.transfer.fewshot.image_size is None and spec.pretrain is None


# --------------------------------------------------------------------------------------------------------------
# 2. Dropout in fine-tuning: the variant's official value, or the user's


def test_finetune_recipe_leaves_dropout_to_the_variant_or_the_user():
    recipe = TABLE4["cifar10"]
    assert recipe.train_config("m.npz", "d", 0.01, "train", None, None).model.dropout is None
    assert recipe.train_config("m.npz", "d", 0.01, "train", None, None, 0.2).model.dropout == 0.2
    spec = build_spec("demo", ["model.dropout=0.2"])
    bench = spec.transfer.benchmarks[0]
    cfg, _, _ = plan.finetune_config(spec, bench, "data-uri", "init-uri", 0.01, 0, final=True)
    assert cfg.model.dropout == 0.2


def test_loaded_models_get_the_official_fine_tuning_dropout(tmp_path):
    """vit_jax configs/models.py: L/16, H/14 and the R50 hybrids fine-tune with dropout 0.1, the others with 0.
    An .npz records no rate and a vitflow file records its pre-training rate: neither is the transfer rate."""
    from vit.checkpoints import infer_config, official_dropout

    with torch.device("meta"):  # shapes only: no 300M-parameter allocation
        for name, rate in [("vit_l_16", 0.1), ("vit_h_14", 0.1), ("r50_vit_b_16", 0.1), ("vit_b_16", 0.0)]:
            sd = create_model(name, num_classes=10).state_dict()
            assert official_dropout(infer_config(sd)) == rate, name
    model = create_model("vit_micro_4", image_size=16, num_classes=3, dropout=0.3)
    export_npz(model, tmp_path / "m.npz")
    save_checkpoint(tmp_path / "m.safetensors", model)
    for path in (tmp_path / "m.npz", tmp_path / "m.safetensors"):
        assert load_pretrained(path).cfg.dropout == 0.0  # vit_micro_4's registered rate
        assert load_pretrained(path, dropout=0.2).cfg.dropout == 0.2
    unregistered = create_model("vit_micro_4", image_size=16, num_classes=3, depth=1, dropout=0.3)
    save_checkpoint(tmp_path / "u.safetensors", unregistered)
    assert load_pretrained(tmp_path / "u.safetensors").cfg.dropout == 0.3  # no official rate: the recorded one


# --------------------------------------------------------------------------------------------------------------
# 6. big_vision training checkpoints


def test_big_vision_training_checkpoint_loads_its_params(tmp_path):
    """big_vision saves {"params", "opt", "chrono"} flattened with "/": the params are a subset of the file."""
    model = create_model("vit_micro_4", image_size=16, num_classes=3)
    export_npz(model, tmp_path / "weights.npz")
    with np.load(tmp_path / "weights.npz") as f:
        params = {k: f[k] for k in f.files}
    training = {f"params/{k}": v for k, v in params.items()}
    for k, v in params.items():
        training[f"opt/1/0/mu/{k}"] = np.zeros_like(v)
        training[f"opt/1/0/nu/{k}"] = np.ones_like(v)
    training["opt/1/0/count"] = np.array(1000, dtype=np.int32)
    training["chrono/accum_train_time"] = np.array(12.5)
    np.savez(tmp_path / "checkpoint.npz", **training)
    loaded, expected = load_npz(tmp_path / "checkpoint.npz"), load_npz(tmp_path / "weights.npz")
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_unknown_npz_layout_error_names_what_it_found(tmp_path):
    np.savez(tmp_path / "other.npz", **{"model/encoder/w": np.zeros(3), "model/encoder/b": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"found top-level groups model \(2\)"):
        load_npz(tmp_path / "other.npz")


# --------------------------------------------------------------------------------------------------------------
# 7. Schedule and weight decay


def test_first_update_uses_schedule_step_zero_as_optax():
    torch.manual_seed(0)
    model = create_model("vit_micro_4", image_size=16, num_classes=4, depth=1)
    images, labels = torch.rand(32, 3, 16, 16) * 2 - 1, torch.randint(4, (32,))
    cfg = TrainConfig(optim=OptimConfig(name="sgd", lr=0.1, warmup_steps=4, decay="cosine"), log_every=1)
    data = InMemoryBatches(images, labels, 8)
    history = (
        Trainer(model, cfg, data, 12, CPU, lambda m, x, y: classification_loss("softmax", m(x), y, 0.0)).fit().history
    )
    lrs = [h["train/lr"] for h in history]
    assert lrs == pytest.approx([optax_schedule(i, 0.1, 12, 4) for i in range(12)])
    assert lrs[0] == 0.0


def test_kernel_weight_decay_is_big_visions_kernel_mask():
    """big_vision's ``wd_mults=[(".*/kernel$", 1.0)]``: dense and conv kernels only; not the position embedding,
    the class token, biases or norm scales."""
    for name in ("vit_micro_4", "r50_vit_b_16"):
        with torch.device("meta"):
            model = create_model(name, num_classes=4, image_size=32)
        cfg = OptimConfig(name="adam", weight_decay=0.1, weight_decay_on="kernels")
        decayed = {id(p) for g in build_optimizer(model, cfg).param_groups if g["weight_decay"] for p in g["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in decayed}
        kernels = {
            f"{m}.weight"
            for m, module in model.named_modules()
            if type(module).__name__ in ("Linear", "Conv2d", "StdConv2d")
        }
        assert names == kernels, name
        assert {"pos_embed", "cls_token", "head.bias", "norm.weight"}.isdisjoint(names)
        assert {"patch_embed.proj.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= names
