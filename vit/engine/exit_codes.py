"""The exit codes of vitflow's processes, in one place: a training run's (``python -m vit.engine``, which the
pipeline reads back) and the ``vitflow`` command line's."""

from __future__ import annotations

# python -m vit.engine
EXIT_INVALID = 2  # invalid configuration, refused before any work
EXIT_NONFINITE = 3  # non-finite loss (the last good checkpoint is kept)
EXIT_PREEMPTED = 143  # stopped by SIGTERM or Ctrl-C, 128 + SIGTERM as a shell reports it (checkpoint written)

RUN_EXIT_REASONS = {
    EXIT_INVALID: "invalid config",
    EXIT_NONFINITE: "non-finite loss",
    EXIT_PREEMPTED: "preempted (SIGTERM)",
}

# vitflow
EXIT_FAILED = 1  # the work failed
EXIT_BAD_INPUT = 2  # bad input: a missing path, an invalid spec or override
EXIT_REGRESSION = 3  # a regression was found (transfer, compare)
