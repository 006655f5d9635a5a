"""The training loop: gradient accumulation, autocast, DDP, clipping, the official schedule, Polyak averaging,
checkpoint/resume that reproduces an uninterrupted run exactly, a NaN guard, and a clean stop on SIGTERM/SIGINT.

A step only queues work on the device; nothing is read back to the host except at a sync point — a log step
(``log_every``) or a scheduled checkpoint. There the loss sum and the first non-finite step, accumulated on the
device, are read, and under DDP one all-reduce also carries every rank's stop request and time-based checkpoint
wish, so a SIGTERM to one rank stops all of them together, at most ``log_every`` steps later. A NaN is therefore
acted on before any checkpoint after it is written. Checkpoints are written in the background (see checkpointing).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vit.engine.callbacks import Callback
from vit.engine.config import TrainConfig
from vit.engine.distributed import DistInfo, all_reduce_sum, autocast, configure_cuda
from vit.engine.optim import build_optimizer, lr_at
from vit.engine.train_state import CheckpointManager, optimizer_from_tensors, optimizer_to_tensors

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint stays as it was."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""


@dataclass
class TrainResult:
    step: int
    resumed_from: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)


@dataclass
class _Window:
    """What accumulates between log steps, on the device: the loss sum and the first non-finite step and loss
    (0 while none), so a NaN is acted on at the next synchronisation instead of costing a host read every step."""

    loss_sum: torch.Tensor
    bad_step: torch.Tensor
    bad_loss: torch.Tensor
    steps: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, device: torch.device) -> _Window:
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    def add(self, step: int, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss
        first = (self.bad_step == 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.steps += 1
        self.images += images

    def restart_clock(self) -> None:
        self.started = time.perf_counter()


# Dense bf16 peaks per device, for MFU on GPUs (vendor datasheets).
GPU_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def measure_gemm_flops(n: int = 1024, repeats: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """This machine's sustained matmul throughput (FLOP/s) on the current device: the CPU's MFU denominator."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        return None if peak is None else (peak if precision != "fp32" else peak / 2)
    return measure_gemm_flops(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, *rest = meta["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


class Trainer:
    """Runs ``total_steps`` optimiser steps of ``loss_fn`` over ``data`` (an iterable of (images, labels) batches,
    optionally with ``state_dict``/``load_state_dict`` for exact resume). Each item is one micro-batch;
    ``cfg.accum_steps`` of them make a step.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        data: Iterable,
        total_steps: int,
        dist: DistInfo,
        loss_fn: LossFn,
        evaluate_fn: EvalFn | None = None,
        callbacks: Sequence[Callback] = (),
        flops_per_image: float | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        if dist.device.type == "cuda":
            configure_cuda()
        self.raw = model.to(dist.device)
        self.data = data
        self.total_steps = total_steps
        self.dist = dist
        self.loss_fn = loss_fn
        self.evaluate_fn = evaluate_fn
        self.callbacks = list(callbacks) if dist.is_main else []
        self.flops_per_image = flops_per_image
        self.metadata = metadata or {}
        self.optimizer = build_optimizer(self.raw, cfg.optim)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
        self.polyak: list[torch.Tensor] | None = (
            [p.detach().clone() for p in self.raw.parameters()] if cfg.polyak else None
        )
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep) if cfg.checkpoint.dir else None
        self.step = 0
        self._stop_requested = False
        self.module = self._wrap(self.raw)

    # -- setup --------------------------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        if self.cfg.compile:  # the inner module, then DDP: the order PyTorch's "where to apply torch.compile" gives
            model.compile()
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(event, self.step, data)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str | None:
        """Start writing a checkpoint of the current step (every rank calls this; see :class:`CheckpointManager`)
        and return its URI; the one before it is complete by then and reported as a ``checkpoint`` event."""
        if self.checkpoints is None:
            return None
        self.finish_checkpoint()
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        tensors = {"model": self.raw.state_dict(), "optimizer": opt_tensors}
        if self.polyak is not None:
            tensors["polyak"] = {str(i): p for i, p in enumerate(self.polyak)}
        state = None
        if self.dist.is_main:  # the RNG and loader position of rank 0, as the data order is a function of it
            rng_tensors, rng_meta = rng_state()
            tensors["rng"] = rng_tensors
            state = {
                "step": self.step,
                "optimizer": opt_meta,
                "rng": rng_meta,
                "scaler": self.scaler.state_dict(),
                "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
                "metadata": self.metadata,
            }
        return self.checkpoints.save(self.step, tensors, state)

    def finish_checkpoint(self) -> str | None:
        """Wait for the checkpoint being written, if any; report it once it is complete."""
        uri = self.checkpoints.wait() if self.checkpoints is not None else None
        if uri is not None:
            self._emit("checkpoint", {"uri": uri})
        return uri

    def _restore(self) -> int | None:
        if self.checkpoints is None or not self.cfg.checkpoint.resume:
            return None
        ckpt = self.checkpoints.load_latest(on_skip=lambda msg: self._emit("warning", {"message": msg}))
        if ckpt is None:
            return None
        self.raw.load_state_dict(ckpt.tensors["model"])
        optimizer_from_tensors(self.optimizer, ckpt.tensors["optimizer"], ckpt.state["optimizer"])
        if self.polyak is not None:
            for i, p in enumerate(self.polyak):
                p.copy_(ckpt.tensors["polyak"][str(i)])
        set_rng_state(ckpt.tensors["rng"], ckpt.state["rng"])
        self.scaler.load_state_dict(ckpt.state["scaler"])
        if ckpt.state.get("data") is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(ckpt.state["data"])
        self.step = ckpt.step
        return ckpt.step

    # -- Polyak averaging ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_polyak(self) -> None:
        params = [p.detach() for p in self.raw.parameters()]
        torch._foreach_lerp_(self.polyak, params, 1.0 - self.cfg.polyak)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The model with Polyak-averaged weights swapped in (the raw weights otherwise)."""
        if self.polyak is None:
            yield self.raw
            return
        params = list(self.raw.parameters())
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, avg in zip(params, self.polyak, strict=True):
                p.copy_(avg)
        try:
            yield self.raw
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    # -- the loop -----------------------------------------------------------------------------------------------

    def _install_stop_handlers(self) -> dict[int, Any]:
        """SIGTERM (preemption, a supervisor stopping us) and SIGINT (Ctrl-C) finish the step, checkpoint, stop."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            self._stop_requested = True

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.data:
            images, labels = batch[0], batch[1]
            yield (images.to(self.dist.device, non_blocking=True), labels.to(self.dist.device, non_blocking=True))

    def fit(self) -> TrainResult:
        resumed = self._restore()
        result = TrainResult(step=self.step, resumed_from=resumed)
        previous_handlers = self._install_stop_handlers()  # before "start": from then on a signal means a checkpoint
        self._emit("start", {"total_steps": self.total_steps, "resumed_from": resumed})
        peak = self.cfg.peak_flops
        if peak is None and self.flops_per_image:
            peak = peak_flops(self.dist.device, self.cfg.precision)
        batches = self._micro_batches()
        last_ckpt_time = time.monotonic()
        window = _Window.start(self.dist.device)
        self.module.train()
        try:
            while self.step < self.total_steps:
                self.step += 1
                loss, grad_norm, images = self._train_step(batches)
                window.add(self.step, loss, images)
                done = self.step == self.total_steps
                log = self.step % self.cfg.log_every == 0 or done
                scheduled = self._checkpoint_scheduled(done)
                evaluate = bool(self.evaluate_fn and self.cfg.eval_every) and self.step % self.cfg.eval_every == 0
                stop, due = self._stop_requested, self._minutes_due(last_ckpt_time)
                if not (log or scheduled or evaluate or (self.dist.world_size == 1 and (stop or due))):
                    continue
                stop, due, loss_sum, grad_norm_value = self._sync_point(window, grad_norm, stop, due)
                if log:
                    self._log(result, window, loss_sum, grad_norm_value, peak)
                    window = _Window.start(self.dist.device)
                if evaluate and not done:
                    self._run_eval(result)
                    window.restart_clock()
                if self.dist.world_size == 1:  # nobody to agree with: a signal during logging is acted on now
                    stop = self._stop_requested
                if scheduled or due or stop:
                    self.save_checkpoint()
                    last_ckpt_time = time.monotonic()
                    window.restart_clock()
                if stop:
                    raise Preempted(f"stopped by a signal at step {self.step}; checkpoint saved, run again to resume")
        finally:
            try:  # under the stop handler still: a dying multi-threaded parent can send its death signal twice
                self.finish_checkpoint()  # also when stopped or crashed: what was being written completes
            finally:
                for sig, handler in previous_handlers.items():
                    signal.signal(sig, handler)
        if self.evaluate_fn:
            self._run_eval(result)
        result.step = self.step
        self._emit("end", {"step": self.step, **result.eval})
        return result

    def _checkpoint_scheduled(self, done: bool) -> bool:
        every = self.cfg.checkpoint.every_steps
        return self.checkpoints is not None and (done or bool(every) and self.step % every == 0)

    def _minutes_due(self, last_time: float) -> bool:
        minutes = self.cfg.checkpoint.every_minutes
        return self.checkpoints is not None and bool(minutes) and time.monotonic() - last_time >= minutes * 60

    def _sync_point(
        self, window: _Window, grad_norm: torch.Tensor, stop: bool, due: bool
    ) -> tuple[bool, bool, float, float]:
        """The one host synchronisation of a step: on log, checkpoint and evaluation steps, and (one process) at a
        signal.

        Every rank contributes its stop request, its time-based checkpoint wish, its loss sum and whether it saw a
        non-finite loss to one all-reduce, so all ranks decide alike: under DDP a SIGTERM to any rank is acted on
        by all at the next log step (at most ``log_every`` steps later), and a NaN on any rank stops all of them.
        """
        flags = torch.tensor([float(stop), float(due)], device=self.dist.device)
        shared = all_reduce_sum(torch.cat([torch.stack([window.loss_sum, (window.bad_step > 0).float()]), flags]))
        local = torch.stack([window.bad_step, window.bad_loss, grad_norm.detach().float()])
        loss_sum, any_bad, stops, dues, bad_step, bad_loss, grad_norm_value = torch.cat([shared, local]).tolist()
        if any_bad:
            self._raise_non_finite(int(bad_step) or self.step, bad_loss)
        return stops > 0, dues > 0, loss_sum / self.dist.world_size, grad_norm_value

    def _raise_non_finite(self, step: int, loss: float) -> None:
        self.finish_checkpoint()
        last = self.checkpoints.latest_step() if self.checkpoints else None
        where = f"; the last good checkpoint (step {last}) is untouched" if last else ""
        found = f" (found at step {self.step})" if step != self.step else ""
        raise NonFiniteLossError(f"non-finite loss {loss} at step {step}{where}{found}")

    def _log(self, result: TrainResult, window: _Window, loss_sum: float, grad_norm: float, peak: float | None) -> None:
        elapsed = time.perf_counter() - window.started
        ips = window.images * self.dist.world_size / max(elapsed, 1e-9)
        metrics = {
            "train/loss": loss_sum / window.steps,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": grad_norm,
            "train/images_per_s": ips,
        }
        if peak and self.flops_per_image:
            metrics["train/mfu"] = ips * self.flops_per_image / (peak * self.dist.world_size)
        result.history.append({"step": self.step, **metrics})
        self._emit("metrics", metrics)

    def _run_eval(self, result: TrainResult) -> None:
        self.module.eval()
        with self.averaged_weights() as model:
            metrics = self.evaluate_fn(model)
        self.module.train()
        result.eval = metrics
        self._emit("eval", metrics)

    def _train_step(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimiser step, queued on the device: nothing here waits for it (see :meth:`_sync_point`)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            o = cfg.optim
            group["lr"] = lr_at(
                self.step - 1, o.lr, self.total_steps, o.warmup_steps, o.decay, o.linear_end, o.step_decay_at
            )
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.dist.device)
        images = 0
        for micro in range(cfg.accum_steps):
            x, y = next(batches)
            images += x.shape[0]
            sync = micro == cfg.accum_steps - 1 or not hasattr(self.module, "no_sync")
            with contextlib.nullcontext() if sync else self.module.no_sync(), autocast(self.dist.device, cfg.precision):
                loss = self.loss_fn(self.module, x, y) / cfg.accum_steps
            self.scaler.scale(loss).backward()
            total_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.polyak is not None:
            self._update_polyak()
        return total_loss, grad_norm, images
