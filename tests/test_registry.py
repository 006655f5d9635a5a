"""Registered checkpoints are MLflow Models: every alias loads with mlflow.pytorch and mlflow.pyfunc and gives the
logits of vit.load_pretrained on the safetensors checkpoint, `mlflow models serve` answers on loopback, and
vitflow itself still reads the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import vit
from tasks.models import register_model, resolve_model_ref
from tests.helpers import randomize_
from tests.reliability.conftest import MlflowServer, free_ports, wait_for
from vit.checkpoints import save_checkpoint

NAME = "vit-micro-registry"
SIZE = 16


def checkpoint(path: Path, seed: int) -> str:
    model = randomize_(vit.create_model("vit_micro_4", num_classes=5, image_size=SIZE, depth=2), seed=seed)
    save_checkpoint(path, model, {"seed": seed})
    return str(path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A real `mlflow server` with two versions of NAME: @candidate and @champion, each a different checkpoint."""
    home = tmp_path_factory.mktemp("registry")
    server = MlflowServer(home)
    server.start()
    checkpoints = {
        alias: checkpoint(home / f"{alias}.safetensors", seed) for seed, alias in enumerate(("champion", "candidate"))
    }
    for alias, path in checkpoints.items():
        register_model(server.url, NAME, alias, path)
    yield server.url, checkpoints
    server.kill()


def batch(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


def reference_logits(path: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return vit.load_pretrained(path).eval()(torch.from_numpy(x)).numpy()


def test_every_registered_alias_loads_with_mlflow_and_gives_the_checkpoints_logits(registry, monkeypatch):
    url, checkpoints = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    aliases = MlflowClient(url).get_registered_model(NAME).aliases
    assert sorted(aliases) == ["candidate", "champion"] and len(set(aliases.values())) == 2
    x = batch()
    for alias, path in checkpoints.items():
        expected = reference_logits(path, x)
        module = mlflow.pytorch.load_model(f"models:/{NAME}@{alias}")
        with torch.no_grad():
            np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
        predicted = mlflow.pyfunc.load_model(f"models:/{NAME}@{alias}").predict(x)
        np.testing.assert_allclose(np.asarray(predicted), expected, atol=1e-5)


def test_a_registered_version_is_a_logged_model_and_vitflow_reads_its_safetensors_checkpoint(registry):
    url, checkpoints = registry
    client = MlflowClient(url)
    for alias, path in checkpoints.items():
        version = client.get_model_version_by_alias(NAME, alias)
        model = client.get_logged_model(client.get_run(version.run_id).outputs.model_outputs[0].model_id)
        assert version.source == model.artifact_location and model.status.to_proto() == 2  # READY
        source, resolved = resolve_model_ref(f"models:/{NAME}@{alias}", url)
        assert source == path and resolved["model_version"] == version.version


def test_registering_without_an_alias_leaves_the_aliases_where_they_are(registry, tmp_path):
    url, _ = registry
    client = MlflowClient(url)
    before = client.get_registered_model(NAME).aliases
    version = register_model(url, NAME, None, checkpoint(tmp_path / "extra.safetensors", 7))
    assert client.get_registered_model(NAME).aliases == before
    assert client.get_model_version(NAME, version).run_id


def test_mlflow_models_serve_answers_a_batch_with_the_checkpoints_logits(registry, tmp_path):
    url, checkpoints = registry
    port = free_ports(1)
    path = (
        f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # it runs `uvicorn` as an activated venv would
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1", "PATH": path}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@candidate"]
    argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _ping(port), "mlflow models serve", timeout=120, interval=0.3, proc=proc)
        x = batch(4)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.asarray(json.load(response)["predictions"], dtype=np.float32)
        np.testing.assert_allclose(predictions, reference_logits(checkpoints["candidate"], x), atol=1e-4)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()


def _ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_checkpoints_saved_as_mlflow_models_from_threads_at_once_all_export(tmp_path):
    """Stages finishing together (the scaling flow's pre-trainings, parallel final fine-tunes) save their MLflow
    Models from threads of one process at once; torch.export's tracing state is process-global."""
    import threading

    from tasks.models import save_mlflow_model

    paths = [checkpoint(tmp_path / f"c{i}.safetensors", seed=i) for i in range(4)]
    start, errors = threading.Barrier(len(paths)), []

    def save(i: int) -> None:
        start.wait()
        try:
            save_mlflow_model(paths[i], tmp_path / f"model{i}")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(len(paths)):
        assert mlflow.pytorch.load_model(str(tmp_path / f"model{i}")) is not None
