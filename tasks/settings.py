"""Where vitflow keeps things by default: ``VITFLOW_HOME`` (default ``./.vitflow``) and what lives in it."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path(".vitflow")  # VITFLOW_HOME when unset, relative to the working folder


def vitflow_home() -> Path:
    return Path(os.environ.get("VITFLOW_HOME", DEFAULT_HOME)).resolve()


def default_artifact_root() -> str:
    """``$VITFLOW_ARTIFACT_ROOT``, else ``$VITFLOW_HOME/artifacts``."""
    return os.environ.get("VITFLOW_ARTIFACT_ROOT") or str(vitflow_home() / "artifacts")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the SQLite database ``$VITFLOW_HOME/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{vitflow_home() / 'mlflow.db'}"


def configure_environment() -> None:
    """Defaults that must be in place before Prefect is imported: Prefect's home inside ``VITFLOW_HOME`` (created
    here, Prefect would not create its parents), no analytics calls from the offline machine, and a temporary
    Prefect server (no ``PREFECT_API_URL``) given time to start on a busy laptop (Prefect's own 20 s is not)."""
    if "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(vitflow_home() / "prefect")
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
