"""The typed objects that cross from flows/ into tasks/ (one spec per stage) and back (results), and how Prefect
caches a finished stage.

A flow builds a stage spec (``flows/plan.py``), a task runs it and returns a result model; nothing between them is a
``dict[str, Any]``. Prefect serialises these models for task and deployment parameters, and the UI shows them typed.

A training or few-shot stage is a Prefect cache hit when its stage folder already holds Prefect's result record:
:class:`StageKey` keys the cache on the stage's content-addressed URI and :class:`ArtifactStore` keeps the record in
that folder, so a reused stage shows as *Cached* in the UI, and deleting the folder forgets it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field

from tasks.common import TrackingContext
from tasks.launch import Launch
from vit import storage
from vit.engine.config import TrainConfig

RESULT_FILE = "_prefect_result.json"


class Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetRef(Typed):
    """A prepared dataset, as stages refer to it."""

    name: str
    uri: str
    fingerprint: str
    num_classes: int
    splits: dict[str, int]
    vtab_group: str | None = None


class DatasetStage(Typed):
    """Prepare one dataset (``source`` as ``vitflow data prepare`` reads it) into ``artifact_root``."""

    name: str
    source: str
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    max_corrupt_fraction: float = Field(0.01, ge=0.0, le=1.0)
    artifact_root: str
    seed: int = 0
    tracking: TrackingContext


class TestEval(Typed):
    """Evaluate the final weights of a fine-tune on a split (ReaL labels too where the dataset has them)."""

    split: str
    transform: str
    real: bool = False


class Registration(Typed):
    """Register the trained weights as a version of an MLflow model and point an alias at it."""

    name: str
    alias: str


class TrainStage(Typed):
    """One training stage: pre-training, or one fine-tune at one learning rate and seed."""

    kind: Literal["pretrain", "finetune"]
    name: str = Field(description="the MLflow run name, e.g. finetune:cifar10:lr=0.01")
    title: str = Field(description="the Prefect task run name, e.g. finetune cifar10 lr=0.01 seed=0")
    uri: str = Field(description="the content-addressed stage folder (checkpoints, events, result)")
    config: TrainConfig
    launch: Launch = Field(default_factory=Launch)
    tracking: TrackingContext
    datasets: list[DatasetRef] = Field(description="the training dataset first, then evaluation datasets")
    test: TestEval | None = None
    registration: Registration | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class TrainResult(Typed):
    kind: str
    name: str
    stage_uri: str
    model_uri: str
    metrics: dict[str, float]
    step: int
    run_id: str | None = None
    model_version: str | None = None


class FewshotStage(Typed):
    """Few-shot linear evaluation of one model on one benchmark, for every (shots, seed)."""

    benchmark: str
    model_label: str
    model_uri: str
    dataset: DatasetRef
    train_split: str
    test_split: str
    shots: list[int]
    seeds: list[int]
    l2: float
    image_size: int | None  # None: the checkpoint's own resolution
    uri: str
    tracking: TrackingContext
    tags: dict[str, str] = Field(default_factory=dict)


class FewshotRecord(Typed):
    shots: int
    seed: int
    accuracy: float


class FewshotResult(Typed):
    benchmark: str
    records: list[FewshotRecord]
    mean: dict[str, float] = Field(description="mean accuracy over seeds, keyed by the number of shots")


class FinetuneOutcome(Typed):
    benchmark: str
    model: str = Field(description="pretrained, or scratch for the from-scratch baseline")
    lr: float
    seed: int
    result: TrainResult


class FewshotOutcome(Typed):
    benchmark: str
    model: str
    result: FewshotResult


class TransferResults(Typed):
    sweeps: list[FinetuneOutcome] = Field(default_factory=list)
    finals: list[FinetuneOutcome] = Field(default_factory=list)
    fewshot: list[FewshotOutcome] = Field(default_factory=list)


class AnalysisTarget(Typed):
    """The model the paper's Fig. 6/7 pictures are drawn for, and the images they are drawn on."""

    model_uri: str
    dataset_uri: str
    split: str
    image_size: int
    num_images: int


class AggregateStage(Typed):
    experiment: str
    model_name: str
    pretrain_name: str = Field(description="the pre-training dataset, or 'checkpoint' when transfer started from one")
    artifact_root: str
    tracking: TrackingContext
    results: TransferResults
    pretrained: TrainResult | None = None
    groups: dict[str, str | None] = Field(description="benchmark -> its VTAB group (None outside VTAB)")
    curve_seed: int = Field(0, description="the seed whose fine-tunes the training-curve plot shows")
    analysis: AnalysisTarget | None = None


class RunSummary(Typed):
    """What a benchmark or transfer-eval flow run returns."""

    results_uri: str
    report_uri: str
    headline: dict[str, float]
    table: str
    run_id: str
    table_rows: list[dict[str, str | float]] = Field(default_factory=list)
    comparison: str | None = None
    regressions: list[str] = Field(default_factory=list)


class StageKey(CachePolicy):
    """Prefect's cache key of a stage task: where its result record lives, in the stage's own folder."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **_: Any) -> str:
        return storage.join(inputs["stage"].uri, RESULT_FILE)


class ArtifactStore(WritableFileSystem):
    """Prefect result storage on the artifact store (a local folder or S3 through ``vit.storage``): Prefect's own
    S3 storage needs s3fs or a credentials block, and neither reaches an S3 endpoint configured by environment."""

    _block_type_name = "vitflow artifact store"

    def read_path(self, path: str, _sync: bool = True) -> bytes:
        return storage.read_bytes(path)

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> None:
        storage.write_bytes(path, content)

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(storage.read_bytes, path)

    async def awrite_path(self, path: str, content: bytes) -> None:
        await asyncio.to_thread(storage.write_bytes, path, content)


def result_store() -> ArtifactStore:
    """The result storage block, saved to the Prefect API (Prefect refers to result storage by block id)."""
    block = ArtifactStore()
    block.save("artifacts", overwrite=True)
    return block


def log_when_cached(record: Callable[[Any, Any], None]) -> Callable[..., None]:
    """An ``on_completion`` hook: a Prefect cache hit runs none of the task's code, so the stage's MLflow run (tagged
    ``vitflow.cached``) is recorded here, from the task's ``stage`` parameter and the cached result."""

    def log_reuse(task: Any, task_run: Any, state: Any) -> None:
        context = TaskRunContext.get()
        if state.name == "Cached" and context is not None:
            record(context.parameters["stage"], state.result())

    return log_reuse


def cached_stage(record_reuse: Callable[[Any, Any], None]) -> dict[str, Any]:
    """The ``@task`` options of a stage task whose parameter ``stage`` names its folder: cached on that folder, its
    result persisted there as JSON, ``record_reuse(stage, result)`` called on a cache hit."""
    return {
        "cache_policy": StageKey(),
        "persist_result": True,
        "result_serializer": "json",
        "on_completion": [log_when_cached(record_reuse)],
    }
