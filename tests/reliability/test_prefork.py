"""Training runs forked from the warm server (``tasks.prefork``, the default of ``tasks.launch``) behave like
``python -m vit.engine`` in a fresh interpreter: same weights, exit codes, SIGTERM checkpoints, and no run outlives
the server or the process that started it."""

from __future__ import annotations

import json
import os
import signal
import threading

import psutil
import pytest
import torch

from tasks import prefork
from tasks.launch import Launch, TrainingFailed, run_training
from tests.reliability.conftest import events, train_config, wait_for
from vit.checkpoints import load_checkpoint
from vit.engine.config import TrainConfig


def train(dataset: str, workdir, prefork_on: bool, steps: int = 6, **changes):
    config = TrainConfig.from_dict({**train_config(dataset, str(workdir / "ckpt"), steps), **changes})
    lines: list[str] = []
    result = run_training(config, workdir, Launch(threads=1, prefork=prefork_on), lambda e: None, lines.append)
    return result, lines


def test_forked_runs_train_exactly_like_a_fresh_interpreter(tiny_dataset, tmp_path):
    fresh, _ = train(tiny_dataset, tmp_path / "fresh", prefork_on=False)
    forked, _ = train(tiny_dataset, tmp_path / "forked", prefork_on=True)
    server = prefork._server().process.pid
    again, _ = train(tiny_dataset, tmp_path / "again", prefork_on=True)
    assert prefork._server().process.pid == server  # the second run forked from the same warm server
    assert fresh["step"] == forked["step"] == again["step"] == 6
    weights = [load_checkpoint(r["model_uri"])[0] for r in (fresh, forked, again)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]) and torch.equal(tensor, weights[2][name]), name


def test_forked_run_reports_a_bad_config_with_exit_code_2_and_its_message(tiny_dataset, tmp_path):
    with pytest.raises(TrainingFailed) as failure:
        train(tiny_dataset, tmp_path, prefork_on=True, batch_size=0)
    assert failure.value.returncode == 2
    assert "batch_size" in str(failure.value)  # the child's stderr, forwarded from its log
    assert "batch_size" in (tmp_path / "train.log").read_text()


def test_sigterm_checkpoints_and_a_server_death_stops_its_runs(tiny_dataset, tmp_path):
    config = train_config(tiny_dataset, str(tmp_path / "ckpt"), steps=100_000, every=5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = [str(tmp_path / "config.json"), "--metrics", str(tmp_path / "events.jsonl"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    run = prefork.ForkedRun(args, env, tmp_path / "train.log")
    wait_for(lambda: any(e["event"] == "checkpoint" for e in events(tmp_path)), "a first checkpoint")
    run.terminate()
    assert run.wait(timeout=60) == 143  # the engine's "preempted" exit, after a final checkpoint
    assert events(tmp_path)[-1]["event"] in ("checkpoint", "end")

    run = prefork.ForkedRun(args, env, tmp_path / "train.log")
    child = psutil.Process(run.pid)
    server = prefork._server().process
    wait_for(lambda: len([e for e in events(tmp_path) if e["event"] == "start"]) == 2, "the resumed run's start")
    steps_before = len([e for e in events(tmp_path) if e["event"] == "checkpoint"])
    os.kill(server.pid, signal.SIGKILL)
    child.wait(timeout=60)  # SIGTERM from its parent-death signal: it checkpoints and leaves
    assert len([e for e in events(tmp_path) if e["event"] == "checkpoint"]) > steps_before
    with pytest.raises(prefork.ForkServerGone):
        run.wait(timeout=10)
    short = [*args[:1], "--set", "steps=1", "--set", f"checkpoint.dir={tmp_path / 'other'}"]
    fresh = prefork.ForkedRun(short, env, tmp_path / "train.log")
    assert prefork._server().process.pid != server.pid  # a new server replaced the dead one
    assert fresh.wait(timeout=60) == 0


def test_concurrent_forked_runs(tiny_dataset, tmp_path):
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        results[i] = train(tiny_dataset, tmp_path / str(i), prefork_on=True, steps=3)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1, 2] and all(r["step"] == 3 for r in results.values())
