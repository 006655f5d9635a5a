"""The training engine on in-memory data: schedule, optimisers, losses, accumulation, DDP, resume, guards, MPP."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from vit.engine.config import CheckpointConfig, OptimConfig, TrainConfig
from vit.engine.distributed import DistInfo
from vit.engine.losses import classification_loss, sigmoid_xent
from vit.engine.memory import InMemoryBatches
from vit.engine.mpp import MaskedPatchPrediction, mean_colour_targets, mpp_loss
from vit.engine.optim import build_optimizer, lr_at
from vit.engine.train_state import CheckpointManager
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


def _join_gloo(rank: int, world: int, port: int) -> DistInfo:
    """This spawned process as rank ``rank`` of a CPU (gloo) process group of ``world``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    return DistInfo(rank, world, rank, torch.device("cpu"))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    dist = _join_gloo(rank, world, port)
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
    model_file = tmp_path / "ckpt" / "step-00000006" / "__0_0.distcp"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")  # same size, wrong bytes
    warnings = []
    loaded = CheckpointManager(ckpt.dir).load_latest(on_skip=warnings.append)
    assert loaded.step == 4 and "checksum mismatch" in warnings[0]


def test_checkpoint_is_written_in_the_background_from_a_copy_of_the_tensors(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    weights = torch.zeros(10_000)
    uri = manager.save(1, {"model": {"w": weights}}, {"step": 1})
    weights.add_(1.0)  # training goes on changing the weights while the checkpoint is written
    assert manager.wait() == uri and manager.wait() is None
    loaded = manager.load_latest()
    assert loaded.step == 1 and loaded.state == {"step": 1}
    assert torch.equal(loaded.tensors["model"]["w"], torch.zeros(10_000))


def test_checkpoints_round_trip_through_s3_and_keep_the_newest(s3_bucket):
    manager = CheckpointManager(f"{s3_bucket}/ckpt", keep=2)
    for step in (1, 2, 3):
        manager.save(step, {"model": {"w": torch.full((4,), float(step))}}, {"step": step})
    manager.wait()
    assert manager._steps() == [2, 3] and manager.latest_step() == 3
    assert torch.equal(manager.load_latest().tensors["model"]["w"], torch.full((4,), 3.0))


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


def test_a_non_finite_loss_between_log_steps_is_acted_on_at_the_next_one(tmp_path):
    """Without a host sync per step, a NaN at step 6 is seen at the next sync point (step 8: log and checkpoint);
    the step-8 weights are not saved, the step-4 checkpoint stays the last good one."""
    ckpt = CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=4, every_minutes=None)
    images, labels = toy_data()
    torch.manual_seed(0)
    data = PoisonedAfter(images, labels, 8, clean=5)
    cfg = dataclasses.replace(config(checkpoint=ckpt), log_every=4)
    trainer = Trainer(tiny_model(), cfg, data, 50, CPU, softmax_loss)
    with pytest.raises(NonFiniteLossError, match=r"at step 6; the last good checkpoint \(step 4\) .*found at step 8"):
        trainer.fit()
    assert CheckpointManager(ckpt.dir).latest_step() == 4


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


def test_evaluation_runs_every_eval_every_steps_between_log_steps():
    evaluated = []
    trainer = None

    def evaluate(model):
        evaluated.append(trainer.step)
        return {"val/top1": 0.0}

    torch.manual_seed(0)
    images, labels = toy_data()
    cfg = TrainConfig(optim=SGD, log_every=5, eval_every=3)
    trainer = Trainer(tiny_model(), cfg, InMemoryBatches(images, labels, 8), 7, CPU, softmax_loss, evaluate)
    trainer.fit()
    assert evaluated == [3, 6, 7]  # every 3 steps, and once at the end


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


# -- distributed agreement and host synchronisation -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_or_kill(context, timeout: float = 60) -> None:
    """Join spawned ranks; a deadlock (one rank in a barrier, the other in a backward all-reduce) fails the test."""
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the ranks did not finish together (deadlock)")


class TermOnRank(InMemoryBatches):
    """Rank ``target`` receives SIGTERM (a preemption notice for one process) when it reaches micro-batch ``at``."""

    def __init__(self, *args, target: int, at: int, **kw):
        super().__init__(*args, **kw)
        self.target, self.at = target, at

    def __iter__(self):
        for batch in super().__iter__():
            if self.rank == self.target and self.position == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def _ddp_stop_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    dist = _join_gloo(rank, world, port)
    torch.manual_seed(0)
    images, labels = toy_data()
    data = TermOnRank(images, labels, 4, rank=rank, world_size=world, target=1, at=3)
    cfg = TrainConfig(optim=SGD, log_every=2, batch_size=8, checkpoint=CheckpointConfig(dir=ckpt, every_minutes=None))
    try:
        Trainer(tiny_model(), cfg, data, 20, dist, softmax_loss).fit()
        outcome = "finished"
    except Preempted as e:
        outcome = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(outcome)
    torch.distributed.destroy_process_group()


