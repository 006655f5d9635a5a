"""tasks: one Prefect task per pipeline step, thin wrappers over vit/ that log to MLflow and write to the store."""

from tasks.settings import configure_environment

configure_environment()
