"""The training engine on in-memory data: schedule, optimisers, losses, accumulation, DDP, resume, guards, MPP."""

from __future__ import annotations

import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vit.engine.checkpointing import CheckpointManager
from vit.engine.config import CheckpointConfig, OptimConfig, TrainConfig
from vit.engine.distributed import DistInfo
from vit.engine.losses import classification_loss, sigmoid_xent
from vit.engine.memory import InMemoryBatches
from vit.engine.mpp import MaskedPatchPrediction, mean_colour_targets, mpp_loss
from vit.engine.optim import build_optimizer, lr_at
from vit.engine.trainer import NonFiniteLossError, Preempted, Trainer
from vit.model import create_model

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def toy_data(n: int = 64, size: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the quadrant holding a bright square: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    images = torch.rand(n, 3, size, size, generator=g) * 0.4 - 1
    half = size // 2
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        images[i, :, r * half : r * half + half, col * half : col * half + half] += 1.2
    return images, labels


def tiny_model(**kw):
    kw.setdefault("num_classes", 4)
    return create_model("vit_micro_4", image_size=16, depth=2, **kw)


def config(**kw) -> TrainConfig:
    optim = kw.pop("optim", OptimConfig(name="adam", lr=3e-3, warmup_steps=2, decay="cosine"))
    return TrainConfig(optim=optim, log_every=1, **kw)


def softmax_loss(module, x, y):
    return classification_loss("softmax", module(x), y, 0.0)


def run(cfg: TrainConfig, steps: int, batch: int = 8, seed: int = 0, dist: DistInfo = CPU, init_seed=None, **kw):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = tiny_model()
    images, labels = toy_data()
    data = InMemoryBatches(images, labels, batch, seed=seed, rank=dist.rank, world_size=dist.world_size)
    trainer = Trainer(model, cfg, data, steps, dist, softmax_loss, **kw)
    return trainer, trainer.fit()


# -- schedule, optimisers, losses -------------------------------------------------------------------------------


def test_lr_schedule_is_the_official_formula():
    # warmup multiplies by step / warmup; cosine reaches 0, linear reaches linear_end
    assert lr_at(1, 0.1, 100, 10, "cosine", 0) == pytest.approx(0.1 * 0.1)
    assert lr_at(10, 0.1, 100, 10, "cosine", 0) == pytest.approx(0.1)
    assert lr_at(55, 0.1, 100, 10, "cosine", 0) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 0.1, 100, 10, "cosine", 0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(100, 1e-3, 100, 10, "linear", 1e-5) == pytest.approx(1e-5)
    assert lr_at(55, 1e-3, 100, 10, "linear", 1e-5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)


def test_sgd_is_heavy_ball_momentum():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer(torch.nn.ParameterList([p]), OptimConfig(name="sgd", lr=0.1, momentum=0.9))
    m, value = 0.0, 1.0
    for g in (1.0, 2.0, -0.5):
        p.grad = torch.tensor([g])
        opt.step()
        m = 0.9 * m + g
        value -= 0.1 * m
        assert p.item() == pytest.approx(value)


@pytest.mark.parametrize(("mode", "expected"), [("lr_relative", 1 - 0.01 * 0.1), ("schedule_only", 1 - 0.1 * 1.0)])
def test_weight_decay_conventions(mode, expected):
    p = torch.nn.Parameter(torch.ones(3))
    cfg = OptimConfig(name="adam", lr=0.01, weight_decay=0.1, weight_decay_mode=mode)
    opt = build_optimizer(torch.nn.ParameterList([p]), cfg)
    p.grad = torch.zeros(3)
    opt.step()  # zero gradient: only the decay moves the weight (at schedule value 1)
    torch.testing.assert_close(p.detach(), torch.full((3,), expected))


def test_sigmoid_xent_matches_the_official_formula():
    logits, labels = torch.randn(5, 7), torch.randint(7, (5,))
    onehot = torch.nn.functional.one_hot(labels, 7).float()
    logsig = torch.nn.functional.logsigmoid
    expected = -(onehot * logsig(logits) + (1 - onehot) * logsig(-logits)).sum(-1).mean()
    torch.testing.assert_close(sigmoid_xent(logits, labels), expected)


# -- training ---------------------------------------------------------------------------------------------------


def test_loss_falls_and_metrics_are_reported():
    events = []
    _, result = run(config(), steps=80, callbacks=[lambda e, s, d: events.append((e, s, d))], flops_per_image=1e6)
    losses = [h["train/loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    metrics = [d for e, _, d in events if e == "metrics"]
    assert {"train/loss", "train/lr", "train/images_per_s", "train/mfu", "train/grad_norm"} <= set(metrics[0])
    assert events[0][0] == "start" and events[-1][0] == "end"


SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, warmup_steps=1, decay="cosine")  # Adam would amplify rounding


def test_gradient_accumulation_equals_the_full_batch():
    a, _ = run(config(batch_size=8, optim=SGD), steps=5, batch=8)
    b, _ = run(config(batch_size=8, accum_steps=2, optim=SGD), steps=5, batch=4)
    for p, q in zip(a.raw.parameters(), b.raw.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_gradient_clipping_bounds_the_update():
    constant_lr = OptimConfig(name="sgd", lr=1.0, momentum=0.0, grad_clip=1e-3, decay="linear", linear_end=1.0)
    trainer, result = run(config(optim=constant_lr), steps=1)
    torch.manual_seed(0)
    before = tiny_model()
    delta = torch.sqrt(
        sum(((p - q) ** 2).sum() for p, q in zip(trainer.raw.parameters(), before.parameters(), strict=True))
    )
    assert delta.item() == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped norm 1e-3
    assert result.history[0]["train/grad_norm"] > 1e-3


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dist = DistInfo(rank, world, rank, torch.device("cpu"))
    trainer, _ = run(config(batch_size=8, optim=SGD), steps=6, batch=8 // world, dist=dist)
    if rank == 0:
        torch.save(trainer.raw.state_dict(), out)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    single, _ = run(config(batch_size=8, optim=SGD), steps=6, batch=8)
    ddp = torch.load(out, weights_only=True)
    for name, p in single.raw.state_dict().items():
        torch.testing.assert_close(ddp[name], p, atol=1e-5, rtol=1e-4, msg=name)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    steps = 12
    full, _ = run(config(), steps=steps)
    ckpt = CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=5, every_minutes=None)
    cfg = config(checkpoint=ckpt)

    def stop_at_7(event, step, data):
        if event == "metrics" and step == 7:
            raise KeyboardInterrupt  # a crash between checkpoints (step 5 is the last one)

    with pytest.raises(KeyboardInterrupt):
        run(cfg, steps=steps, callbacks=[stop_at_7])
    assert CheckpointManager(ckpt.dir).latest_step() == 5
    resumed, result = run(cfg, steps=steps, init_seed=123)  # other init and RNG: all must come from the checkpoint
    assert result.resumed_from == 5
    for (name, p), q in zip(full.raw.state_dict().items(), resumed.raw.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ckpt = CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=2, every_minutes=None, keep=3)
    run(config(checkpoint=ckpt), steps=6)
    model_file = tmp_path / "ckpt" / "step-00000006" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")  # same size, wrong bytes
    warnings = []
    loaded = CheckpointManager(ckpt.dir).load_latest(on_skip=warnings.append)
    assert loaded.step == 4 and "checksum mismatch" in warnings[0]


class PoisonedAfter(InMemoryBatches):
    """Clean batches until ``clean`` have been served, then NaN images (a corrupt sample or a diverging run)."""

    def __init__(self, *args, clean: int, **kw):
        super().__init__(*args, **kw)
        self.clean = clean

    def __iter__(self):
        for images, labels in super().__iter__():
            yield (images if self.position <= self.clean else images * float("nan")), labels


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    ckpt = CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=2, every_minutes=None)
    images, labels = toy_data()
    torch.manual_seed(0)
    data = PoisonedAfter(images, labels, 8, clean=5)
    trainer = Trainer(tiny_model(), config(checkpoint=ckpt), data, 50, CPU, softmax_loss)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 6; the last good checkpoint \(step 4\)"):
        trainer.fit()
    manager = CheckpointManager(ckpt.dir)
    assert manager.latest_step() == 4
    restored = manager.load_latest()
    assert restored.step == 4 and all(torch.isfinite(t).all() for t in restored.tensors["model"].values())


def test_sigterm_checkpoints_and_stops(tmp_path):
    ckpt = CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=None, every_minutes=None)

    def term_at_3(event, step, data):
        if event == "metrics" and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="at step 3"):
        run(config(checkpoint=ckpt), steps=20, callbacks=[term_at_3])
    assert CheckpointManager(ckpt.dir).latest_step() == 3


