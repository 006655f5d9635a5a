"""A training stage through the real launcher command (tasks.launch.command: torchrun, c10d, gloo on CPU) as two
nodes x one process on loopback and as one node x two processes: the ranks end with identical weights, and the
steps, the global batches (the same samples: vit.data.loader makes their composition independent of the world
size), the epochs covered and the loss curve equal the one-process run's up to float reduction order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.launch import Launch, command
from vit.data import open_dataset, prepare_dataset
from vit.engine import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from vit.engine.train_state import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent
STEPS, GLOBAL_BATCH = 6, 8  # 48 samples of a 40-sample split: the run crosses an epoch boundary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("torchrun-data")
    source = "synthetic-vtab:specialized_noise,test=10"
    return prepare_dataset(source, "noise", str(root), progress=False, max_train800=40, max_val200=8, shard_samples=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(dataset: str, workdir: Path) -> Path:
    cfg = TrainConfig(
        model=ModelConfig(name="vit_micro_4", image_size=16, dropout=0.0),
        data=DataConfig(dataset=dataset, train_split="train800", train_transform="pretrain", shuffle_buffer=16),
        optim=OptimConfig(name="sgd", lr=0.05, grad_clip=None),
        checkpoint=CheckpointConfig(dir=str(workdir / "checkpoints"), every_minutes=None),
        batch_size=GLOBAL_BATCH,
        steps=STEPS,
        log_every=1,
        device="cpu",
    )
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def launch(dataset: str, workdir: Path, nodes: int, nproc: int) -> dict:
    """Run the launcher's command once per node (each node its own events and result files) and wait."""
    config = write_config(dataset, workdir)
    endpoint = f"127.0.0.1:{free_port()}" if nodes > 1 else None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for node in range(nodes):
        events, result = workdir / f"events-{node}.jsonl", workdir / f"result-{node}.json"
        argv = command(config, events, result, Launch(nproc_per_node=nproc, nnodes=nodes, rdzv_endpoint=endpoint))
        log = open(workdir / f"node-{node}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait(timeout=300)
        log.close()
    logs = "\n".join((workdir / f"node-{n}.log").read_text()[-3000:] for n in range(nodes))
    assert [p.returncode for p, _ in procs] == [0] * nodes, logs
    (result,) = [json.loads(r.read_text()) for r in sorted(workdir.glob("result-*.json"))]  # rank 0's node only
    (events,) = [e for e in sorted(workdir.glob("events-*.jsonl")) if e.stat().st_size]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    result["losses"] = [e["train/loss"] for e in lines if e["event"] == "metrics"]
    result["weights"] = load_file(str(workdir / "checkpoints" / "model.safetensors"))
    result["loader"] = CheckpointManager(str(workdir / "checkpoints")).load_latest().state["data"]
    return result


def test_two_nodes_and_two_processes_train_as_one_process_does(dataset, tmp_path):
    single = launch(dataset, tmp_path / "one", nodes=1, nproc=1)
    runs = {
        "2 nodes x 1": launch(dataset, tmp_path / "nodes", nodes=2, nproc=1),
        "1 node x 2": launch(dataset, tmp_path / "procs", nodes=1, nproc=2),
    }
    assert single["step"] == STEPS and len(single["losses"]) == STEPS
    samples = single["loader"]["batches"] * single["loader"]["batch_size"] * single["loader"]["world_size"]
    assert samples == STEPS * GLOBAL_BATCH > open_dataset(dataset).count("train800")
    for name, run in runs.items():
        assert len(run["rank_digests"]) == 2 and len(set(run["rank_digests"])) == 1, name  # ranks agree exactly
        assert run["step"] == STEPS, name
        loader = run["loader"]
        assert (loader["world_size"], loader["batch_size"], loader["shuffle_buffer"]) == (2, GLOBAL_BATCH // 2, 16)
        assert loader["batches"] * loader["batch_size"] * loader["world_size"] == samples, name  # same coverage
        torch.testing.assert_close(run["losses"], single["losses"], atol=1e-5, rtol=1e-5, msg=name)
        for key, value in single["weights"].items():
            torch.testing.assert_close(run["weights"][key], value, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
