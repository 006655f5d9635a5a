"""Run ``python -m vit.engine`` in a child process (``torchrun`` for several processes) and stream it back.

A single-process run is forked from ``tasks.prefork``'s server, which has imported torch and the engine
already (``Launch(prefork=False)``: a fresh interpreter each time). The child writes JSON-lines events (metrics,
evaluations, checkpoints) and its output to files this process tails: the events go to the supervising Prefect
task, which forwards them to MLflow, the output to its logger. A training crash therefore never takes the
orchestrator down, and a re-launch resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import prefork
from vit.engine.config import TrainConfig
from vit.engine.exit_codes import RUN_EXIT_REASONS


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    threads: int | None = None  # OMP threads per process
    gpu_slots_limit: str | None = None  # Prefect global concurrency limit, one slot per GPU
    prefork: bool = True  # a single-process run forks from tasks.prefork's warm server (no import cost)

    @property
    def single_process(self) -> bool:
        return self.nproc_per_node * self.nnodes == 1

    def slots(self):
        """Hold ``nproc_per_node`` slots of the GPU limit while training (no-op without a limit)."""
        if not self.gpu_slots_limit:
            return contextlib.nullcontext()
        from prefect.concurrency.sync import concurrency

        return concurrency(self.gpu_slots_limit, occupy=self.nproc_per_node)


def engine_args(config_path: Path, events: Path, result: Path) -> list[str]:
    """The arguments of ``python -m vit.engine`` for one stage."""
    return [str(config_path), "--metrics", str(events), "--result", str(result), "--no-progress"]


def command(config_path: Path, events: Path, result: Path, launch: Launch) -> list[str]:
    engine = ["-m", "vit.engine", *engine_args(config_path, events, result)]
    if launch.single_process:
        return [sys.executable, *engine]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={launch.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={launch.rdzv_endpoint}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.nproc_per_node}"]
    return [*torchrun, *rendezvous, "--max_restarts=0", *engine]


class _Tail:
    """Yields complete new lines appended to a file since construction."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def read(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        return [c.decode() for c in chunks if c.strip()]


def _start(
    config_path: Path, events: Path, result: Path, log: Path, launch: Launch, env: dict[str, str]
) -> subprocess.Popen | prefork.ForkedRun:
    """The training process: forked from the prefork server, or a fresh interpreter (torchrun for several)."""
    if launch.prefork and launch.single_process:
        return prefork.ForkedRun(engine_args(config_path, events, result), env, log)
    with open(log, "ab") as output:
        return subprocess.Popen(
            command(config_path, events, result, launch),
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=prefork.die_with_parent,
        )


def run_training(
    cfg: TrainConfig,
    workdir: Path,
    launch: Launch,
    on_event: Callable[[dict[str, Any]], None],
    on_line: Callable[[str], None],
    poll_seconds: float = 0.2,
) -> dict[str, Any]:
    """Train in a child process; returns its result (step, eval metrics, model URI). Raises TrainingFailed.

    The child's output goes to ``train.log`` in ``workdir`` (appended across attempts), which this process tails
    into ``on_line`` as it tails the events into ``on_event``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    events, result, log = workdir / "events.jsonl", workdir / "result.json", workdir / "train.log"
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if launch.threads:
        env["OMP_NUM_THREADS"] = str(launch.threads)
    event_tail, log_tail = _Tail(events), _Tail(log)
    last_lines: deque[str] = deque(maxlen=30)

    def forward() -> None:
        for line in log_tail.read():
            last_lines.append(line)
            on_line(line)
        for line in event_tail.read():
            on_event(json.loads(line))

    proc = _start(config_path, events, result, log, launch, env)
    try:
        while True:
            try:
                proc.wait(timeout=poll_seconds)
                break
            except subprocess.TimeoutExpired:
                forward()
    except BaseException:
        proc.terminate()  # SIGTERM: the trainer checkpoints before it exits
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    forward()
    if proc.returncode != 0:
        output = "\n".join(last_lines)
        reason = RUN_EXIT_REASONS.get(proc.returncode, f"exit code {proc.returncode}")
        raise TrainingFailed(f"training failed: {reason}\n{output}", proc.returncode)
    return json.loads(result.read_text())
