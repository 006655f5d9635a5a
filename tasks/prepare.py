"""Prefect task: prepare one dataset into the artifact store (skipped when its fingerprint is already there)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import run_logger, start_stage_run
from tasks.stages import DatasetRef, DatasetStage
from tasks.tracking import RunRef, Tracker


def dataset_ref(uri: str) -> DatasetRef:
    """The small description of a prepared dataset that flows pass between tasks."""
    from vit.data import open_dataset

    ds = open_dataset(uri)
    return DatasetRef(
        name=ds.name,
        uri=ds.uri,
        fingerprint=ds.fingerprint,
        num_classes=ds.num_classes,
        splits={split: ds.count(split) for split in ds.splits},
        vtab_group=ds.info.get("vtab_group"),
    )


def log_dataset_input(tracker: Tracker, run: RunRef, ref: DatasetRef, context: str) -> None:
    tracker.log_dataset(run, ref.name, ref.uri, ref.fingerprint, context, {"splits": ref.splits})


# Not a Prefect cache hit: the output folder is named by the source's fingerprint, known only once it is read;
# prepare_dataset finds an earlier output by that fingerprint and returns it.
@task(
    name="prepare-dataset",
    task_run_name="prepare:{stage.name}",
    cache_policy=NONE,
)
def prepare_dataset_task(stage: DatasetStage) -> DatasetRef:
    from vit.data import prepare_dataset

    logger = run_logger()
    params = {"source": stage.source, "max_corrupt_fraction": stage.max_corrupt_fraction, **stage.options}
    tracker, run = start_stage_run(stage.tracking, f"prepare:{stage.name}", "prepare", params=params)
    try:
        uri = prepare_dataset(
            stage.source,
            stage.name,
            stage.artifact_root,
            max_corrupt_fraction=stage.max_corrupt_fraction,
            seed=stage.seed,
            progress=False,
            **stage.options,
        )
        ref = dataset_ref(uri)
        tracker.set_tags(run, {"vitflow.dataset_uri": uri, "vitflow.fingerprint": ref.fingerprint})
        tracker.log_metrics(run, {f"count/{split}": n for split, n in ref.splits.items()})
        log_dataset_input(tracker, run, ref, "prepared")
        counts = ", ".join(f"{k} {v}" for k, v in ref.splits.items())
        logger.info("dataset %s ready: %s (%s)", stage.name, uri, counts)
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.finish(run)
    return ref
