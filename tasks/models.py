"""Model references: MLflow registry names with aliases, artifact URIs, official ``.npz`` files."""

from __future__ import annotations

import re

from mlflow import MlflowClient

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
    return version.source, {
        "registered_model": name,
        "model_version": str(version.version),
        "model_run_id": version.run_id or "",
    }


def register_model(tracking_uri: str, name: str, alias: str, source: str, run_id: str | None) -> str:
    """Register ``source`` as a new version of ``name`` and point ``alias`` at it; returns the version."""
    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - does not exist yet
        client.create_registered_model(name, description="vitflow pre-trained ViT checkpoints")
    version = client.create_model_version(name, source=source, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