def test_polyak_average_is_used_for_evaluation():
    seen = {}

    def evaluate(model):
        seen["head"] = model.head.weight.detach().clone()
        return {"val/top1": 0.0}

    trainer, _ = run(config(polyak=0.9), steps=5, evaluate_fn=evaluate)
    assert not torch.equal(seen["head"], trainer.raw.head.weight)
    torch.testing.assert_close(
        seen["head"], trainer.polyak[[n for n, _ in trainer.raw.named_parameters()].index("head.weight")]
    )


# -- masked patch prediction ------------------------------------------------------------------------------------


def test_mean_colour_targets():
    images = -torch.ones(1, 3, 8, 8)  # black
    images[:, 0, :4, 4:] = 1.0  # top-right patch pure red
    targets = mean_colour_targets(images, patch=4)
    assert targets.tolist() == [[0, 7 * 64, 0, 0]]


def test_mpp_corrupts_half_the_patches_and_learns():
    torch.manual_seed(0)
    model = create_model("vit_micro_4", image_size=16, depth=2, num_classes=0)
    mpp = MaskedPatchPrediction(model)
    images, _ = toy_data(n=32)
    logits, targets = mpp(images[:4])
    assert logits.shape == (4 * 8, 512) and targets.shape == (32,)  # 50% of 16 patches per image
    trainer = Trainer(mpp, config(), InMemoryBatches(images, torch.zeros(32, dtype=torch.long), 8), 30, CPU, mpp_loss)
    result = trainer.fit()
    assert result.history[-1]["train/loss"] < 0.7 * result.history[0]["train/loss"]


def test_config_validation_names_fields():
    cfg = TrainConfig(batch_size=10, accum_steps=3, steps=-1)
    with pytest.raises(ValueError) as err:
        cfg.validate(world_size=2)
    msg = str(err.value)
    assert "batch_size 10 is not divisible by devices (2) x accum_steps (3)" in msg
    assert "steps must be > 0" in msg and "data.dataset is required" in msg
    with pytest.raises(ValueError, match="unknown config field.*optim.lrate"):
        TrainConfig.from_dict({"optim": {"lrate": 1}})
    with pytest.raises(ValueError, match="optim.decay must be one of"):
        TrainConfig.from_dict({"optim": {"decay": "exp"}})
