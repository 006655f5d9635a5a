"""Single-stage flows for ``dispatch=deployments``: each fine-tune or few-shot evaluation of a benchmark becomes
its own flow run on a work pool (GPU workers), and writes its result to the artifact store."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.evaluate import fewshot_task
from tasks.train import train_task


@flow(name="train-stage", log_prints=True)
def train_stage(
    kind: str,
    run_name: str,
    key: dict[str, Any],
    config: dict[str, Any],
    artifact_root: str,
    launch: dict[str, Any],
    tracking: dict[str, Any],
    datasets: list[dict[str, Any]],
    test: dict[str, Any] | None = None,
    register: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One training stage (a fine-tune at one learning rate, or pre-training), run by a worker."""
    return train_task(kind, run_name, key, config, artifact_root, launch, tracking, datasets, test, register, tags)


@flow(name="fewshot-stage", log_prints=True)
def fewshot_stage(
    benchmark: str,
    model_label: str,
    model_uri: str,
    dataset: dict[str, Any],
    train_split: str,
    test_split: str,
    shots: list[int],
    seeds: list[int],
    l2: float,
    image_size: int | None,  # None: the checkpoint's own resolution
    artifact_root: str,
    tracking: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Few-shot linear evaluation of one model on one benchmark, run by a worker."""
    return fewshot_task(
        benchmark,
        model_label,
        model_uri,
        dataset,
        train_split,
        test_split,
        shots,
        seeds,
        l2,
        image_size,
        artifact_root,
        tracking,
        tags,
    )
