"""Registry steps a person takes on purpose: check that a reference names a registered version, and move an alias
after a review (``vitflow promote``). A benchmark registers new versions; which one is @champion is decided here."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.models import _MODEL_URI


class ModelNotRegistered(ValueError):
    """A ``models:/`` reference names no registered model or no version with that alias."""


@dataclass(frozen=True)
class AliasMove:
    name: str
    alias: str
    version: str
    previous: str | None  # the version the alias pointed at before, if any

    def sentence(self) -> str:
        where = f"models:/{self.name}@{self.alias}"
        if self.previous == self.version:
            return f"{where} already points at version {self.version}"
        before = f"version {self.previous}" if self.previous else "no version"
        return f"{where} moved from {before} to version {self.version}"


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def require_registered(ref: str, tracking_uri: str) -> None:
    """Fail with one sentence saying what to register when ``ref`` is a registry reference that names nothing yet."""
    match = _MODEL_URI.match(ref)
    if not match:
        return
    client, name = MlflowClient(tracking_uri), match["name"]
    alias = match["alias"] or "candidate"
    promote = f"`vitflow promote models:/{name}/<version> --alias {alias}`"
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelNotRegistered(
            f"No model named {name!r} is registered in {tracking_uri}: register a pre-trained checkpoint under that "
            f"name (a benchmark run with `--set pretrain.registered_model={name}` does) and give the version to "
            f"evaluate the alias @{alias} with {promote}."
        ) from None
    if match["alias"] and alias_version(client, name, alias) is None:
        raise ModelNotRegistered(
            f"No version of model {name!r} has the alias @{alias} in {tracking_uri}: give the version to evaluate "
            f"that alias with {promote}."
        )


def promote(tracking_uri: str, ref: str, alias: str) -> AliasMove:
    """Point ``alias`` of the registered model at the version ``ref`` names (``models:/<name>/<version>`` or
    ``models:/<name>@<other alias>``)."""
    match = _MODEL_URI.match(ref)
    if not match:
        raise ValueError(f"model reference {ref!r}: use models:/<name>/<version> or models:/<name>@<alias>")
    require_registered(ref, tracking_uri)
    client, name = MlflowClient(tracking_uri), match["name"]
    version = alias_version(client, name, match["alias"]) if match["alias"] else match["version"]
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise ModelNotRegistered(f"Model {name!r} has no version {version} in {tracking_uri}.") from None
    previous = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    return AliasMove(name, alias, str(version), previous)
