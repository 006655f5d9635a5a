"""Prefect tasks around a trained model: a seeded random initialisation (the from-scratch baseline) and few-shot
linear evaluation on pre-logits features."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import (
    TrackingContext,
    read_done,
    run_logger,
    stage_uri,
    start_stage_run,
    write_done,
)
from tasks.prepare import log_dataset_input
from vit import storage


@task(name="init-checkpoint", task_run_name="init:{model}", cache_policy=NONE)
def init_checkpoint_task(
    model: str, image_size: int, seed: int, artifact_root: str, overrides: dict[str, Any] | None = None
) -> str:
    """A randomly initialised model saved like a pre-trained one, so baselines go through the same stages."""
    options = dict(overrides or {})
    uri = stage_uri(artifact_root, "init", model, {"model": model, "image_size": image_size, "seed": seed, **options})
    path = storage.join(uri, "model.safetensors")
    if not storage.exists(path):
        import torch  # here: only a missing checkpoint needs it

        from vit.checkpoints import save_checkpoint
        from vit.model import create_model

        torch.manual_seed(seed)
        save_checkpoint(
            path,
            create_model(model, num_classes=0, image_size=image_size, **options),
            {"step": 0, "seed": seed, "random_init": True},
        )
    return path


def _fewshot_key(
    model_uri: str,
    dataset: dict[str, Any],
    train_split: str,
    test_split: str,
    shots: list[int],
    seeds: list[int],
    l2: float,
    image_size: int | None,
) -> dict[str, Any]:
    return {
        "model": model_uri,
        "dataset": dataset["fingerprint"],
        "train": train_split,
        "test": test_split,
        "shots": shots,
        "seeds": seeds,
        "l2": l2,
        "image_size": image_size,
    }


def fewshot_stage_uri(
    benchmark: str,
    model_label: str,
    model_uri: str,
    dataset: dict[str, Any],
    train_split: str,
    test_split: str,
    shots: list[int],
    seeds: list[int],
    l2: float,
    image_size: int | None,
    artifact_root: str,
    **_: Any,
) -> str:
    """Where :func:`fewshot_task` writes its result for these arguments (the work-pool dispatcher reads it there)."""
    key = _fewshot_key(model_uri, dataset, train_split, test_split, shots, seeds, l2, image_size)
    return stage_uri(artifact_root, "fewshot", f"{benchmark}-{model_label}", key)


@task(name="fewshot", task_run_name="fewshot:{benchmark}:{model_label}", cache_policy=NONE)
def fewshot_task(
    benchmark: str,
    model_label: str,
    model_uri: str,
    dataset: dict[str, Any],
    train_split: str,
    test_split: str,
    shots: list[int],
    seeds: list[int],
    l2: float,
    image_size: int | None,
    artifact_root: str,
    tracking: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Few-shot accuracy per (shots, seed); features are extracted once and reused for every shot and seed."""
    logger = run_logger()
    key = _fewshot_key(model_uri, dataset, train_split, test_split, shots, seeds, l2, image_size)
    uri = fewshot_stage_uri(
        benchmark, model_label, model_uri, dataset, train_split, test_split, shots, seeds, l2, image_size, artifact_root
    )
    done = read_done(uri)
    name = f"fewshot:{benchmark}" + ("" if model_label == "pretrained" else f":{model_label}")
    tracker, run = start_stage_run(
        TrackingContext(**tracking),
        name,
        "fewshot",
        {**(tags or {}), "vitflow.cached": str(done is not None).lower()},
        params={"model_uri": model_uri, **{k: v for k, v in key.items() if k != "model"}},
    )
    log_dataset_input(tracker, run, dataset, "evaluation")
    try:
        if done is None:
            done = _evaluate(
                benchmark, model_uri, dataset["uri"], train_split, test_split, shots, seeds, l2, image_size
            )
            write_done(uri, done)
            logger.info(
                "few-shot %s (%s): %s",
                benchmark,
                model_label,
                ", ".join(f"{k}-shot {v:.3f}" for k, v in done["mean"].items()),
            )
        tracker.log_metrics(run, {f"fewshot/{benchmark}/{k}shot": v for k, v in done["mean"].items()})
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.finish(run)
    return done


def _evaluate(
    benchmark: str,
    model_uri: str,
    dataset_uri: str,
    train_split: str,
    test_split: str,
    shots: list[int],
    seeds: list[int],
    l2: float,
    image_size: int | None,
) -> dict[str, Any]:
    import torch

    from vit import load_pretrained
    from vit.engine.protocol import fewshot_on_dataset

    model = load_pretrained(model_uri).to("cuda" if torch.cuda.is_available() else "cpu")
    if image_size and model.cfg.image_size != (image_size, image_size):  # None: the checkpoint's own
        model.set_image_size(image_size)
    frame = fewshot_on_dataset(model, dataset_uri, train_split, test_split, shots, seeds, l2)
    mean = frame.groupby("shots")["accuracy"].mean()
    return {
        "benchmark": benchmark,
        "records": frame.to_dict("records"),
        "mean": {str(int(k)): float(v) for k, v in mean.items()},
    }
