"""flows: the flows, their typed parameters and presets, deployments and schedules, and the ``vitflow`` CLI."""

from tasks.settings import configure_environment

configure_environment()
