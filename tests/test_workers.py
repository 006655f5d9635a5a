"""Scale-out on a work pool: a real `prefect server`, the deployments of ``infra/prefect.yaml`` applied with
`prefect deploy` onto a `process` pool, two `prefect worker` processes, and a benchmark with ``dispatch=deployments``
whose results table equals the one ``dispatch=local`` gives."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.servers import BIN, REPO, api_post, background, prefect_env, s3_env, servers, wait_until

POOL = "vitflow-process"
WORKERS = ("worker-1", "worker-2")
BUCKET = "workers-test"
BENCH = "synth/structured_count"


@dataclass(frozen=True)
class Pool:
    api: str
    mlflow: str
    s3: dict[str, str]
    init: str  # the checkpoint the benchmark transfers from


def online_workers(api: str) -> set[str]:
    return {w["name"] for w in api_post(f"{api}/work_pools/{POOL}/workers/filter", {}) if w["status"] == "ONLINE"}


def create_process_pool(api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    pool = WorkPoolCreate(name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_work_pool(pool)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, moto_endpoint) -> Iterator[Pool]:
    """The pool, its deployments (`prefect deploy` of infra/prefect.yaml) and two workers, each running one flow run
    at a time from a directory outside the checkout (the deployments' pull step finds the code through
    VITFLOW_CODE_DIR, as in the image)."""
    import torch

    import vit
    from flows.deployments import definitions
    from vit import storage
    from vit.checkpoints import save_checkpoint

    home = tmp_path_factory.mktemp("workers")
    s3 = s3_env(moto_endpoint)
    init = f"s3://{BUCKET}/init/vit_micro_4.safetensors"
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.items():
            mp.setenv(key, value)
        storage.ensure_bucket(f"s3://{BUCKET}")
        save_checkpoint(init, vit.create_model("vit_micro_4", num_classes=0, image_size=40), {"seed": 0})

    with servers(home) as (api, mlflow_url), contextlib.ExitStack() as stack:
        env = {**prefect_env(home / "client", api), **s3, "VITFLOW_CODE_DIR": str(REPO)}
        create_process_pool(api)
        watch = []
        for name in WORKERS:  # they start while `prefect deploy` runs
            (home / name).mkdir()
            worker_env = {**env, "VITFLOW_HOME": str(home / name), "PREFECT_WORKER_QUERY_SECONDS": "1"}
            argv = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", name, "--limit", "1"]
            log = home / f"{name}.log"
            watch.append((stack.enter_context(background(argv, worker_env, log, cwd=home / name)), log))
        deployed = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
            env={**env, "VITFLOW_WORK_POOL": POOL},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-4000:]
        assert deployed.stdout.count("successfully created") == len(definitions()), deployed.stdout
        wait_until(lambda: online_workers(api) == set(WORKERS), "workers", watch)
        yield Pool(api, mlflow_url, s3, init)


def small_spec(pool: Pool, root: str):
    from flows.presets import build_spec

    return build_spec(
        "demo",
        {
            "pretrain": None,
            "init": pool.init,
            "artifact_root": root,
            "tracking_uri": pool.mlflow,
            "experiment": "workers-test",
            "transfer.benchmarks": [
                {
                    "name": BENCH,
                    "protocol": "vtab",
                    "dataset": {
                        "name": "synth-structured_count",
                        "source": "synthetic-vtab:structured_count",
                        "options": {"size": 32, "test": 60},
                    },
                }
            ],
            "transfer.from_scratch_baseline": False,
            "transfer.finetune.seeds": [0],
            "transfer.finetune.steps": 6,
            "transfer.finetune.batch_size": 16,
            "transfer.finetune.lrs": [0.01],
            "transfer.fewshot.shots": [1, 5],
            "transfer.fewshot.seeds": [0, 1],
            "analysis.enabled": False,
            "compute.max_parallel": 2,
        },
    )


def results_table(uri: str, tmp: Path) -> pd.DataFrame:
    from tasks.results import read_results
    from vit import storage

    tmp.mkdir()
    table = read_results(storage.download(uri, tmp / "results.parquet")).drop(columns=["run"])
    return table.sort_values(list(table.columns.drop("value"))).reset_index(drop=True)


def stage_runs(api: str) -> list[dict[str, Any]]:
    """The flow runs of the per-stage deployments (what ``dispatch=deployments`` sent to the pool)."""
    return api_post(f"{api}/flow_runs/filter", {"deployments": {"name": {"any_": ["train-stage", "fewshot-stage"]}}})


def test_deployments_dispatch_on_two_workers_gives_the_local_results(pool, monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.benchmark import benchmark

    for key, value in pool.s3.items():
        monkeypatch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: pool.api}):
        remote = benchmark(spec=small_spec(pool, f"s3://{BUCKET}/deployments"), dispatch="deployments")
        local = benchmark(spec=small_spec(pool, f"s3://{BUCKET}/local"), dispatch="local")

    runs = stage_runs(pool.api)
    assert sorted(r["name"] for r in runs) == [f"fewshot:{BENCH}:pretrained", f"finetune:{BENCH}:lr=0.01"]
    assert all(r["state_type"] == "COMPLETED" and r["work_pool_name"] == POOL for r in runs)
    assert {r["labels"]["prefect.worker.name"] for r in runs} == set(WORKERS)  # the fan-out used both workers

    remote_table = results_table(remote.results_uri, tmp_path / "remote")
    local_table = results_table(local.results_uri, tmp_path / "local")
    assert len(remote_table) == 1 + 2 * 2  # the fine-tune's test accuracy; 2 shots x 2 seeds
    pd.testing.assert_frame_equal(remote_table, local_table)
    assert remote.headline == local.headline
