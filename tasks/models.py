"""Model references and the registry: checkpoints as MLflow Models, registered versions with aliases.

A checkpoint is logged as an MLflow 3 logged model in the pytorch flavour (``torch.export``'s pt2 format: it loads
without vitflow's code and never unpickles) with a signature, an input example and pip requirements, so
``mlflow.pytorch.load_model``, ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work on any
``models:/<name>@<alias>``; its pyfunc takes a float32 NCHW batch in [-1, 1] and returns logits. The safetensors
checkpoint stays the file vitflow itself reads: the model and each version carry its URI in ``vitflow.checkpoint_uri``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path

from mlflow import MlflowClient

from tasks.tracking import ModelRef, RunRef, Tracker, git_commit

CHECKPOINT_TAG = "vitflow.checkpoint_uri"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def resolve_model_ref(ref: str, tracking_uri: str) -> tuple[str, dict[str, str]]:
    """A file vit.load_pretrained reads for ``ref``, and what it resolved through (registry name, version)."""
    match = _MODEL_URI.match(ref)
    if not match:
        if ref.startswith("models:/"):
            raise ValueError(f"model reference {ref!r}: use models:/<name>@<alias> or models:/<name>/<version>")
        return ref, {}
    client = MlflowClient(tracking_uri)
    name = match["name"]
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"])
        else:
            version = client.get_model_version(name, match["version"])
    except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException / RestException
        raise ValueError(f"model reference {ref!r} cannot be resolved in {tracking_uri}: {e}") from None
    if CHECKPOINT_TAG not in version.tags:
        raise ValueError(f"model reference {ref!r}: version {version.version} was not registered by vitflow")
    return version.tags[CHECKPOINT_TAG], {
        "registered_model": name,
        "model_version": str(version.version),
        "model_run_id": version.run_id or "",
    }


# torch.export (MLflow's pt2 format) traces under process-global dispatch modes: two exports from threads at once
# fail ("ProxyTorchDispatchMode slot already occupied"), so stages finishing together take turns.
_EXPORT_LOCK = threading.Lock()


def save_mlflow_model(checkpoint_uri: str, path: Path) -> Path:
    """The checkpoint as an MLflow Model in ``path`` (written locally, no tracking server needed)."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.pytorch import save_model
    from mlflow.types import Schema, TensorSpec

    from vit import load_pretrained

    model = load_pretrained(checkpoint_uri).eval()
    height, width = model.cfg.image_size
    example = np.zeros((2, 3, height, width), dtype=np.float32)  # batch 1 would fix the batch size
    with torch.no_grad():
        outputs = model(torch.from_numpy(example)).shape[-1]
    signature = ModelSignature(
        Schema([TensorSpec(np.dtype(np.float32), (-1, 3, height, width))]),
        Schema([TensorSpec(np.dtype(np.float32), (-1, outputs))]),
    )
    shutil.rmtree(path, ignore_errors=True)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    with _EXPORT_LOCK:
        save_model(
            model,
            path,
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            serialization_format="pt2",
            metadata={CHECKPOINT_TAG: checkpoint_uri},
        )
    return path


def log_checkpoint(tracker: Tracker, run: RunRef, experiment_id: str, checkpoint_uri: str, workdir: Path) -> ModelRef:
    """Log ``checkpoint_uri`` as a logged model of ``run`` (queued like every call while MLflow is down)."""
    tags = {CHECKPOINT_TAG: checkpoint_uri, "vitflow.git_commit": git_commit()}
    path = save_mlflow_model(checkpoint_uri, workdir)
    return tracker.log_model(run, experiment_id, path, re.sub(r"[/:.%\"']", "-", run.name), tags)  # MLflow's rule


def register_model(
    tracking_uri: str, name: str, alias: str | None, checkpoint_uri: str, experiment: str = "vitflow-models"
) -> str | None:
    """Log ``checkpoint_uri`` in a run of its own and register it as a new version of ``name``; ``alias`` (when
    given) moves to it. For checkpoints made outside a vitflow stage; a stage registers through its own run."""
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.experiment_id(experiment)
    run = tracker.start_run(experiment_id, f"register:{name}", tags={"vitflow.stage": "register"})
    with tempfile.TemporaryDirectory() as tmp:
        model = log_checkpoint(tracker, run, experiment_id, checkpoint_uri, Path(tmp) / "model")
        version = tracker.register_model(name, model, alias, run, {CHECKPOINT_TAG: checkpoint_uri})
    tracker.finish(run)
    return version
