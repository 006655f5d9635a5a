"""Loading: ranks x workers cover every sample once per epoch, global batches independent of the world size,
repeat/reshuffle, exact mid-epoch resume, spawned workers, decoding in the main process, map-style access,
transforms."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_data_formats import image_bytes, pixels, write_imagefolder
from vit.data import build_transform, open_dataset, prepare_dataset
from vit.data.loader import buffer_shuffle
from vit.data.shards import decode, transform_encoded

SOURCE = "synthetic-vtab:specialized_noise,test=30"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """train800 cut to 200 samples in 10 shards (split by shards across slots), val200 to 40 in 2 and test 30 in 2
    (fewer shards than slots: split by sample)."""
    root = tmp_path_factory.mktemp("loader")
    uri = prepare_dataset(SOURCE, "noise", str(root), progress=False, max_train800=200, max_val200=40, shard_samples=20)
    return open_dataset(uri)


def take(loader, n: int | None = None) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def indices(batches) -> list[int]:
    return [i for b in batches for i in b.index.tolist()]


@pytest.mark.parametrize(
    ("split", "world", "workers"),
    [("train800", 2, 2), ("test", 2, 2), ("train800", 3, 0), ("val200", 3, 0)],
)
def test_ranks_and_workers_cover_every_sample_exactly_once(ds, split, world, workers):
    tf = build_transform("eval", 16)
    seen = []
    for rank in range(world):
        loader = ds.loader(split, 7, tf, repeat=False, num_workers=workers, rank=rank, world_size=world, seed=3)
        batches = take(loader)
        assert len(batches) == len(loader)
        seen += indices(batches)
        manifest = ds.manifest(split)
        for b in batches:
            assert b.images.shape[1:] == (3, 16, 16) and b.images.dtype == torch.float32
            assert b.labels.dtype == torch.int64 and b.index.dtype == torch.int64
            assert b.labels.tolist() == manifest["label"].iloc[b.index.tolist()].tolist()
    assert sorted(seen) == list(range(ds.count(split)))


def test_repeat_streams_epochs_reshuffled_in_full_batches(ds):
    loader = ds.loader("train800", 16, build_transform("vtab", 16), seed=1)
    batches = take(loader, 25)  # 400 samples: two epochs of 200
    assert all(len(b.index) == 16 for b in batches)
    order = indices(batches)
    first, second = order[:200], order[200:]
    assert sorted(first) == sorted(second) == list(range(200))
    assert first != second  # epoch 1 is shuffled differently
    again = take(ds.loader("train800", 16, build_transform("vtab", 16), seed=1), 25)
    assert indices(again) == order  # deterministic given the seed
    assert indices(take(ds.loader("train800", 16, build_transform("vtab", 16), seed=2), 25)) != order
    unshuffled = take(ds.loader("val200", 8, build_transform("vtab", 16), shuffle=False, repeat=False))
    assert indices(unshuffled) == list(range(40))


@pytest.mark.parametrize(
    ("workers", "repeat", "rank", "world", "total", "stop"),
    [(0, True, 0, 1, 30, 11), (2, True, 1, 2, 20, 7), (2, False, 0, 2, None, 3), (3, False, 1, 2, None, 2)],
)
def test_resume_mid_epoch_gives_the_identical_remaining_sequence(ds, workers, repeat, rank, world, total, stop):
    def loader():
        return ds.loader(
            "train800",
            9,
            build_transform("pretrain", 16),
            repeat=repeat,
            num_workers=workers,
            rank=rank,
            world_size=world,
            seed=5,
        )

    full = take(loader(), total)
    interrupted = loader()
    head = take(interrupted, stop)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint file
    resumed = loader()
    resumed.load_state_dict(state)
    tail = take(resumed, None if total is None else total - stop)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(full, head + tail, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)  # the random crops and flips resume too


def test_state_of_a_different_setup_is_refused(ds):
    state = ds.loader("train800", 8, build_transform("eval", 16)).state_dict()
    other = ds.loader("train800", 8, build_transform("eval", 16), num_workers=2)
    with pytest.raises(ValueError, match="num_workers: saved 0, now 2"):
        other.load_state_dict(state)


def test_repeat_false_passes_reshuffle_and_more_slots_than_samples_still_stream(ds):
    loader = ds.loader("test", 8, build_transform("eval", 16), repeat=False)
    first, second = indices(take(loader)), indices(take(loader))
    assert sorted(first) == sorted(second) == list(range(30)) and first != second
    tiny = [ds.loader("test", 1, build_transform("eval", 16), rank=r, world_size=31, seed=2) for r in (0, 30)]
    assert [len(indices(take(loader, 2))) for loader in tiny] == [2, 2]  # chunks wrap into the next epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_global_batch_holds_the_same_samples_and_crops_whatever_the_world_size(ds, workers):
    """Step s of world_size ranks (batch_size / world_size each) covers the positions of step s of one process."""
    global_batch, steps = 12, 40  # 480 samples: the stream runs over two epoch boundaries of 200
    tf = build_transform("pretrain", 16)

    def step_batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ranks = [
            take(
                ds.loader("train800", global_batch // world, tf, seed=4, num_workers=workers, rank=r, world_size=world),
                steps,
            )
            for r in range(world)
        ]
        return [(torch.cat([b[s].index for b in ranks]), torch.cat([b[s].images for b in ranks])) for s in range(steps)]

    single = step_batches(1)
    for world in (2, 3):
        for (index, images), (index1, images1) in zip(step_batches(world), single, strict=True):
            assert torch.equal(index, index1) and torch.equal(images, images1)
    order = [i for index, _ in single for i in index.tolist()]
    assert sorted(order[:200]) == sorted(order[200:400]) == list(range(200))  # every sample once per epoch


def test_the_vectorised_shuffle_buffer_is_the_buffer():
    def simulated(rows: list[int], size: int, rng: np.random.Generator) -> list[int]:
        buffer, out = rows[:size], []
        for incoming, pick in zip(rows[size:], rng.integers(0, size, len(rows) - size).tolist(), strict=True):
            out.append(buffer[pick])
            buffer[pick] = incoming
        return out + [buffer[i] for i in rng.permutation(size)]

    rows = np.random.default_rng(0).permutation(1000)
    for size in (1, 7, 100, 999):
        expected = simulated(rows.tolist(), size, np.random.default_rng(size))
        assert buffer_shuffle(rows, size, np.random.default_rng(size)).tolist() == expected
    assert sorted(buffer_shuffle(rows, 5000, np.random.default_rng(1)).tolist()) == list(range(1000))


def test_decoding_in_the_main_process_gives_the_workers_batches(tmp_path):
    """``decode_device``: workers only read bytes; the batch is decoded in one batched ``decode_jpeg`` call and
    augmented on that device (here the CPU, standing in for CUDA) with the crops and flips of the worker path."""
    src = write_imagefolder(tmp_path / "src", per_class=6, splits=("train",)) / "train"
    jpegs = open_dataset(prepare_dataset(f"imagefolder:{src}", "jpegs", str(tmp_path / "out"), progress=False))
    for kind in ("pretrain", "finetune", "eval"):
        tf = build_transform(kind, 16)
        on_workers = take(jpegs.loader("train", 5, tf, seed=3, num_workers=1), 6)
        in_main = take(jpegs.loader("train", 5, tf, seed=3, num_workers=1, decode_device="cpu"), 6)
        for a, b in zip(on_workers, in_main, strict=True):
            assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images)


def test_spawned_workers_give_the_same_batches(ds):
    def run(context):
        loader = ds.loader(
            "val200", 6, build_transform("finetune", 16), num_workers=1, multiprocessing_context=context, seed=9
        )
        return take(loader, 8)

    for a, b in zip(run("spawn"), run(None), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


def test_map_dataset_and_few_shot_subsets(ds):
    tf = build_transform("eval", 16)
    full = ds.map_dataset("val200", tf)
    assert len(full) == 40
    image, label = full[5]
    assert image.shape == (3, 16, 16) and label == int(ds.manifest("val200")["label"][5])
    subset = ds.map_dataset("val200", tf, indices=[31, 5, 5])
    assert len(subset) == 3 and torch.equal(subset[1][0], image) and torch.equal(subset[2][0], image)
    loader_batch = take(ds.loader("val200", 40, tf, shuffle=False, repeat=False))[0]
    assert torch.equal(loader_batch.images[31], subset[0][0])  # the loader and map-style agree
    with pytest.raises(IndexError):
        ds.map_dataset("val200", tf, indices=[40])


# --------------------------------------------------------------------------------------------------------------
# Transforms and decoding


def test_transform_kinds_shapes_and_range():
    image = torch.from_numpy(pixels(1, (40, 30))).permute(2, 0, 1)
    for kind in ("pretrain", "finetune", "eval", "vtab"):
        out = build_transform(kind, (24, 32))(image)
        assert out.shape == (3, 24, 32) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("random", 32)


def test_eval_and_vtab_resize_the_whole_image_without_crop_or_flip():
    image = torch.zeros(3, 20, 60, dtype=torch.uint8)
    image[:, :, 30:] = 255  # left half black, right half white
    for kind in ("eval", "vtab"):
        out = build_transform(kind, 10)(image)
        assert out.shape == (3, 10, 10)
        assert torch.all(out[:, :, :4] == -1) and torch.all(out[:, :, 6:] == 1)  # whole width kept, not flipped
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert torch.equal(build_transform("eval", 10)(pil), build_transform("eval", 10)(image))  # PIL input too


def test_pretrain_and_finetune_are_random_but_seedable():
    image = torch.from_numpy(pixels(2, (64, 48))).permute(2, 0, 1)
    for kind in ("pretrain", "finetune"):
        tf = build_transform(kind, 24)
        torch.manual_seed(0)
        a = [tf(image) for _ in range(4)]
        torch.manual_seed(0)
        b = [tf(image) for _ in range(4)]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(torch.equal(a[0], x) for x in a[1:])


def test_inception_crop_area_and_aspect():
    tf = build_transform("pretrain", 8)
    torch.manual_seed(1)
    boxes = [tf.plan(400, 300).box for _ in range(300)]
    areas = [h * w / (300 * 400) for _, _, h, w in boxes]
    ratios = [w / h for _, _, h, w in boxes]
    assert min(areas) >= 0.045 and max(areas) <= 1.0 and min(areas) < 0.2 and max(areas) > 0.8
    assert min(ratios) >= 0.74 and max(ratios) <= 1.34
    assert all(t >= 0 and t + h <= 300 and left >= 0 and left + w <= 400 for t, left, h, w in boxes)


def test_large_jpegs_are_decoded_at_reduced_size_when_the_transform_allows():
    data = image_bytes(3, "JPEG", (256, 192))
    full = decode(data)
    assert full.shape == (3, 192, 256)
    tf = build_transform("eval", 32, resize="antialias")
    plan = tf.plan(256, 192)
    assert plan.scale == pytest.approx(32 / 192) and plan.box is None
    small = decode(data, plan.scale)
    assert small.shape == (3, 48, 64)  # DCT scaling by 1/4: still >= 32 on both sides
    assert (tf(small) - tf(full)).abs().mean() < 0.05  # the same picture
    # pretrain: the scale follows each sample's own crop, drawn before decoding
    pretrain = build_transform("pretrain", 32, resize="antialias")
    torch.manual_seed(0)
    plans = [pretrain.plan(256, 192) for _ in range(50)]
    assert all(p.scale == min(1.0, max(32 / p.box[2], 32 / p.box[3])) for p in plans)
    assert min(p.scale for p in plans) <= 0.5 and max(p.scale for p in plans) > 0.5
    torch.manual_seed(1)
    reduced = transform_encoded(pretrain, data, 256, 192)
    torch.manual_seed(1)
    assert (reduced - pretrain(full)).abs().mean() < 0.1  # the same crop and flip, decoded smaller
    png = io.BytesIO()
    Image.fromarray(pixels(4)).convert("L").save(png, format="PNG")
    assert decode(png.getvalue()).shape == (3, 20, 24)  # grayscale -> RGB


def test_batches_are_the_transformed_stored_images(ds):
    tf = build_transform("eval", 16)
    batch = take(ds.loader("test", 30, tf, shuffle=False, repeat=False))[0]
    manifest = ds.manifest("test")
    mapped = ds.map_dataset("test")
    for i in (0, 13, 29):
        row = int(batch.index[i])
        assert int(batch.labels[i]) == manifest["label"][row]
        assert torch.equal(batch.images[i], tf(mapped[row][0]))
    assert Counter(batch.labels.tolist()) == Counter(manifest["label"].tolist())
    assert np.array_equal(np.sort(batch.index.numpy()), np.arange(30))


def test_the_gpu_data_path_is_selected_by_config_and_refused_without_a_gpu(tmp_path, capsys):
    from vit.engine.__main__ import main
    from vit.engine.config import TrainConfig
    from vit.engine.exit_codes import EXIT_INVALID
    from vit.engine.run import decode_device

    cfg = TrainConfig.from_dict({"data": {"dataset": str(tmp_path)}, "steps": 1})
    assert cfg.data.decode_device == "cpu" and decode_device(cfg, torch.device("cpu")) is None  # workers decode
    cfg.data.decode_device = "cuda"
    assert decode_device(cfg, torch.device("cuda", 1)) == "cuda:1"  # the rank's own GPU
    config = tmp_path / "train.json"
    config.write_text(json.dumps(cfg.to_dict()))
    assert main([str(config), "--set", "device=cpu"]) == EXIT_INVALID  # refused before any work
    assert "data.decode_device=cuda decodes on the training GPU, but this run trains on cpu" in capsys.readouterr().err