def test_sigterm_to_one_ddp_rank_stops_all_ranks_together_after_one_checkpoint(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "outcome")
    context = mp.spawn(_ddp_stop_worker, args=(2, _free_port(), ckpt, out), nprocs=2, join=False)
    _join_or_kill(context)
    outcomes = [(tmp_path / f"outcome.{rank}").read_text() for rank in range(2)]
    # rank 1 is signalled during step 3; the ranks agree at the next log step (4), save once and stop
    assert all("stopped by a signal at step 4" in o for o in outcomes), outcomes
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-")) == ["step-00000004"]
    shards = sorted(p.name for p in (tmp_path / "ckpt" / "step-00000004").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # torch.distributed.checkpoint: each rank wrote its part
    assert CheckpointManager(ckpt).load_latest().step == 4


def _ddp_accum_worker(rank: int, world: int, port: int, out: str) -> None:
    dist = _join_gloo(rank, world, port)
    torch.manual_seed(0)
    images, labels = toy_data()
    data = InMemoryBatches(images, labels, 2, rank=rank, world_size=world)
    trainer = Trainer(tiny_model(), config(batch_size=8, accum_steps=2, optim=SGD), data, 3, dist, softmax_loss)
    reductions = []

    def counting_allreduce(state, bucket):
        """DDP's own all-reduce, recorded: which step it ran in, which gradient bucket."""
        reductions.append((trainer.step, bucket.index()))
        work = torch.distributed.all_reduce(bucket.buffer(), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))

    trainer.module.register_comm_hook(None, counting_allreduce)
    trainer.fit()
    if rank == 0:
        torch.save(reductions, out)
    torch.distributed.destroy_process_group()


def test_ddp_accumulation_all_reduces_only_on_the_last_micro_batch(tmp_path):
    out = str(tmp_path / "reductions.pt")
    mp.spawn(_ddp_accum_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    reductions = torch.load(out)
    first_buckets = [step for step, bucket in reductions if bucket == 0]
    assert first_buckets == [1, 2, 3]  # one gradient all-reduce per optimiser step, none for the first micro-batch


HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


def test_training_steps_read_nothing_back_to_the_host_except_on_log_steps(monkeypatch):
    """A CPU-visible proxy for host synchronisations: every way a tensor's value reaches Python, recorded with the
    step it happens in. The optimiser's own step counters are excluded: they live on the CPU even on a GPU."""
    torch.manual_seed(0)
    images, labels = toy_data()
    cfg = TrainConfig(optim=OptimConfig(name="adam", lr=1e-3, warmup_steps=2), log_every=5)
    trainer = Trainer(tiny_model(), cfg, InMemoryBatches(images, labels, 8), 12, CPU, softmax_loss)
    counter_ids: set[int] = set()
    syncs: list[tuple[int, str]] = []
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kw):
            if id(self) not in counter_ids:
                counter_ids.update(id(s["step"]) for s in trainer.optimizer.state.values() if "step" in s)
            if id(self) not in counter_ids:
                syncs.append((trainer.step, _name))
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    result = trainer.fit()
    monkeypatch.undo()
    assert [h["step"] for h in result.history] == [5, 10, 12]
    assert syncs and {step for step, _ in syncs} <= {5, 10, 12}, syncs


def test_the_cuda_basics_are_chosen_for_cuda_and_left_off_on_the_cpu():
    """Page-locked loader batches and TF32 matmuls on CUDA; CPU runs keep torch's defaults (exact numbers). Their
    speed is measured by bench/gpu_check.py on a GPU."""
    from vit.engine.distributed import configure_cuda
    from vit.engine.optim import _fused_adamw
    from vit.engine.run import _pinned

    cuda = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    assert _pinned(cuda) and not _pinned(CPU)
    assert _fused_adamw([{"params": [torch.nn.Parameter(torch.zeros(2))]}]) is None  # foreach, as before
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        configure_cuda()
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def test_gpu_check_judges_the_goal_on_b16s_best_mode():
    import sys

    sys.path.insert(0, os.getcwd())
    from bench.gpu_check import b16_goal

    rows = [
        ["vit_b_16 @224", "eager", 256, 2000.0, "31.5%", "20.1"],
        ["vit_b_16 @224", "compile", 256, 2900.0, "46.2%", "18.0"],
        ["vit_l_16 @224", "compile", 96, 900.0, "60.0%", "40.0"],  # another model: not the goal's
    ]
    goal = b16_goal(rows, "NVIDIA H200")
    assert (goal["met"], goal["note"]) == (True, "NVIDIA H200") and "46.2%" in goal["figure"]
    assert b16_goal(rows[:1], "NVIDIA H200")["met"] is False


def test_gpu_check_smoke_runs_every_part_on_the_cpu():
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for part in (
        "| vit_micro_4 @32 | eager |",
        "flash attention in use",
        "GPU data path",
        "DDP self-test (1 process): gloo: passed",
    ):
        assert part in out.stdout, out.stdout
