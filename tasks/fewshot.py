"""Prefect tasks around a trained model: a seeded random initialisation (the from-scratch baseline) and few-shot
linear evaluation on pre-logits features."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import read_done, run_logger, stage_uri, start_stage_run, write_done
from tasks.prepare import log_dataset_input
from tasks.stages import FewshotResult, FewshotStage, cached_stage
from tasks.tracking import RunRef, Tracker
from vit import storage


@task(name="init-checkpoint", task_run_name="init {model}", cache_policy=NONE)
def init_checkpoint_task(model: str, image_size: int, seed: int, artifact_root: str, gelu_approximate: str) -> str:
    """A randomly initialised model saved like a pre-trained one, so baselines go through the same stages."""
    key = {"model": model, "image_size": image_size, "seed": seed, "gelu_approximate": gelu_approximate}
    path = storage.join(stage_uri(artifact_root, "init", model, key), "model.safetensors")
    if not storage.exists(path):
        import torch  # here: only a missing checkpoint needs it

        from vit.checkpoints import save_checkpoint
        from vit.model import create_model

        torch.manual_seed(seed)
        net = create_model(model, num_classes=0, image_size=image_size, gelu_approximate=gelu_approximate)
        save_checkpoint(path, net, {"step": 0, "seed": seed, "random_init": True})
    return path


def fewshot_key(stage: FewshotStage) -> dict[str, object]:
    """What identifies a few-shot evaluation's output (the stage folder is named by its hash)."""
    return {
        "model": stage.model_uri,
        "dataset": stage.dataset.fingerprint,
        "train": stage.train_split,
        "test": stage.test_split,
        "shots": stage.shots,
        "seeds": stage.seeds,
        "l2": stage.l2,
        "image_size": stage.image_size,
    }


def _open_run(stage: FewshotStage, cached: bool) -> tuple[Tracker, RunRef]:
    """The evaluation's MLflow run, with its parameters and dataset, tagged as reused or not."""
    name = f"fewshot:{stage.benchmark}" + ("" if stage.model_label == "pretrained" else f":{stage.model_label}")
    params = {"model_uri": stage.model_uri, **{k: v for k, v in fewshot_key(stage).items() if k != "model"}}
    tags = {**stage.tags, "vitflow.stage_uri": stage.uri, "vitflow.cached": str(cached).lower()}
    tracker, run = start_stage_run(stage.tracking, name, "fewshot", tags, params=params)
    log_dataset_input(tracker, run, stage.dataset, "evaluation")
    return tracker, run


def _log_means(tracker: Tracker, run: RunRef, result: FewshotResult) -> None:
    tracker.log_metrics(run, {f"fewshot/{result.benchmark}/{k}shot": v for k, v in result.mean.items()})


def record_reuse(stage: FewshotStage, result: FewshotResult) -> None:
    tracker, run = _open_run(stage, cached=True)
    _log_means(tracker, run, result)
    tracker.finish(run)


@task(
    name="fewshot",
    task_run_name="fewshot {stage.benchmark} ({stage.model_label})",
    **cached_stage(record_reuse),
)
def fewshot_task(stage: FewshotStage) -> FewshotResult:
    """Few-shot accuracy per (shots, seed); features are extracted once and reused for every shot and seed."""
    done = read_done(stage.uri)
    tracker, run = _open_run(stage, cached=done is not None)
    try:
        if done is not None:
            result = FewshotResult.model_validate(done)
        else:
            result = _evaluate(stage)
            write_done(stage.uri, result.model_dump(mode="json"))
            means = ", ".join(f"{k}-shot {v:.3f}" for k, v in result.mean.items())
            run_logger().info("few-shot %s (%s): %s", stage.benchmark, stage.model_label, means)
        _log_means(tracker, run, result)
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.finish(run)
    return result


def _evaluate(stage: FewshotStage) -> FewshotResult:
    import torch

    from vit import load_pretrained
    from vit.engine.transfer import fewshot_on_dataset

    model = load_pretrained(stage.model_uri).to("cuda" if torch.cuda.is_available() else "cpu")
    if stage.image_size and model.cfg.image_size != (stage.image_size, stage.image_size):  # None: its own
        model.set_image_size(stage.image_size)
    frame = fewshot_on_dataset(
        model, stage.dataset.uri, stage.train_split, stage.test_split, stage.shots, stage.seeds, stage.l2
    )
    mean = frame.groupby("shots")["accuracy"].mean()
    return FewshotResult(
        benchmark=stage.benchmark,
        records=frame.to_dict("records"),
        mean={str(int(k)): float(v) for k, v in mean.items()},
    )
