"""``vitflow promote``: move a registry alias (e.g. @champion, the nightly's baseline) after a review."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.commands import fail
from vit.engine.exit_codes import EXIT_BAD_INPUT


def promote(
    model_ref: Annotated[str, typer.Argument(help="`models:/NAME/VERSION` or `models:/NAME@ALIAS` to promote.")],
    alias: Annotated[str, typer.Option(help="The alias to point at that version.")] = "champion",
) -> None:
    """Point an alias of a registered model at a version, e.g. after reviewing a nightly evaluation.

    The nightly transfer evaluation compares every candidate with the evaluation of the version aliased
    `@champion`. A benchmark registers a new version (under the alias its spec names); `@champion` moves only here.
    Example: `vitflow promote models:/demo-vit_micro_4/3 --alias champion`."""
    from tasks.registry_ops import promote as move_alias
    from tasks.settings import default_tracking_uri

    try:
        moved = move_alias(default_tracking_uri(), model_ref, alias)
    except ValueError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    typer.echo(moved.sentence())
